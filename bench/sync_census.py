"""Every device->host sync of a real `Trainer` step on a GPU, by the code that made it.

    python3 bench/sync_census.py SHARDS RUN_DIR PRESET [key=value ...]   # prints JSON

One process, world size 1, `Trainer.fit` for 6 steps with log.every=1000 (steps 0 and 5 log, 1-4
do not). During the non-logging steps torch's own detector runs (`torch.cuda.set_sync_debug_mode
("warn")`: a warning at every call that makes the host wait for the GPU: `.item()`, D2H copies,
`nonzero`, stream/device synchronize, ...). Each warning is attributed to the innermost frame of
simscale or deepspeed (else the innermost frame), so the census says whose code waits, which the CPU
test (tests/train/host_sync_worker.py, simscale's frames only) cannot: DeepSpeed's syncs show up
here too. On CPU (the rehearsal) there is no detector: the census runs and reports mode "cpu", 0.
"""
from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COUNTED = (1, 2, 3, 4)


def owner(stack: list[traceback.FrameSummary]) -> str:
    """'simscale/x.py:LINE fn' or 'deepspeed/...' of the innermost frame of either (a sync inside
    DeepSpeed called from simscale's loop is DeepSpeed's), else the innermost frame."""
    for fr in reversed(stack):
        for marker in ("/simscale/", "/deepspeed/"):
            if marker in fr.filename:
                return f"{marker[1:]}{fr.filename.split(marker, 1)[1]}:{fr.lineno} {fr.name}"
    fr = stack[-1]
    return f"{fr.filename}:{fr.lineno} {fr.name}"


def main() -> None:
    shards, run_dir, preset, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    from simscale.config import build_config
    from simscale.train.loop import Trainer

    cfg = build_config(preset, overrides=[f"data.train={shards}", f"run.dir={run_dir}", "optim.max_steps=6",
                                          "log.every=1000", "log.tensorboard=false", "log.progress=false",
                                          "run.save_every=1000", *extra])
    trainer = Trainer(cfg, resume="none")
    cuda = trainer.info.device.type == "cuda"
    current: dict = {"step": None}
    calls: dict[int, Counter] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if current["step"] is not None:
            where = owner(traceback.extract_stack()[:-1])
            calls.setdefault(current["step"], Counter())[f"{where}: {str(message)[:60]}"] += 1

    step = trainer.train_step

    def counted_step(*args, **kwargs):
        n = trainer.state.step
        current["step"] = n if n in COUNTED else None
        if cuda:
            torch.cuda.set_sync_debug_mode("warn" if n in COUNTED else "default")
        return step(*args, **kwargs)

    trainer.train_step = counted_step
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        state = trainer.fit()
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    per_step = {n: sum(calls.get(n, Counter()).values()) for n in COUNTED}
    every = Counter()
    for c in calls.values():
        every.update(c)
    by_owner = Counter()
    for k, v in every.items():
        by_owner[k.split("/", 1)[0] if k.startswith(("simscale", "deepspeed")) else "other"] += v
    print(json.dumps({"mode": "cuda" if cuda else "cpu", "preset": preset, "steps": state.step,
                      "non_logging_steps": list(COUNTED), "syncs_per_step": per_step,
                      "by_owner_total": dict(by_owner), "sites": dict(every.most_common(25))}))


if __name__ == "__main__":
    main()
