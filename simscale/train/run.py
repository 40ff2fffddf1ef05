"""`simscale train`: resolve the config on every rank, then run the loop."""
from __future__ import annotations

from simscale.config import build_config


def cli_main(args) -> int:
    cfg = build_config(args.preset, args.config, args.overrides)
    from simscale.train.loop import train

    train(cfg, resume=args.resume)
    return 0
