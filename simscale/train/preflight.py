"""What `simscale train` checks before torch and DeepSpeed load: the local shard paths and an explicit
resume directory. Loading them takes seconds on an idle machine and tens of seconds on a loaded one,
so a typo in a path would otherwise cost that much before its one-line error. The same checks run
again where the paths are used (remote locations only there: reaching them needs the I/O settings).
"""
from __future__ import annotations

from pathlib import Path

from simscale.config import Config
from simscale.data.shards import resolve_shards
from simscale.errors import CheckpointError, DataError


def check_paths(cfg: Config, resume: str) -> None:
    """Raises the one-line error a missing local path would raise later, naming its config key."""
    specs = [("data.train", cfg.data.train)]
    if cfg.eval.every:
        specs += [("eval.train", cfg.eval.train), ("eval.val", cfg.eval.val)]
    for key, spec in specs:
        if spec and "://" not in spec:
            try:
                resolve_shards(spec)
            except DataError as exc:
                raise DataError(f"{key}: {exc}") from None
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise CheckpointError(f"--resume '{resume}' not found: pass a checkpoint directory (RUN_DIR/checkpoints/"
                              "step_N), 'auto' (the newest complete one in run.dir) or 'none'")
