"""Helpers of the hostile-input tests: planted pickles that would leave a marker file if run."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs code: it writes `marker`. A test passes only if the marker never appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)})


def torch_bytes(marker: Path) -> bytes:
    """What a hostile .pt/.pth looks like: torch.save of a dict holding the payload next to a tensor."""
    buf = io.BytesIO()
    torch.save({"module": {"w": torch.zeros(2)}, "evil": Payload(marker)}, buf)
    return buf.getvalue()
