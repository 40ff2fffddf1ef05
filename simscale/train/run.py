"""`simscale train`: resolve the config on every rank, then run the loop."""
from __future__ import annotations

from simscale.config import build_config
from simscale.errors import SimscaleError


def cli_main(args) -> int:
    cfg = build_config(args.preset, args.config, args.overrides)
    raise SimscaleError(
        f"config for preset '{cfg.preset}' is valid, but the training loop is not built yet (issue 5)"
    )
