"""Runs under torchrun on 2 plain gloo ranks (no DeepSpeed): `Checkpointer.find_resumable` where
each rank sees its own directory, as ranks behind stale file-system caches do. Writes each
scenario's outcome on this rank to OUT/choice_rank{r}.json.

    torchrun --nproc_per_node 2 -m tests.train.choice_worker SCENARIOS_DIR OUT

SCENARIOS_DIR/NAME/rank{r}/ is what rank r sees (its run.dir); NAME/resume.json maps the rank to
the --resume argument it is given (relative paths are resolved from that rank's directory).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from simscale.errors import CheckpointError
from simscale.train.checkpoint import Checkpointer


def main(scenarios: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for case in sorted(p for p in scenarios.iterdir() if p.is_dir()):
        resume = json.loads((case / "resume.json").read_text())[str(rank)]
        os.chdir(case / f"rank{rank}")
        try:
            chosen = Checkpointer(".", rank, dist.get_world_size(), 3).find_resumable(resume)
            results[case.name] = {"chosen": chosen.name if chosen else None}
        except CheckpointError as exc:
            results[case.name] = {"error": str(exc)}
    (out / f"choice_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
