"""`simscale train`: resolve the config on every rank, then run the loop."""
from __future__ import annotations

import os
import sys

from simscale.config import build_config


def live_progress() -> bool:
    """A live bar only on a terminal; SIMSCALE_NO_PROGRESS=1 asks for plain log lines anyway."""
    return sys.stderr.isatty() and os.environ.get("SIMSCALE_NO_PROGRESS", "0") != "1"


def cli_main(args) -> int:
    cfg = build_config(args.preset, args.config, args.overrides)
    from simscale.train.loop import train

    train(cfg, resume=args.resume, live_progress=live_progress())
    return 0
