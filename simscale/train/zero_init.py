"""`deepspeed.zero.Init` that leaves torch as it found it.

zero.Init patches torch process-wide while it builds a model straight into partitions: the tensor
constructors, `torch.Tensor.__new__`, `nn.Module.__init_subclass__`/`apply`, and, with DeepSpeed's
`memory_efficient_linear` (on by default), `torch.nn.functional.linear`, which DeepSpeed leaves
replaced after the context ("This will persist unless manually reset"). A leaked linear wrapper
reaches every later model in the process: on torch 2.11 the torch.compile'd blocks of an engine
built after a ZeRO-3 one got almost no weight gradient through it (issue 21). simscale switches the
replacement off in its DeepSpeed config (ds_config.py), and builds under `partitioned_init`, which
puts back whatever is still changed when the build is done.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# Every torch attribute DeepSpeed 0.19's zero.Init assigns (partition_parameters.py). The per-class
# `__init__`/`_apply` wrappers it puts back itself on exit, class by class.
PATCH_POINTS: tuple[tuple[Any, str], ...] = (
    (torch.nn.functional, "linear"), (torch.nn.functional, "embedding"),
    (torch, "tensor"), (torch, "empty"), (torch, "zeros"), (torch, "ones"), (torch, "full"),
    (torch, "arange"), (torch, "eye"), (torch, "randn"),
    (torch.Tensor, "__new__"), (torch.nn.Module, "__init_subclass__"), (torch.nn.Module, "apply"),
)
_ABSENT = object()  # not in the owner's own __dict__ (inherited)

Snapshot = dict[tuple[Any, str], Any]


def _label(owner: Any, attr: str) -> str:
    return f"{getattr(owner, '__name__', owner)}.{attr}"


def snapshot() -> Snapshot:
    """The raw values (the owner's own __dict__ entries, so classmethods compare by identity)."""
    return {(owner, attr): vars(owner).get(attr, _ABSENT) for owner, attr in PATCH_POINTS}


def changed_since(before: Snapshot) -> list[str]:
    now = snapshot()
    return [_label(*key) for key, value in before.items() if now[key] is not value]


def restore(before: Snapshot) -> list[str]:
    """Puts every patch point back to `before`; returns the ones that had changed."""
    changed = changed_since(before)
    for (owner, attr), value in before.items():
        if vars(owner).get(attr, _ABSENT) is value:
            continue
        if value is _ABSENT:
            delattr(owner, attr)
        else:
            setattr(owner, attr, value)
    return changed


@contextlib.contextmanager
def torch_left_as_found() -> Iterator[None]:
    before = snapshot()
    try:
        yield
    finally:
        restore(before)


@contextlib.contextmanager
def partitioned_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """`deepspeed.zero.Init(config_dict_or_path=ds_config)`, torch restored on exit."""
    import deepspeed

    with torch_left_as_found(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
