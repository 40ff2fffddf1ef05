"""One typed configuration for a simscale run: presets, YAML files and `a.b=c` overrides.

Why dataclasses and not a dict: a typo in a key or a wrong type must fail at start-up with one
line naming the key and the closest valid one, not three hours into a run.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simscale.errors import ConfigError


@dataclass
class ModelConfig:
    # Encoder: a timm ViT architecture name; the shape fields below override it so that any
    # preset (tiny included) is still a timm model that `timm.create_model` can rebuild.
    arch: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    final_norm: bool = False  # the SIM release has no final encoder norm
    freeze_patch_embed: bool = True  # MoCo-v3's trick, as in the release: the patch projection stays at init
    drop_path: float = 0.0
    # Projector (Linear + blocks) and predictor (blocks + Linear), width D and heads of their own.
    decoder_dim: int = 768
    decoder_heads: int = 16
    projector_depth: int = 2
    predictor_depth: int = 4
    decoder_norm: str = "bn"  # "bn" (BatchNorm over tokens, synced across ranks) or "ln"
    # "ema": momentum target encoder (the method); "pixel": raw-pixel target ablation.
    target: str = "ema"
    # The exported representation (timm's global_pool): "token" (the class token; the release) or
    # "avg" (mean of the patch tokens). The online k-NN monitor uses the same.
    pool: str = "token"
    grad_checkpointing: bool = False  # activation checkpointing of the online encoder blocks
    compile: bool = False  # torch.compile of the encoder blocks (ZeRO-0/1/2 only)


@dataclass
class MaskConfig:
    ratio: float = 0.6  # exact count per image: round(ratio * patches) (118 of 196 at 224/16)
    min_block_patches: int = 16
    min_aspect: float = 0.3  # aspect range is [min_aspect, 1/min_aspect]


@dataclass
class DataConfig:
    train: str = ""  # manifest.json, a directory of shards, or a brace pattern of .tar files
    mode: str = "epoch"  # "epoch": every sample once per epoch; "resampled": with replacement
    samples_per_epoch: int = 0  # resampled mode: epoch length (0: the manifest's total)
    num_workers: int = 4
    # The job's shuffle window: each of the data partitions shuffles in chunks of
    # ceil(shuffle_buffer / partitions) samples, so the job buffers about this many raw samples.
    shuffle_buffer: int = 16384
    # Canonical partitions of the epoch's sample order (simscale/data/partitions.py): fixed for a
    # run so its data position is world-size free; 0 = chosen at the fresh start and recorded.
    partitions: int = 0
    # Exact-epoch mode: the samples of this many consecutive shards (of the epoch's random shard
    # order) alternate in the sample sequence, so every shuffle chunk mixes several shards.
    shard_interleave: int = 8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_aug: bool = True  # ablation switch: colour jitter/grayscale/blur/solarize off
    # Gaussian blur sigma in pixels OF A 224 PX VIEW (the recipe's U(0.1, 2)); scaled by
    # model.img_size / 224 when drawn, so the blur's strength relative to the image is the same
    # at every resolution.
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    same_view: bool = False  # ablation switch: view B is view A's crop (and flip)
    # Unreadable samples (and the rest of a truncated shard) are replaced and counted; past this
    # fraction of a partition's samples in an epoch the run stops: the data set needs `prepare`.
    max_bad_fraction: float = 0.01
    mask: MaskConfig = field(default_factory=MaskConfig)
    # Shards behind a URL (http(s)://, s3://, gs://): see simscale/data/remote.py.
    io_retries: int = 5  # consecutive transient failures (drop, timeout, 5xx) retried per read
    io_timeout: float = 60.0  # seconds a connect or a read may stall
    cache_dir: str = ""  # local cache of remote shards ("" streams them without a copy)
    cache_gb: float = 50.0  # bound of cache_dir; least recently used shards are evicted past it


@dataclass
class OptimConfig:
    batch_size: int = 64  # per rank, per micro-step
    grad_accum: int = 1
    epochs: float = 1600
    warmup_epochs: float = 40
    max_steps: int = 0  # > 0 overrides epochs (tests, quick runs)
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs
    base_lr: float = 6.25e-5  # per 256 images of global batch
    lr: float = 0.0  # 0: derived once as base_lr * global_batch / 256 (logged at start)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class LossConfig:
    lam: float = 0.02  # UniGrad's lambda
    a_global: float = 0.0  # paper variant weight of the global (per-image mean) term
    a_dense: float = 1.0  # weight of the dense term
    center_dense: bool = False  # paper variant: dense term on per-image-centred tokens


@dataclass
class EMAConfig:
    momentum: float = 0.995  # m0; cosine to momentum_end over the run
    momentum_end: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "bf16"  # "bf16" or "fp32"
    offload_optimizer: str = "none"  # "none" | "cpu" | "nvme"
    offload_param: str = "none"  # "none" | "cpu" | "nvme" (ZeRO-3 only)
    nvme_path: str = ""
    config: str = ""  # optional DeepSpeed JSON to start from (batch sizes are always ours)
    persistence_threshold: int = 0  # ZeRO-3: 0 keeps no parameter gathered (EMA trap)
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000


@dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    tensorboard: bool = True
    progress: bool = True  # progress on rank 0: a rich bar on a terminal, else a plain line per logged step


@dataclass
class EvalConfig:
    """Online k-NN monitor: `simscale eval knn` on the live encoders every `every` steps."""
    every: int = 0  # steps between evaluations (0: off); also once at the end of training
    train: str = ""  # labelled shards (a `simscale prepare` output of class folders): the k-NN bank
    val: str = ""  # labelled shards scored against the bank
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # images per forward, per rank
    max_samples: int = 20000  # per split: the decoded images are kept in memory between evaluations


@dataclass
class RunConfig:
    dir: str = "runs/sim"
    seed: int = 0
    save_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_last: int = 3
    max_nonfinite_streak: int = 10  # consecutive skipped steps before the run stops
    # Seconds a rank waits in a collective for the others before the job ends with one line naming
    # the phase (a stopped or hung rank); must exceed the longest skew between ranks (a slow save).
    collective_timeout_s: int = 600


@dataclass
class Config:
    preset: str = "vit_b16"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Presets: overrides of the defaults above (which are the official ViT-B/16 SIM release recipe).

_VIT_B16: dict[str, Any] = {}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the quickstart: seconds per step on 2 cores.
    "tiny": {
        "model": {
            "arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 64,
            "depth": 2, "num_heads": 2, "decoder_dim": 64, "decoder_heads": 2,
            "projector_depth": 2, "predictor_depth": 2,
        },
        "data": {"num_workers": 1, "shuffle_buffer": 64, "mask": {"min_block_patches": 4}},
        "optim": {"batch_size": 8, "epochs": 10, "warmup_epochs": 1, "base_lr": 1.5e-4},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "log": {"every": 1},
        "run": {"save_every": 50},
    },
    "vit_s16": {
        "model": {
            "arch": "vit_small_patch16_224", "embed_dim": 384, "depth": 12, "num_heads": 6,
            "decoder_dim": 384, "decoder_heads": 12,
        },
    },
    "vit_b16": _VIT_B16,  # the release recipe: batch 4096, 1600 epochs, D=768, 16 heads
    # ViT-L/H, sized for one 80 GB GPU per rank (A100/H100 80 GB); `*_141g`: 141 GB (H200).
    # The rule (bench/RESULTS.md, "Presets for 80 and 141 GB"): pay for ZeRO-3 or recomputation
    # only when the model does not fit without them. Model states at ZeRO-2 (bf16 weights,
    # fp32 Adam + master, target bf16 + fp32 EMA master) are 3.4 GB (ViT-L) / 6.8 GB (ViT-H) on
    # 8 GPUs: ZeRO-3 would save at most 2.4 / 4.7 GB there, at the price of an all-gather of
    # every layer in forward and backward. Activations (bf16, 60% masking: the encoder sees
    # 79 / 103 tokens) are 97 / 181 MB per sample without checkpointing, so the per-GPU batch
    # is set to use at most half of 0.9 x memory by the model (it is an upper bound that misses
    # temporaries): ViT-L 256 x 97 MB = 25 GB (80 GB), 512 -> 50 GB (141 GB); ViT-H 128 x
    # 181 MB = 23 GB, 256 -> 46 GB. ViT-g keeps ZeRO-3 + checkpointing (states 10.9 GB on 8
    # GPUs; chosen before this rule was measured, not re-derived).
    "vit_l16": {
        "model": {
            "arch": "vit_large_patch16_224", "embed_dim": 1024, "depth": 24, "num_heads": 16,
        },
        "optim": {"batch_size": 256},
        "deepspeed": {"zero_stage": 2},
    },
    "vit_h14": {
        "model": {
            "arch": "vit_huge_patch14_224", "patch_size": 14, "embed_dim": 1280, "depth": 32,
            "num_heads": 16,
        },
        "optim": {"batch_size": 128},
        "deepspeed": {"zero_stage": 2},
    },
    "vit_g14": {
        "model": {
            "arch": "vit_giant_patch14_224", "patch_size": 14, "embed_dim": 1408, "depth": 40,
            "num_heads": 16, "mlp_ratio": 48 / 11, "decoder_dim": 1024, "grad_checkpointing": True,
        },
        "optim": {"batch_size": 8},
        "deepspeed": {"zero_stage": 3},
    },
}


# The 141 GB variants are the 80 GB presets with the batch the same rule gives at 141 GB.
PRESETS["vit_l16_141g"] = {**copy.deepcopy(PRESETS["vit_l16"]), "optim": {"batch_size": 512}}
PRESETS["vit_h14_141g"] = {**copy.deepcopy(PRESETS["vit_h14"]), "optim": {"batch_size": 256}}


# ---------------------------------------------------------------------------------------------
# Building, merging and checking.

def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (closest valid key: '{match[0]}')" if match else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check (and gently convert) one value against its declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' wants a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(typ):
            try:
                return _coerce(key, value, t)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' has the wrong type: {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(
        f"config key '{key}' wants {typ.__name__}, got {type(value).__name__} {value!r}"
    )


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance in place, checking every key and type."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in types_:
            options = [f"{prefix}{k}" for k in types_]
            raise ConfigError(f"unknown config key '{full}'{_closest(full, options)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, types_[key]))


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=c` -> {"a": {"b": c}}, the value read as YAML (so 3, 1e-4, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not text (not UTF-8): pass a YAML file to --config") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read ({exc.strerror}): check its permissions") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix its syntax") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' holds a {type(data).__name__}, not a mapping of keys "
                          "like 'optim: {batch_size: 64}'")
    return data or {}


def build_config(
    preset: str | None = None,
    yaml_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults <- preset <- YAML file <- `a.b=c` overrides, each checked key by key.

    The preset is `preset` (an explicit --preset), else the YAML file's `preset:` (a saved run
    config names its own), else vit_b16; an explicit one that disagrees with the file's is refused.
    """
    file_data = dict(load_yaml(yaml_file)) if yaml_file else {}
    file_preset = file_data.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"config file '{yaml_file}': preset must be a name like 'tiny', "
                          f"not {file_preset!r}")
    if preset and file_preset and preset != file_preset:
        raise ConfigError(f"--preset {preset} disagrees with 'preset: {file_preset}' in '{yaml_file}': "
                          "drop --preset or change the file")
    preset = preset or file_preset or "vit_b16"
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown preset '{preset}'{_closest(preset, list(PRESETS))}; "
            f"choose one of {', '.join(PRESETS)}"
        )
    cfg = Config(preset=preset)
    _merge(cfg, copy.deepcopy(PRESETS[preset]))
    _merge(cfg, file_data)
    for text in overrides or []:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


