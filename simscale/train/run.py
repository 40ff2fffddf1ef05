"""`simscale train`: resolve the config on every rank, then run the loop."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from simscale.config import build_config
from simscale.errors import SimscaleError

# What a user's environment causes (full disk, permissions, a directory removed under the run),
# as opposed to a bug: these become one line naming the path and what is still intact.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.ENOTDIR,
               errno.EISDIR}


def live_progress() -> bool:
    """A live bar only on a terminal; SIMSCALE_NO_PROGRESS=1 asks for plain log lines anyway."""
    return sys.stderr.isatty() and os.environ.get("SIMSCALE_NO_PROGRESS", "0") != "1"


def cli_main(args) -> int:
    cfg = build_config(args.preset, args.config, args.overrides)
    from simscale.train.loop import train
    from simscale.train.watchdog import ends_job_on_failure

    from simscale.train.preemption import Stopped

    try:
        with ends_job_on_failure(cfg.run.collective_timeout_s):  # distributed: one line, the others end too
            _train(cfg, args, train)
    except Stopped as stop:  # an agreed preemption save: its line is printed (healing.py)
        return stop.code
    return 0


def _train(cfg, args, train) -> None:
    try:
        train(cfg, resume=args.resume, live_progress=live_progress())
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        from simscale.train.checkpoint import Checkpointer

        try:
            intact = Checkpointer(cfg.run.dir, 0, 1, 1).intact_line()
        except OSError:
            intact = f"checkpoints in '{Path(cfg.run.dir) / 'checkpoints'}' cannot be listed"
        where = f": '{exc.filename}'" if exc.filename else ""
        raise SimscaleError(f"{exc.strerror}{where} (run.dir '{cfg.run.dir}'); {intact}: fix it, then rerun "
                            "(--resume auto continues from the newest complete checkpoint)") from None
