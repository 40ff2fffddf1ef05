"""`simscale export`: a run's checkpoint -> a timm checkpoint (model.safetensors + config.json).

Works on a CPU and for any ZeRO stage and world size: the online encoder comes from DeepSpeed's
own consolidation of its fp32 partitions (`get_fp32_state_dict_from_zero_checkpoint`), the target
encoder from simscale's fp32 EMA shards. Names are already timm's (simscale's encoder is built
from timm's PatchEmbed/Block with timm's attribute names); the fixed sin-cos table becomes timm's
`pos_embed` (zero row for the class token). The files are written by timm's own `save_for_hf`,
and the result is loaded back strictly before we say it is done.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from simscale.config import Config, from_dict
from simscale.data.photometric import MEAN, STD
from simscale.errors import CheckpointError, SimscaleError
from simscale.model.pos_embed import abs_pos_embed_2d
from simscale.train.checkpoint import Checkpointer, read_meta, tag_for
from simscale.train.rank_state import load_ema
from simscale.train.weights_only import weights_only_loads
from simscale.train.ema import consolidate


def timm_model_args(cfg: Config) -> dict:
    m = cfg.model
    return {"img_size": m.img_size, "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
            "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": True, "class_token": True,
            "global_pool": m.pool, "final_norm": m.final_norm, "num_classes": 0}


def _pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"'{run_dir}' has no checkpoints/ directory: is it a simscale run.dir?")
    if step is None:
        tag_dir = Checkpointer(run_dir, 0, 1, 1).find_resumable("auto")
        if tag_dir is None:
            raise CheckpointError(f"'{run_dir}' holds no complete checkpoint: train longer or check run.dir")
        return tag_dir
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    problem = Checkpointer(run_dir, 0, 1, 1).verify_content(tag_dir) if tag_dir.is_dir() else "it does not exist"
    if problem:
        raise CheckpointError(f"checkpoint for step {step} in '{run_dir}' is unusable: {problem}; "
                              "omit --step to export the newest complete one")
    return tag_dir


def encoder_state_dict(tag_dir: Path, encoder: str) -> dict[str, torch.Tensor]:
    """The chosen encoder's fp32 weights, keyed by simscale's encoder parameter names."""
    if encoder == "online":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            # it prints per-file progress; weights_only_loads: DeepSpeed's files cannot run code
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    weights_only_loads():
                full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a hostile or damaged file makes DeepSpeed raise
            raise CheckpointError(f"DeepSpeed's files in '{tag_dir}' cannot be consolidated ({type(exc).__name__}); "
                                  "export another step with --step") from None
        prefix = "online.encoder."
    else:
        ranks = int(read_meta(tag_dir)["world_size"])
        states = [load_ema(tag_dir, r) for r in range(ranks)]
        if not states or not states[0]["names"]:
            raise CheckpointError(f"'{tag_dir}' has no EMA target (pixel-target run?): export --encoder online")
        try:
            full = consolidate(states)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise CheckpointError(f"EMA state in '{tag_dir}' does not fit its own layout ({type(exc).__name__}): "
                                  "export another step with --step") from None
        prefix = "encoder."
    return {k[len(prefix):]: v.float().contiguous() for k, v in full.items() if k.startswith(prefix)}


def to_timm_state_dict(cfg: Config, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    m = cfg.model
    grid = m.img_size // m.patch_size
    sd = dict(enc)
    pe = torch.cat([torch.zeros(1, m.embed_dim), abs_pos_embed_2d(grid, m.embed_dim)])
    sd["pos_embed"] = pe.unsqueeze(0).float()
    return sd


def init_encoder_state_dict(cfg: Config) -> dict[str, torch.Tensor]:
    """A fresh encoder with the run's init scheme and seed: the random-init baseline for probes."""
    from simscale.model.sim import SIM

    torch.manual_seed(cfg.run.seed)
    return {k: v.float() for k, v in SIM(cfg).online.encoder.state_dict().items()}


def export(run_dir: str | Path, out: str | Path, encoder: str = "online", step: int | None = None,
           init: bool = False) -> Path:
    """Write the chosen encoder of a run (or, with init=True, a fresh random one) for timm."""
    run_dir, out = Path(run_dir), Path(out)
    tag_dir = _pick_checkpoint(run_dir, step)
    cfg = from_dict(read_meta(tag_dir)["config"])
    enc = init_encoder_state_dict(cfg) if init else encoder_state_dict(tag_dir, encoder)
    return write_timm(cfg, to_timm_state_dict(cfg, enc), out, tag="init" if init else encoder)


def write_timm(cfg: Config, sd: dict[str, torch.Tensor], out: Path, tag: str) -> Path:
    import timm
    from timm.models import save_for_hf

    args = timm_model_args(cfg)
    model = timm.create_model(cfg.model.arch, pretrained=False, **args)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SimscaleError(f"checkpoint does not map onto timm's {cfg.model.arch}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]} (a bug: please report it)")
    out.mkdir(parents=True, exist_ok=True)
    # Our preprocessing, not the one of timm's default weights for this architecture name.
    pcfg = {"tag": f"simscale_sim_{tag}", "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "crop_pct": 0.875, "crop_mode": "center", "license": None}
    save_for_hf(model, str(out), model_config={"pretrained_cfg": pcfg}, model_args=args, safe_serialization=True)
    # Prove it: timm must load what we wrote, strictly, from the directory alone.
    again = timm.create_model(f"local-dir:{out}", pretrained=True)
    for k, v in again.state_dict().items():
        if not torch.equal(v, model.state_dict()[k]):
            raise SimscaleError(f"timm reloaded '{k}' differently from what was written (a bug: please report it)")
    return out


def cli_main(args) -> int:
    from rich.console import Console

    out = export(args.run_dir, args.out, args.encoder, args.step, init=args.init)
    what = "random-init encoder (the run's init scheme and seed)" if args.init else f"{args.encoder} encoder"
    Console().print(f"wrote {out}/model.safetensors + config.json ({what}); load with "
                    f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