# Allowed range of every numeric key: (low, high, low inclusive, high inclusive); None = unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.img_size": (1, None, True, False), "model.patch_size": (1, None, True, False),
    "model.embed_dim": (1, None, True, False), "model.depth": (1, None, True, False),
    "model.num_heads": (1, None, True, False), "model.mlp_ratio": (0, None, False, False),
    "model.drop_path": (0, 1, True, False), "model.decoder_dim": (1, None, True, False),
    "model.decoder_heads": (1, None, True, False), "model.projector_depth": (0, None, True, False),
    "model.predictor_depth": (0, None, True, False),
    "data.samples_per_epoch": (0, None, True, False), "data.num_workers": (0, None, True, False),
    "data.shuffle_buffer": (1, None, True, False), "data.max_bad_fraction": (0, 1, True, True),
    "data.partitions": (0, None, True, False),
    "data.crop_scale": (0, 1, False, True), "data.crop_ratio": (0, None, False, False),
    "data.mask.ratio": (0, 1, False, False), "data.mask.min_block_patches": (1, None, True, False),
    "data.mask.min_aspect": (0, 1, False, True),
    "optim.batch_size": (1, None, True, False), "optim.grad_accum": (1, None, True, False),
    "optim.epochs": (0, None, False, False), "optim.warmup_epochs": (0, None, True, False),
    "optim.max_steps": (0, None, True, False), "optim.warmup_steps": (-1, None, True, False),
    "optim.base_lr": (0, None, False, False), "optim.lr": (0, None, True, False),
    "optim.min_lr": (0, None, True, False), "optim.weight_decay": (0, None, True, False),
    "optim.weight_decay_end": (0, None, True, False), "optim.betas": (0, 1, True, False),
    "optim.eps": (0, None, False, False), "optim.clip_grad": (0, None, True, False),
    "loss.lam": (0, None, True, False), "loss.a_global": (0, None, True, False),
    "loss.a_dense": (0, None, True, False),
    "ema.momentum": (0, 1, True, True), "ema.momentum_end": (0, 1, True, True),
    "deepspeed.zero_stage": (0, 3, True, True), "deepspeed.persistence_threshold": (0, None, True, False),
    "deepspeed.reduce_bucket_size": (1, None, True, False), "deepspeed.prefetch_bucket_size": (1, None, True, False),
    "log.every": (1, None, True, False),
    "data.shard_interleave": (1, None, True, False), "data.blur_sigma": (0, None, True, False),
    "eval.every": (0, None, True, False), "eval.k": (1, None, True, False),
    "eval.temperature": (0, None, False, False), "eval.batch_size": (1, None, True, False),
    "eval.max_samples": (1, None, True, False),
    "data.io_retries": (0, None, True, False), "data.io_timeout": (0, None, False, False),
    "data.cache_gb": (0, None, False, False),
    "run.seed": (0, 2**32 - 1, True, True), "run.save_every": (1, None, True, False),
    "run.keep_last": (1, None, True, False), "run.max_nonfinite_streak": (1, None, True, False),
    "run.collective_timeout_s": (5, 7 * 86400, True, True),
}
_ORDERED = ("data.crop_scale", "data.crop_ratio", "data.blur_sigma")  # (low, high) pairs


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_ranges(cfg: Config) -> None:
    """Every numeric key inside its range, finite, and (low, high) pairs in order: one line each."""
    import math

    for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
        value = _get(cfg, key)
        for v in value if isinstance(value, tuple) else (value,):
            bad = not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and not lo_in))) \
                or (hi is not None and (v > hi or (v == hi and not hi_in)))
            if bad:
                left = "unbounded" if lo is None else f"{'[' if lo_in else '('}{lo:g}"
                right = "inf)" if hi is None else f"{hi:g}{']' if hi_in else ')'}"
                raise ConfigError(f"config key '{key}' must lie in {left}, {right}, got {v!r}")
    for key in _ORDERED:
        low, high = _get(cfg, key)
        if low > high:
            raise ConfigError(f"config key '{key}' is (low, high), got [{low:g}, {high:g}]: "
                              f"swap them, e.g. {key}=[{high:g},{low:g}]")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    _check_ranges(cfg)

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(options)}, got '{value}'")

    m = cfg.model
    choice("model.decoder_norm", m.decoder_norm, ("bn", "ln"))
    choice("model.target", m.target, ("ema", "pixel"))
    choice("model.pool", m.pool, ("token", "avg"))
    if m.pool == "avg" and m.final_norm:
        raise ConfigError("model.pool=avg needs model.final_norm=false (timm moves the norm to fc_norm)")
    choice("data.mode", cfg.data.mode, ("epoch", "resampled"))
    choice("deepspeed.precision", cfg.deepspeed.precision, ("bf16", "fp32"))
    choice("deepspeed.offload_optimizer", cfg.deepspeed.offload_optimizer, ("none", "cpu", "nvme"))
    choice("deepspeed.offload_param", cfg.deepspeed.offload_param, ("none", "cpu", "nvme"))
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed.zero_stage' must be 0..3, got {cfg.deepspeed.zero_stage}")
    if cfg.model.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("model.compile=true needs deepspeed.zero_stage 0-2 (ZeRO-3 gathers parameters in "
                          "module hooks that torch.compile would break): set model.compile=false or zero_stage=2")
    if cfg.deepspeed.offload_param != "none" and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")
    if "nvme" in (cfg.deepspeed.offload_param, cfg.deepspeed.offload_optimizer) and not cfg.deepspeed.nvme_path:
        raise ConfigError("NVMe offload needs deepspeed.nvme_path=/local/nvme/dir")
    if m.img_size % m.patch_size:
        raise ConfigError(
            f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}"
        )
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.decoder_dim % m.decoder_heads:
        raise ConfigError(
            f"model.decoder_dim={m.decoder_dim} is not divisible by model.decoder_heads={m.decoder_heads}"
        )
    if m.embed_dim % 4 or m.decoder_dim % 4:
        raise ConfigError("model.embed_dim and model.decoder_dim must be multiples of 4 (2D sin-cos PE)")
    if not 0.0 < cfg.data.mask.ratio < 1.0:
        raise ConfigError(f"data.mask.ratio must lie in (0, 1), got {cfg.data.mask.ratio}")
    if cfg.optim.batch_size < 1 or cfg.optim.grad_accum < 1:
        raise ConfigError("optim.batch_size and optim.grad_accum must be >= 1")
    if not 0.0 <= cfg.ema.momentum <= 1.0 or not 0.0 <= cfg.ema.momentum_end <= 1.0:
        raise ConfigError("ema.momentum and ema.momentum_end must lie in [0, 1]")
    e = cfg.eval
    if e.every and not (e.train and e.val):
        raise ConfigError("eval.every > 0 needs labelled shards: set eval.train=DIR and eval.val=DIR "
                          "(`simscale prepare CLASS_FOLDERS --out DIR`)")


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (a saved run config), checking every key."""
    cfg = Config()
    _merge(cfg, copy.deepcopy(data))
    validate(cfg)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.optim.batch_size * cfg.optim.grad_accum * world_size


def resolve_lr(cfg: Config, world_size: int) -> tuple[Config, str]:
    """Apply the linear scaling rule once: lr = base_lr * global_batch / 256.

    Returns a new config with `optim.lr` set and the one-line explanation to log. An explicit
    `optim.lr` is kept as it is (and said so), never scaled a second time.
    """
    cfg = copy.deepcopy(cfg)
    gb = global_batch(cfg, world_size)
    if cfg.optim.lr > 0:
        return cfg, f"lr = {cfg.optim.lr:.3e} (set explicitly; global batch {gb}, no scaling)"
    cfg.optim.lr = cfg.optim.base_lr * gb / 256
    return cfg, f"lr = base_lr {cfg.optim.base_lr:.3e} x global batch {gb} / 256 = {cfg.optim.lr:.3e}"


def all_keys() -> list[str]:
    return _all_keys(Config())
