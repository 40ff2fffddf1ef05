"""Read an official SIM checkpoint without running anything from it.

The official code saves `{"model": state_dict, "optimizer", "epoch", "scaler", "args"}` with
`torch.save` (a pickle). `torch.load(weights_only=True)` builds tensors, containers and primitives;
beyond those only `argparse.Namespace` (the `args` entry: a plain attribute bag) is allowed. Any
other global (a planted `__reduce__`, a custom class) stops the load before anything is built.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from simscale.errors import CheckpointError

ALLOWED = [argparse.Namespace]


def read_official(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as plain data (`model` a name -> tensor dict), or one-line refusal."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist: pass the official .pth file (e.g. sim_base_1600ep_pretrain.pth)")
    try:
        with torch.serialization.safe_globals(ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        what = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(f"'{path}' holds more than tensors and plain data ({what[:160]}); it was refused "
                              "unread and nothing in it ran: use the official release file") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"'{path}' is not a readable torch checkpoint ({why}): "
                              "download it again") from None
    return obj if isinstance(obj, dict) else {"model": obj}


def model_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The `model` state dict (the official layout), or the checkpoint itself when it is a bare one."""
    sd = ckpt.get("model", ckpt)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)] if isinstance(sd, dict) else ["model"]
    if bad:
        raise CheckpointError(f"'{path}' has no state dict of tensors under 'model' (entry '{bad[0]}' is not a "
                              "tensor): pass the official release file")
    return sd


def describe_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The official argparse settings (when saved) that decide the architecture, for messages."""
    args = ckpt.get("args")
    keys = ("model", "decoder_embed_dim", "projector_depth", "predictor_depth", "use_proj_ln", "use_pred_ln",
            "online_ln", "init_values", "loss_type", "input_size", "global_pool", "nb_classes", "epoch")
    src = vars(args) if isinstance(args, argparse.Namespace) else {}
    return {k: src[k] for k in keys if k in src}
