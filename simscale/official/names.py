"""Official `SiameseIMViT` state-dict names -> simscale's `SIM` names, with every tensor accounted for.

Official (models_sim.py, loss_type 'sim')        simscale (model/sim.py)
  patch_embed.proj.*, cls_token, blocks.N.*        online.encoder.{patch_embed.proj.*, cls_token, blocks.N.*}
  decoder_embed.*                                  online.projector.proj.*
  projector_decoder_blocks.N.*                     online.projector.blocks.N.*
  predictor_decoder_blocks.N.*, mask_token         predictor.blocks.N.*, predictor.mask_token
  decoder_pos_mlp.*, decoder_pred.*                predictor.rel_proj.*, predictor.head.*
  mm_patch_embed.*, mm_cls_token, mm_blocks.N.*    target.encoder.*   (the momentum branch = EMA target)
  mm_decoder_embed.*, mm_projector_decoder_blocks  target.projector.*
Inside projector/predictor blocks the official BatchNorm is wrapped (`PermuteBN`: `normK.bn.*`);
simscale's TokenBatchNorm is the norm itself (`normK.*`), statistics included.
Fixed tables: `pos_embed` and `decoder_pos_embed` (sin-cos, not trained) must equal simscale's own
tables (model/pos_embed.py), which it recomputes; they are checked, not loaded.
Not used: `mm_mask_token` (an EMA of the mask token that the official forward never reads: the
momentum branch has no predictor); reported, not loaded.
Anything else on either side (LayerScale `ls1.gamma` from --init_values, `student_norm` from
--online_ln, a final `norm`) has no counterpart, and the import stops naming it.
"""
from __future__ import annotations

import re

import torch

from simscale.config import Config
from simscale.errors import CheckpointError
from simscale.model.pos_embed import abs_pos_embed_2d

_BRANCH = (  # (official prefix, simscale prefix), the longer official prefixes first
    ("projector_decoder_blocks.", "projector.blocks."),
    ("decoder_embed.", "projector.proj."),
    ("patch_embed.", "encoder.patch_embed."),
    ("cls_token", "encoder.cls_token"),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
)
_ONLINE_ONLY = (
    ("predictor_decoder_blocks.", "predictor.blocks."),
    ("mask_token", "predictor.mask_token"),
    ("decoder_pos_mlp.", "predictor.rel_proj."),
    ("decoder_pred.", "predictor.head."),
)
FIXED = ("pos_embed", "decoder_pos_embed")
UNUSED = {"mm_mask_token": "the official forward never reads it (the momentum branch has no predictor)"}
_WRAPPED_BN = re.compile(r"\.(norm\d)\.bn\.")


def simscale_name(official: str) -> str | None:
    """The simscale SIM state-dict name of an official tensor, or None when it has no place."""
    if official in FIXED or official in UNUSED:
        return None
    branch, name = ("target.", official[3:]) if official.startswith("mm_") else ("online.", official)
    rules = [(src, dst) for src, dst in _ONLINE_ONLY] if branch == "online." else []
    rules += [(src, branch + dst) for src, dst in _BRANCH]
    for src, dst in rules:
        if name.startswith(src) if src.endswith(".") else name == src:
            return _WRAPPED_BN.sub(r".\1.", dst + name[len(src):])
    return None


def _hint(name: str) -> str:
    if ".ls1." in name or ".ls2." in name:
        return "LayerScale (official --init_values): simscale's blocks have none"
    if name.startswith("student_norm"):
        return "the official --online_ln prediction LayerNorm: simscale has none"
    if "encoder.norm." in name or name.startswith(("norm.", "mm_norm.")):
        return "a final encoder norm: set model.final_norm to match (the SIM release has none)"
    if ".bn." in name or "running_" in name or "num_batches_tracked" in name:
        return "BatchNorm here but LayerNorm in this model: set model.decoder_norm=bn"
    if "norm" in name:
        return "LayerNorm vs BatchNorm in the projector/predictor: set model.decoder_norm to match (release: bn)"
    if "blocks." in name:
        return "block count differs: set model.depth / model.projector_depth / model.predictor_depth to match"
    return "the model settings differ from the checkpoint's"


def map_pretrain(official: dict[str, torch.Tensor], cfg: Config, ours: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(simscale name -> fp32 tensor for every entry of `ours`, lines about what was not loaded).

    `ours` is simscale's SIM state dict (names and shapes: a meta-device model is enough). Raises
    one line naming the first tensor that is unmapped on either side or has another shape.
    """
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name, t in official.items():
        dst = simscale_name(name)
        if dst is None and name not in FIXED and name not in UNUSED:
            raise CheckpointError(f"official tensor '{name}' {list(t.shape)} has no place in simscale's SIM "
                                  f"({_hint(name)}); nothing was written")
        if dst is None:
            continue
        if dst not in ours:
            raise CheckpointError(f"official tensor '{name}' maps to '{dst}', which this model lacks "
                                  f"({_hint(name)}); nothing was written")
        if tuple(t.shape) != tuple(ours[dst].shape):
            raise CheckpointError(f"official tensor '{name}' is {list(t.shape)}, simscale's '{dst}' is "
                                  f"{list(ours[dst].shape)}: the --preset / model.* settings do not match the "
                                  "checkpoint (the ViT-B/16 release: --preset vit_b16); nothing was written")
        mapped[dst] = t.float() if t.is_floating_point() else t
        source[dst] = name
    missing = [k for k in ours if k not in mapped]
    if missing:
        raise CheckpointError(f"simscale's '{missing[0]}' has no tensor in the checkpoint ({_hint(missing[0])})"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; nothing was written")
    check_fixed_tables(official, cfg)
    notes = [f"not loaded: '{k}': {why}" for k, why in UNUSED.items() if k in official]
    notes += [f"checked, not loaded: '{k}' equals simscale's fixed sin-cos table" for k in FIXED if k in official]
    return mapped, notes


def fixed_table(grid: int, dim: int) -> torch.Tensor:
    """The official layout of a sin-cos table: [1, 1 + grid*grid, dim], zero row for the class token."""
    return torch.cat([torch.zeros(1, dim), abs_pos_embed_2d(grid, dim)]).unsqueeze(0)


def check_fixed_tables(official: dict[str, torch.Tensor], cfg: Config) -> None:
    m = cfg.model
    grid = m.img_size // m.patch_size
    for name, dim in (("pos_embed", m.embed_dim), ("decoder_pos_embed", m.decoder_dim)):
        if name not in official:
            raise CheckpointError(f"the checkpoint has no '{name}' (the fixed sin-cos table every SIM checkpoint "
                                  "holds): is it an official SIM pretraining checkpoint?")
        want = fixed_table(grid, dim)
        got = official[name].float()
        if got.shape != want.shape:
            raise CheckpointError(f"official '{name}' is {list(got.shape)}, simscale's table is {list(want.shape)}: "
                                  "model.img_size / patch_size / widths do not match the checkpoint")
        err = (got - want).abs().max().item()
        if err > 1e-5:
            raise CheckpointError(f"official '{name}' differs from simscale's sin-cos table by {err:.2e}: the "
                                  "checkpoint was not made with SIM's fixed position embedding")
