"""What the loop does at each step boundary so that a run heals itself: the agreed stop
(preemption.py), checkpoints by steps and by wall time, loss-spike rollback (spike.py), and the
run ledger (events.py). The loop calls `Healing.boundary` once per step and `saw_losses` whenever it
reads losses; everything else lives here.
"""
from __future__ import annotations

from simscale import events
from simscale.train import preemption, spike
from simscale.train.checkpoint import tag_for
from simscale.train.watchdog import flush_std, on_failure_line, set_resume_hint


class Healing:
    def __init__(self, trainer):
        self.t = trainer
        cfg, info = trainer.cfg, trainer.info
        self.run_dir = trainer.run_dir
        self.detector = spike.SpikeDetector(cfg.run.spike)
        self.triggered_at: int | None = None
        self.stop = preemption.StopAgreement(info.rank, info.world_size, cfg.run.stop_file,
                                             cfg.run.save_every_minutes, info.backend)
        self.command = preemption.resume_command(cfg.preset, self.run_dir)
        if info.is_main:
            found = trainer.plan.resumed  # resume.prepare's choice (None: a fresh start)
            events.note_start(self.run_dir, info.world_size, "fresh" if found is None else str(found.tag_dir))
            if found is not None:
                events.record(self.run_dir, "resume", checkpoint=str(found.tag_dir), step=trainer.state.step,
                              world_size=info.world_size, saved_world_size=found.meta.get("world_size"),
                              changes=list(found.changes))
        on_failure_line(self._failed)
        set_resume_hint(lambda: f"at step {self.t.state.step}; resume with: {self.command}")

    def _failed(self, rank: int, phase: str, line: str, code: int) -> None:
        events.record(self.run_dir, "failure", rank=rank, phase=phase, exit_code=code, line=line,
                      step=self.t.state.step, attempt=events.attempt())

    def saw_losses(self, first_step: int, values: list[float]) -> None:
        for i, v in enumerate(values):
            if self.detector.see(first_step + i, v) and self.triggered_at is None:
                self.triggered_at = first_step + i

    def boundary(self, save_due: bool, applied: bool) -> bool:
        """After a step: stop, save, or roll back, the same on every rank. True after a rollback
        (the loop then re-opens its data stream at the new position)."""
        t, s = self.t, self.t.state
        stop, time_due, why = self.stop.decide()
        if not applied or save_due or time_due or stop:
            t.read_losses()  # feeds the detector: no checkpoint is written over an undetected spike
        if self.triggered_at is not None:
            self._rollback()
            return True
        if save_due or time_due or stop:
            t.save()
            self.stop.saved()
        if stop:
            code = self.stop.exit_code()
            if t.info.is_main:
                events.record(self.run_dir, "preempt", step=s.step, reason=why, checkpoint=tag_for(s.step),
                              exit_code=code, attempt=events.attempt())
            t.sink.print(preemption.stop_line(t.info.rank, s.step, why, tag_for(s.step), self.command, code))
            t.sink.close()
            flush_std()
            raise preemption.Stopped(code)
        return False

    def _rollback(self) -> None:
        t, cfg = self.t, self.t.cfg.run.spike
        step, first_bad, why = self.triggered_at, self.detector.first_bad or self.triggered_at, self.detector.why
        self.triggered_at = None
        self.detector.reset()
        if t.state.rollbacks >= cfg.max_rollbacks:
            raise spike.too_many(cfg, t.state.rollbacks, step, why)
        target = spike.rollback_target(t.ckpt, first_bad)
        if target is None:
            raise spike.too_many(cfg, t.state.rollbacks, step, why + "; no checkpoint before it to roll back to")
        skipped = spike.rollback(t, target)
        n = (f"epoch {skipped['from'][0]} sample {skipped['from'][1]} to epoch {skipped['to'][0]} "
             f"sample {skipped['to'][1]}")
        if t.info.is_main:
            events.record(self.run_dir, "rollback", step=step, first_bad_step=first_bad, why=why,
                          checkpoint=target.name, resumed_step=t.state.step, skipped=skipped,
                          rollbacks=t.state.rollbacks)
        t.sink.print(f"[yellow]loss spike at step {step} ({why}, {cfg.steps} bad steps from step {first_bad}): "
                     f"rolled back to {target.name} and skipped the data from {n} "
                     f"(rollback {t.state.rollbacks} of at most {cfg.max_rollbacks})[/yellow]")

    def finished(self) -> None:
        self.stop.close()
        if self.t.info.is_main:
            events.record(self.run_dir, "end", step=self.t.state.step, attempt=events.attempt())
