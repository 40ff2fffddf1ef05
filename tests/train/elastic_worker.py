"""Runs under torchrun (1 or 2 gloo ranks) for tests/train/test_elastic_resume.py.

    torchrun --nproc_per_node N -m tests.train.elastic_worker SHARDS OUT PHASE [PHASE ...]
PHASE `train`: per ZeRO stage (2, 3), a run `wN_zS` of STEPS steps at global batch GLOBAL, saved
every KILL steps (on 1 rank as 2 accumulated micro-batches). PHASE `resume:F`: per stage, a new run `wFtoN_zS` resumed from `wF_zS`'s step
KILL on this world size (same global batch): saved at once (the state just loaded, compared by
the test with the one it came from), then trained to STEPS. Also on resume: a model key change
must be refused. Everything else goes to stdout/stderr and the run directories.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from simscale.config import build_config
from simscale.errors import CheckpointError
from simscale.train.checkpoint import tag_for
from simscale.train.distributed import init_distributed
from simscale.train.loop import Trainer

STEPS, KILL, GLOBAL = 4, 2, 8
STAGES = (2, 3)


def make(shards: str, run_dir: Path, stage: int, resume: str, *over: str) -> Trainer:
    # drop_path 0: drop-path masks are drawn per rank, so 2 ranks x B and 1 rank x 2B could not
    # draw the same ones even with the same samples; everything else is deterministic on CPU fp32.
    cfg = build_config("tiny", overrides=[
        f"data.train={shards}", f"run.dir={run_dir}", "data.num_workers=0", f"optim.batch_size={GLOBAL // INFO.world_size}",
        f"optim.max_steps={STEPS}", f"run.save_every={KILL}", "run.keep_last=10", "log.every=1", "log.progress=false",
        "log.tensorboard=false", "model.drop_path=0", "optim.base_lr=2e-3", f"deepspeed.zero_stage={stage}", *over])
    return Trainer(cfg, resume=resume, dist_info=INFO)


def train(shards: str, out: Path) -> None:
    # one rank: the same global batch as 2 accumulated micro-batches of 4
    over = ["optim.batch_size=4", "optim.grad_accum=2"] if INFO.world_size == 1 else []
    for stage in STAGES:
        make(shards, out / f"w{INFO.world_size}_z{stage}", stage, "none", *over).fit()


def resume(shards: str, out: Path, source_world: int) -> None:
    refused = {}
    for stage in STAGES:
        source = out / f"w{source_world}_z{stage}" / "checkpoints" / tag_for(KILL)
        try:
            make(shards, out / f"refused_z{stage}", stage, str(source), "model.depth=3")
            refused[stage] = ""
        except CheckpointError as exc:
            refused[stage] = str(exc)
        # from 1 rank x 4 x 2 accumulated: 2 ranks x 2 x 2, the same micro-step global batch, so the
        # UniGrad statistics (over a micro-step's global batch) and the losses equal the run that stayed
        # from 2 ranks (0 workers): 1 rank x 8 read by 2 DataLoader workers (num_workers 0 -> 2)
        over = {(1, 2): ["optim.batch_size=2", "optim.grad_accum=2"],
                (2, 1): ["data.num_workers=2"]}.get((source_world, INFO.world_size), [])
        t = make(shards, out / f"w{source_world}to{INFO.world_size}_z{stage}", stage, str(source), *over)
        t.save()  # exactly what was loaded, in this world's layout
        t.fit()
    if INFO.is_main:
        (out / f"refused_from_w{source_world}.json").write_text(json.dumps(refused))


if __name__ == "__main__":
    shards, out = sys.argv[1], Path(sys.argv[2])
    INFO = init_distributed()
    for phase in sys.argv[3:]:
        if phase == "train":
            train(shards, out)
        else:
            resume(shards, out, int(phase.split(":")[1]))
