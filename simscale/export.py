"""`simscale export`: a run's checkpoint -> a timm checkpoint (model.safetensors + config.json).

Works on a CPU and for any ZeRO stage and world size: the online encoder comes from DeepSpeed's
own consolidation of its fp32 partitions (`get_fp32_state_dict_from_zero_checkpoint`), the target
encoder from simscale's fp32 EMA shards. Names are already timm's (simscale's encoder is built
from timm's PatchEmbed/Block with timm's attribute names); the fixed sin-cos table becomes timm's
`pos_embed` (zero row for the class token). The files are written by timm's own `save_for_hf`,
and the result is loaded back strictly before we say it is done.

config.json: `architecture` is only the timm model class entry point; `model_args` (image size,
patch, width, depth, heads, final norm) is the shape of these weights, and `pretrained_cfg` is
SIM's preprocessing (input size, ImageNet mean/std, bicubic, crop 0.875), not the one of timm's
hub weights for that name. A `simscale` block says whether the shape is timm's standard one for
the name and how to load it by each route (README "Loading an export in timm").
"""
from __future__ import annotations

from pathlib import Path

import torch

from simscale.config import Config, from_dict
from simscale.data.photometric import MEAN, STD
from simscale.errors import CheckpointError, SimscaleError
from simscale.model.pos_embed import abs_pos_embed_2d
from simscale.train.checkpoint import Checkpointer, read_meta, tag_for
from simscale.train.rank_state import load_ema
from simscale.train.weights_only import loading_through_deepspeed
from simscale.train.ema import consolidate


def timm_model_args(cfg: Config) -> dict:
    m = cfg.model
    return {"img_size": m.img_size, "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
            "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": True, "class_token": True,
            "global_pool": m.pool, "final_norm": m.final_norm, "num_classes": 0}


def preprocessing(cfg: Config) -> dict:
    """SIM's eval preprocessing as timm data-config fields (what `resolve_data_config` should return)."""
    size = cfg.model.img_size
    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
            "mean": tuple(MEAN), "std": tuple(STD)}


def _shape(model) -> dict:
    return {"img_size": model.patch_embed.img_size[0], "patch_size": model.patch_embed.patch_size[0],
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
            "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim,
            "final_norm": not isinstance(model.norm, torch.nn.Identity)}


def shape_differences(arch: str, model) -> dict:
    """{field: (ours, timm's default)} where `model` differs from timm's default `arch`."""
    import timm

    with torch.device("meta"):  # no memory, even for ViT-g
        ref = timm.create_model(arch, pretrained=False, num_classes=0)
    ours, theirs = _shape(model), _shape(ref)
    return {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}


def loading_note(cfg: Config, differences: dict) -> dict:
    """The `simscale` block of config.json: what the names mean and how to load, for a human reader."""
    m = cfg.model
    shape = (f"{m.img_size} px input, patch {m.patch_size}, width {m.embed_dim}, depth {m.depth}, "
             f"{m.num_heads} heads, final_norm {m.final_norm}")
    if not differences:
        note = (f"timm's standard {m.arch} shape ({shape}) with SIM-pretrained weights; preprocessing is SIM's "
                "(pretrained_cfg), not that of timm's hub weights for this name.")
    else:
        diff = ", ".join(f"{k} {ours} (timm's {theirs})" for k, (ours, theirs) in differences.items())
        note = (f"NOT timm's standard {m.arch}: this model is {shape}; it differs in {diff}. 'architecture' only "
                "names the timm model class: pass model_args (and pretrained_cfg for SIM's preprocessing) whenever "
                "you load it, or use local-dir: which does both.")
    return {
        "note": note, "standard_shape": not differences, "preset": cfg.preset,
        "load": "timm.create_model('local-dir:DIR', pretrained=True)  (reads model_args and pretrained_cfg itself)",
        "load_by_file": "c = json.load(open('DIR/config.json')); timm.create_model(c['architecture'], pretrained=True, "
                        "pretrained_cfg_overlay={**c['pretrained_cfg'], 'file': 'DIR/model.safetensors'}, "
                        "**c['model_args'])",
        "load_by_checkpoint_path": "timm.create_model(c['architecture'], checkpoint_path='DIR/model.safetensors', "
                                   "pretrained_cfg_overlay=c['pretrained_cfg'], **c['model_args'])",
    }


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

        # quiet: it prints per-file progress
        with loading_through_deepspeed(lambda exc: f"DeepSpeed's files in '{tag_dir}' cannot be consolidated "
                                       f"({type(exc).__name__}); export another step with --step", quiet=True):
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
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
    data = preprocessing(cfg)
    pcfg = {"tag": f"simscale_sim_{tag}", **data, "license": None}
    note = loading_note(cfg, shape_differences(cfg.model.arch, model))
    save_for_hf(model, str(out), model_config={"pretrained_cfg": pcfg, "simscale": note}, model_args=args,
                data_config=data, safe_serialization=True)
    # Prove it: timm must load what we wrote, strictly, from the directory alone, with our preprocessing.
    from timm.data import resolve_data_config

    again = timm.create_model(f"local-dir:{out}", pretrained=True)
    for k, v in again.state_dict().items():
        if not torch.equal(v, model.state_dict()[k]):
            raise SimscaleError(f"timm reloaded '{k}' differently from what was written (a bug: please report it)")
    got = resolve_data_config({}, model=again)
    if any(tuple(got[k]) != tuple(v) if isinstance(v, tuple) else got[k] != v for k, v in data.items()):
        raise SimscaleError(f"timm resolves preprocessing {got} for '{out}', not SIM's {data} (a bug: please report it)")
    return out


def cli_main(args) -> int:
    from rich.console import Console

    out = export(args.run_dir, args.out, args.encoder, args.step, init=args.init)
    what = "random-init encoder (the run's init scheme and seed)" if args.init else f"{args.encoder} encoder"
    Console().print(f"wrote {out}/model.safetensors + config.json ({what}); load with "
                    f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
