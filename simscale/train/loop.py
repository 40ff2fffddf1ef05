"""The SIM training loop under DeepSpeed. `train_step` reads top to bottom; the rest sets up.

One optimizer step = EMA update (if the online weights moved since the last one) -> for each
micro-batch: photometric ops on the device, forward, UniGrad, backward, DeepSpeed step.
DeepSpeed's ZeRO optimizers refuse a step whose gradients are not finite (they zero the
gradients and leave weights and Adam state alone); we read that back with `was_step_applied`,
count it, skip the EMA, and stop after a configured streak.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from simscale.accelerator import device_line
from simscale.config import Config, resolve_lr, to_dict
from simscale.data.remote import IOOptions
from simscale.errors import SimscaleError
from simscale.train import resume as resuming
from simscale.train.checkpoint import Checkpointer
from simscale.train.distributed import DistInfo, init_distributed
from simscale.train.ds_config import build_ds_config
from simscale.train.ema import ShardedEMA
from simscale.train.healing import Healing
from simscale.train.host_memory import keep_freed_host_memory
from simscale.train.metrics import MetricsSink, device_peak_flops, memory_gb
from simscale.train.loop_state import LoopState
from simscale.train.schedules import Schedule
from simscale.train.watchdog import on_failure, set_phase
from simscale.train.zero_init import partitioned_init
from simscale.zero import full_shape


def param_groups(model) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (no decay on biases and 1-D params)."""
    decay, no_decay = [], []
    for p in model.online_parameters():
        (no_decay if len(full_shape(p)) <= 1 else decay).append(p)  # ZeRO-3 params look 1-D (empty)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", dist_info: DistInfo | None = None,
                 live_progress: bool = False):
        """config -> data -> model -> engine -> restore. `live_progress`: a rich bar (stderr is a
        terminal) rather than plain log lines; the CLI decides."""
        self.info = dist_info or init_distributed(cfg.run.collective_timeout_s)
        self.cfg, lr_msg = resolve_lr(cfg, self.info.world_size)
        self.run_dir = Path(self.cfg.run.dir)
        self.ckpt = Checkpointer(self.run_dir, self.info.rank, self.info.world_size, self.cfg.run.keep_last)
        set_phase("resume")  # before the engine: resuming on another world size changes the DeepSpeed config
        self.plan = resuming.prepare(self.cfg, self.info, self.ckpt, resume, lr_rule=cfg.optim.lr <= 0)
        random.seed(self.cfg.run.seed)
        np.random.seed(self.cfg.run.seed)
        torch.manual_seed(self.cfg.run.seed)  # identical init on every rank
        self._build_data()
        self._build_engine()
        # Model-side randomness (drop path) differs per rank from here on; init above was identical
        # and data randomness has its own generators (stream.py).
        torch.manual_seed(self.cfg.run.seed + self.info.rank)
        self._build_outputs(live_progress)
        where = device_line(self.info.device.type, self.info.world_size, self.info.backend)
        self.sink.print(f"simscale: {self.cfg.preset} on {where}, "
                        f"ZeRO-{self.cfg.deepspeed.zero_stage} {self.cfg.deepspeed.precision}, "
                        f"{self.schedule.total_steps} steps of global batch "
                        f"{self.cfg.optim.batch_size * self.accum * self.info.world_size}; {lr_msg}")
        self.state = resuming.restore(self.engine, self.ema, self.plan, self.schedule, self.sink)
        P = self.stream.partitions
        self.sink.print(f"data: {P} partitions of the epoch's sample order ({P // self.info.world_size} per rank, "
                        f"{self.stream.num_workers} loader worker(s) each); a resume fits any number of ranks "
                        f"dividing {P}, with an optim.batch_size that is a multiple of {P} / ranks")
        self.heal = Healing(self)  # stop/save agreement, spike rollback, the run ledger

    def _build_data(self) -> None:
        """The rank's stream and the schedule its epoch length gives."""
        from simscale.data.stream import TwoViewStream

        self.stream = TwoViewStream(self.cfg, rank=self.info.rank, world_size=self.info.world_size)
        self.accum = self.cfg.optim.grad_accum
        steps_per_epoch = self.stream.batches_per_epoch // self.accum
        if steps_per_epoch < 1:
            raise SimscaleError(
                f"an epoch has {self.stream.batches_per_epoch} batches per rank, fewer than "
                f"optim.grad_accum={self.accum}: use more data or a smaller batch"
            )
        self.steps_per_epoch = steps_per_epoch
        self.schedule = Schedule.from_config(self.cfg, steps_per_epoch)

    def _build_engine(self) -> None:
        """The SIM model under DeepSpeed (built into ZeRO-3 partitions where asked), and its EMA."""
        import deepspeed

        from simscale.model.sim import SIM

        on_cpu = self.info.device.type == "cpu"
        if on_cpu:  # before the engine's buffers exist: DeepSpeed's per-step flat copies reuse the heap
            keep_freed_host_memory()
        if self.info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (loss, fp32 runs) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.ds_config = build_ds_config(self.cfg, self.info.world_size, on_cpu)
        self.plan.adjust(self.ds_config)
        self.dtype = torch.bfloat16 if self.cfg.deepspeed.precision == "bf16" else torch.float32
        if self.cfg.deepspeed.zero_stage == 3:
            # Build straight into partitions: ViT-H/g never exist whole on one rank. No `dtype=`:
            # DeepSpeed 0.19.8 ignores it on accelerators without fp16 (CPU) and picks bf16; the
            # config's bf16 flag is read correctly.
            with partitioned_init(self.ds_config):  # torch as it was after the build (zero_init.py)
                model = SIM(self.cfg)
        else:
            model = SIM(self.cfg)
        if self.cfg.model.compile:  # config.validate refuses it under ZeRO-3
            model.compile_encoder_blocks()
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                    config=self.ds_config)
        self.model = self.engine.module
        self.ema = ShardedEMA(self.model.ema_pairs())

    def _build_outputs(self, live_progress: bool) -> None:
        """Throughput accounting, the metrics sink, and the online k-NN monitor."""
        from simscale.model.flops import model_flops_per_sample, train_flops_per_sample

        self.flops_per_sample = train_flops_per_sample(self.cfg)  # executed: HFU
        self.model_flops_per_sample = model_flops_per_sample(self.cfg)  # without recomputation: MFU
        self.peak = device_peak_flops()
        self._unread: list[torch.Tensor] = []  # per-step mean losses (device) not yet in state.losses
        self.sink = MetricsSink(self.run_dir, self.info.is_main, self.cfg.log.tensorboard, self.cfg.log.progress,
                                self.schedule.total_steps, live=live_progress)
        on_failure(self.sink.close)  # a rank ended by another's failure still stops its bar, flushes its files
        self.knn = None
        if self.cfg.eval.every:
            from simscale.train.online_knn import OnlineKNN

            self.knn = OnlineKNN(self.cfg.eval, self.cfg.model.img_size, self.info.device, self.dtype,
                                 self.cfg.model.pool, IOOptions.from_config(self.cfg.data))

    def save(self) -> Path:
        set_phase("checkpoint save")
        self.read_losses()
        state = {"loop": dataclasses.asdict(self.state), "ema": self.ema.state_dict(), "rng": self.state.rng()}
        meta = {"config": to_dict(self.cfg), "ema_layout": self.ema.state_dict()["layout"]}
        return self.ckpt.save(self.engine, self.state.step, state, meta)

    # -- data -------------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the saved stream position on, across epoch boundaries."""
        s = self.state
        while True:
            for batch in self.stream.batches(epoch=s.epoch, start=s.samples_in_epoch):
                s.samples_in_epoch += self.stream.global_batch
                yield batch
            s.epoch += 1
            s.samples_in_epoch = 0

    def _to_device(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from simscale.data.photometric import apply_photometric

        dev = self.info.device
        # The parameters go in as the loader's host tensors: the ops decide from them without a sync.
        a = apply_photometric(batch["view_a"].to(dev, non_blocking=True), batch["photo_a"], view="a")
        b = apply_photometric(batch["view_b"].to(dev, non_blocking=True), batch["photo_b"], view="b")
        return (a.to(self.dtype), b.to(self.dtype), batch["geometry"].to(dev), batch["mask"].to(dev))

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, batches, read: bool = True) -> dict[str, Any]:
        """One optimizer step. `read=False` (fit's non-logging steps): loss and grad norm stay
        device tensors, nothing waits for the device; `read_losses()` turns them into floats."""
        set_phase("train step")
        s, sched = self.state, self.schedule
        lr, wd, momentum = sched.lr_at(s.step), sched.wd_at(s.step), sched.momentum_at(s.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
        if s.ema_pending:  # before the target forward, once per applied optimizer step
            self.ema.update(momentum)
            s.ema_pending = False
        data_wait, losses = 0.0, []
        for _ in range(self.accum):
            t0 = time.perf_counter()
            set_phase("data")
            batch = next(batches)
            set_phase("train step")
            data_wait += time.perf_counter() - t0
            view_a, view_b, geometry, mask = self._to_device(batch)
            out = self.engine(view_a, view_b, geometry, mask)
            loss, stats = self.model.loss(out)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        applied = self.engine.was_step_applied()
        mean_loss = torch.stack(losses).mean()  # this rank's; averaged over ranks when read
        if applied:
            s.ema_pending = True
            s.nonfinite_streak = 0
        else:
            s.skipped += 1
            s.nonfinite_streak += 1
        self._unread.append(mean_loss)
        s.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        m = {"loss": mean_loss, "lr": lr, "weight_decay": wd, "momentum": momentum, "grad_norm": grad_norm,
             "applied": bool(applied), "skipped_total": s.skipped, "data_time": data_wait,
             "loss_stats": stats}  # the last micro-batch's terms, tensors: read only when logged
        if read:
            m["loss"] = self.read_losses()
            m["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        return m

    def read_losses(self) -> float | None:
        """Moves the steps' losses not read yet into `state.losses` (means over ranks, one
        all-reduce and one device->host copy for all of them); returns the newest."""
        if not self._unread:
            return self.state.losses[-1] if self.state.losses else None
        pending = torch.stack(self._unread)
        self._unread.clear()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(pending)
            pending /= dist.get_world_size()
        values = pending.tolist()
        self.state.losses.extend(values)
        if hasattr(self, "heal"):
            self.heal.saw_losses(self.state.step - len(values) + 1, values)
        del self.state.losses[:-1000]  # bounded: metrics.jsonl keeps the full history
        return self.state.losses[-1]

    # -- online k-NN ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """k-NN top-1 of the online and target encoders after `state.step` steps (collective)."""
        set_phase("eval")
        s = self.state
        if s.ema_pending:  # the same update the next step would start with: the target is current
            self.ema.update(self.schedule.momentum_at(s.step))
            s.ema_pending = False
        encoders = {"online": self.model.online.encoder}
        if self.model.target is not None:
            encoders["target"] = self.model.target.encoder
        result = self.knn.evaluate(encoders)
        self.sink.log(s.step, result)  # no loss key: the sink prints it as an evaluation line
        return result

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> LoopState:
        cfg, s = self.cfg, self.state
        total = self.schedule.total_steps
        batches = self._batches()
        global_batch = cfg.optim.batch_size * self.accum * self.info.world_size
        self.engine.train()
        window = [0, 0.0, 0.0]  # steps, step seconds, data-wait seconds since the last logged step
        try:
            if self.knn is not None and s.step == 0:
                self.evaluate()  # the curve starts at the initialisation (the random-init baseline)
            while s.step < total:
                t0 = time.perf_counter()
                done = s.step + 1  # steps completed after this one: how records are numbered
                logging = done % cfg.log.every == 0 or done == 1 or done == total
                m = self.train_step(batches, read=logging)
                dt = time.perf_counter() - t0
                window = [window[0] + 1, window[1] + dt, window[2] + m.pop("data_time")]
                # Steps are numbered by optimizer steps completed: the first logs as step 1, and the
                # last of an N-step run as N, the same N as its checkpoint step_{N:08d}.
                step = s.step
                stats = m.pop("loss_stats")
                if not m["applied"]:
                    self.sink.print(f"[yellow]step {step}: non-finite loss or gradient, step skipped "
                                    f"({s.nonfinite_streak} in a row, {s.skipped} in all)[/yellow]")
                    if s.nonfinite_streak >= cfg.run.max_nonfinite_streak:
                        saved = self.ckpt.complete_tags()
                        where = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
                        raise SimscaleError(
                            f"{s.nonfinite_streak} steps in a row had a non-finite loss or gradient "
                            f"(run.max_nonfinite_streak={cfg.run.max_nonfinite_streak}; skipped steps changed "
                            f"no weights); {where}: lower optim.base_lr or check the data"
                        )
                if logging:
                    # averages over the logging window, not the last step alone
                    n, span, wait = window
                    window = [0, 0.0, 0.0]
                    images_per_s = global_batch * n / span
                    achieved = self.flops_per_sample * images_per_s / self.info.world_size
                    model_achieved = self.model_flops_per_sample * images_per_s / self.info.world_size
                    m.update(images_per_s=images_per_s, step_time=span / n, data_wait=wait / span,
                             tflops_per_device=achieved / 1e12,
                             mfu=model_achieved / self.peak if self.peak else None,
                             hfu=achieved / self.peak if self.peak else None, memory_gb=memory_gb(),
                             epoch=s.epoch)
                    # Rank 0's UniGrad terms (align, uniform per global/dense term; target std).
                    m.update({k: float(v) for k, v in stats.items() if k != "loss"})
                    self.sink.log(step, m)
                else:
                    self.sink.advance(step)
                if self.knn is not None and (s.step % cfg.eval.every == 0 or s.step == total):
                    self.evaluate()
                if self.heal.boundary(s.step % cfg.run.save_every == 0 or s.step == total, m["applied"]):
                    batches.close()  # rolled back: the data goes on from where the spike was found
                    batches, s = self._batches(), self.state
        finally:
            self.sink.close()
        self.read_losses()
        self.heal.finished()
        if self.info.is_main:
            self._write_report()
        return s

    def _write_report(self) -> None:
        """Plots + summary in RUN_DIR/report (simscale.report); a plotting problem never fails a run."""
        try:
            from simscale.report import write_report

            files, _ = write_report(self.run_dir)
            self.sink.print(f"report: {len(files)} files in {files[0].parent} (`simscale report` redraws)")
        except Exception as exc:  # noqa: BLE001 - training is done and saved; the report is a bonus
            self.sink.print(f"[yellow]no report written ({type(exc).__name__}: {exc}); "
                            f"try `simscale report {self.run_dir}`[/yellow]")


def train(cfg: Config, resume: str = "auto", live_progress: bool = False) -> LoopState:
    return Trainer(cfg, resume, live_progress=live_progress).fit()
