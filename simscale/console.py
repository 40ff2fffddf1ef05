"""The one way simscale makes a rich Console: styled on a terminal, plain text elsewhere.

Output that goes to a file, a pipe or a SLURM log (not a terminal) gets no escape codes (even
under FORCE_COLOR, which CI systems set for other tools) and no hard wrapping at 80 columns:
a message stays one line however long, so `grep` and a reader of the log see it whole.
"""
from __future__ import annotations

import sys

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        tty = False
    if tty:
        return Console(stderr=stderr)
    return Console(stderr=stderr, force_terminal=False, no_color=True, soft_wrap=True)
