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


def key(default: Any, meaning: str, range: str = "", choices: tuple[str, ...] = (), pair: bool = False) -> Any:
    """A config key, written once: its default, one-line meaning and allowed values. `range` is an
    interval ("[1, inf)", "(0, 1]"; every element of a tuple value lies in it), `choices` the
    strings a key accepts, `pair` a (low, high) pair that must be in order. `validate` checks them
    and `simscale info --keys` prints them (the type is the field's annotation)."""
    return field(default=default, metadata={"meaning": meaning, "range": range, "choices": choices, "pair": pair})


@dataclass
class ModelConfig:
    # Encoder: a timm ViT architecture name; the shape fields below override it so that any
    # preset (tiny included) is still a timm model that `timm.create_model` can rebuild.
    arch: str = key("vit_base_patch16_224", "timm ViT architecture name (the shape keys below override it)")
    img_size: int = key(224, "input resolution in pixels (square)", "[1, inf)")
    patch_size: int = key(16, "patch side in pixels", "[1, inf)")
    embed_dim: int = key(768, "encoder width", "[1, inf)")
    depth: int = key(12, "encoder blocks", "[1, inf)")
    num_heads: int = key(12, "encoder attention heads", "[1, inf)")
    mlp_ratio: float = key(4.0, "MLP hidden width / embed_dim", "(0, inf)")
    final_norm: bool = key(False, "the SIM release has no final encoder norm")
    freeze_patch_embed: bool = key(True, "MoCo-v3's trick, as in the release: the patch projection stays at init")
    drop_path: float = key(0.0, "stochastic depth rate of the online encoder", "[0, 1)")
    # Projector (Linear + blocks) and predictor (blocks + Linear), width D and heads of their own.
    decoder_dim: int = key(768, "projector/predictor width D", "[1, inf)")
    decoder_heads: int = key(16, "projector/predictor attention heads", "[1, inf)")
    projector_depth: int = key(2, "projector blocks", "[0, inf)")
    predictor_depth: int = key(4, "predictor blocks", "[0, inf)")
    decoder_norm: str = key("bn", '"bn" (BatchNorm over tokens, synced across ranks) or "ln"', choices=("bn", "ln"))
    # Off: only the class token and the view-B queries reach the predictor (an ablation,
    # bench/RESULTS.md "Learning at 32 px", issue 20).
    predictor_visible: bool = key(True, "the predictor's input holds the visible view-A tokens (the release)")
    # "ema": momentum target encoder (the method); "pixel": raw-pixel target ablation.
    target: str = key("ema", "'ema': momentum target encoder (the method); 'pixel': raw-pixel target ablation",
                      choices=("ema", "pixel"))
    # The exported representation (timm's global_pool): "token" (the class token; the release) or
    # "avg" (mean of the patch tokens). The online k-NN monitor uses the same.
    pool: str = key("token", "exported representation (timm global_pool): class token or mean of patch tokens",
                    choices=("token", "avg"))
    grad_checkpointing: bool = key(False, "activation checkpointing of the online encoder blocks")
    compile: bool = key(False, "torch.compile of the encoder blocks (ZeRO-0/1/2 only)")


@dataclass
class MaskConfig:
    ratio: float = key(0.6, "exact count per image: round(ratio * patches) (118 of 196 at 224/16)", "(0, 1)")
    min_block_patches: int = key(16, "smallest masked block, in patches", "[1, inf)")
    min_aspect: float = key(0.3, "aspect range is [min_aspect, 1/min_aspect]", "(0, 1]")


@dataclass
class DataConfig:
    train: str = key("", "manifest.json, a directory of shards, or a brace pattern of .tar files")
    mode: str = key("epoch", '"epoch": every sample once per epoch; "resampled": with replacement',
                    choices=("epoch", "resampled"))
    samples_per_epoch: int = key(0, "resampled mode: epoch length (0: the manifest's total)", "[0, inf)")
    num_workers: int = key(4, "data loader processes per rank", "[0, inf)")
    # The job's shuffle window: each of the data partitions shuffles in chunks of
    # ceil(shuffle_buffer / partitions) samples, so the job buffers about this many raw samples.
    shuffle_buffer: int = key(16384, "the job's shuffle window in raw samples (split over the partitions)", "[1, inf)")
    # Canonical partitions of the epoch's sample order (simscale/data/partitions.py): fixed for a
    # run so its data position is world-size free; 0 = chosen at the fresh start and recorded.
    partitions: int = key(0, "canonical partitions of the epoch's sample order; 0 = chosen at the fresh start",
                          "[0, inf)")
    # Exact-epoch mode: the samples of this many consecutive shards (of the epoch's random shard
    # order) alternate in the sample sequence, so every shuffle chunk mixes several shards.
    shard_interleave: int = key(8, "consecutive shards whose samples alternate (exact-epoch mode)", "[1, inf)")
    crop_scale: tuple[float, float] = key((0.08, 1.0), "random resized crop: area fraction (low, high)",
                                          "(0, 1]", pair=True)
    crop_ratio: tuple[float, float] = key((3 / 4, 4 / 3), "random resized crop: aspect ratio (low, high)",
                                          "(0, inf)", pair=True)
    color_aug: bool = key(True, "ablation switch: colour jitter/grayscale/blur/solarize off")
    # The recipe's colour jitter (applied with p=0.8 to both views, the four ops in random order)
    # and grayscale. Saturation, hue and grayscale teach invariance to colour itself, brightness
    # and contrast do not: separate strengths let a small-budget run keep colour (issue 20).
    color_jitter: tuple[float, float, float, float] = key(
        (0.4, 0.4, 0.2, 0.1), "colour jitter strengths (brightness, contrast, saturation, hue), torchvision's",
        "[0, inf)")
    grayscale_p: float = key(0.2, "probability of turning each view grey", "[0, 1]")
    # Gaussian blur sigma in pixels OF A 224 PX VIEW (the recipe's U(0.1, 2)); scaled by
    # model.img_size / 224 when drawn, so the blur's strength relative to the image is the same
    # at every resolution.
    blur_sigma: tuple[float, float] = key((0.1, 2.0), "Gaussian blur sigma (low, high), in pixels of a 224 px view",
                                          "[0, inf)", pair=True)
    # View B's solarize probability (the recipe's 0.2). Solarizing (x >= 128 -> 255 - x) a bright
    # object on a dark ground (Fashion-MNIST, MNIST) darkens most of it: bench/RESULTS.md, stop 33.
    solarize_b: float = key(0.2, "probability of solarizing view B (the target view)", "[0, 1]")
    same_view: bool = key(False, "ablation switch: view B is view A's crop (and flip)")
    # Unreadable samples (and the rest of a truncated shard) are replaced and counted; past this
    # fraction of a partition's samples in an epoch the run stops: the data set needs `prepare`.
    max_bad_fraction: float = key(0.01, "unreadable samples tolerated per partition and epoch before the run stops",
                                  "[0, 1]")
    mask: MaskConfig = field(default_factory=MaskConfig)
    # Shards behind a URL (http(s)://, s3://, gs://): see simscale/data/remote.py.
    io_retries: int = key(5, "consecutive transient failures (drop, timeout, 5xx) retried per read", "[0, inf)")
    io_timeout: float = key(60.0, "seconds a connect or a read may stall", "(0, inf)")
    cache_dir: str = key("", 'local cache of remote shards ("" streams them without a copy)')
    cache_gb: float = key(50.0, "bound of cache_dir; least recently used shards are evicted past it", "(0, inf)")


@dataclass
class OptimConfig:
    batch_size: int = key(64, "per rank, per micro-step", "[1, inf)")
    grad_accum: int = key(1, "micro-steps per optimizer step", "[1, inf)")
    epochs: float = key(1600, "training length in epochs (unless max_steps > 0)", "(0, inf)")
    warmup_epochs: float = key(40, "linear lr warmup in epochs (unless warmup_steps >= 0)", "[0, inf)")
    max_steps: int = key(0, "> 0 overrides epochs (tests, quick runs)", "[0, inf)")
    warmup_steps: int = key(-1, ">= 0 overrides warmup_epochs", "[-1, inf)")
    base_lr: float = key(6.25e-5, "per 256 images of global batch", "(0, inf)")
    lr: float = key(0.0, "0: derived once as base_lr * global_batch / 256 (logged at start)", "[0, inf)")
    min_lr: float = key(0.0, "lr at the end of the cosine decay", "[0, inf)")
    weight_decay: float = key(0.05, "AdamW weight decay at the start (matrices only)", "[0, inf)")
    weight_decay_end: float = key(0.05, "weight decay at the end (cosine)", "[0, inf)")
    betas: tuple[float, float] = key((0.9, 0.95), "AdamW betas", "[0, 1)")
    eps: float = key(1e-8, "AdamW epsilon", "(0, inf)")
    clip_grad: float = key(1.0, "global gradient-norm clip (0: off)", "[0, inf)")


@dataclass
class LossConfig:
    lam: float = key(0.02, "UniGrad's lambda", "[0, inf)")
    a_global: float = key(0.0, "paper variant weight of the global (per-image mean) term", "[0, inf)")
    a_dense: float = key(1.0, "weight of the dense term", "[0, inf)")
    center_dense: bool = key(False, "paper variant: dense term on per-image-centred tokens")


@dataclass
class EMAConfig:
    momentum: float = key(0.995, "m0; cosine to momentum_end over the run", "[0, 1]")
    momentum_end: float = key(1.0, "EMA momentum at the end of the run", "[0, 1]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = key(2, "DeepSpeed ZeRO stage 0-3", "[0, 3]")
    precision: str = key("bf16", '"bf16" or "fp32"', choices=("bf16", "fp32"))
    offload_optimizer: str = key("none", '"none" | "cpu" | "nvme"', choices=("none", "cpu", "nvme"))
    offload_param: str = key("none", '"none" | "cpu" | "nvme" (ZeRO-3 only)', choices=("none", "cpu", "nvme"))
    nvme_path: str = key("", "local NVMe directory for offload")
    config: str = key("", "optional DeepSpeed JSON to start from (batch sizes are always ours)")
    persistence_threshold: int = key(0, "ZeRO-3: 0 keeps no parameter gathered (EMA trap)", "[0, inf)")
    reduce_bucket_size: int = key(50_000_000, "gradient reduce bucket (elements)", "[1, inf)")
    prefetch_bucket_size: int = key(50_000_000, "ZeRO-3 parameter prefetch bucket (elements)", "[1, inf)")


@dataclass
class LogConfig:
    every: int = key(10, "steps between metric lines", "[1, inf)")
    tensorboard: bool = key(True, "write TensorBoard events beside metrics.jsonl")
    progress: bool = key(True, "progress on rank 0: a rich bar on a terminal, else a plain line per logged step")


@dataclass
class EvalConfig:
    """Online k-NN monitor: `simscale eval knn` on the live encoders every `every` steps."""
    every: int = key(0, "steps between evaluations (0: off); also once at the end of training", "[0, inf)")
    train: str = key("", "labelled shards (a `simscale prepare` output of class folders): the k-NN bank")
    val: str = key("", "labelled shards scored against the bank")
    k: int = key(20, "k-NN neighbours", "[1, inf)")
    temperature: float = key(0.07, "k-NN vote temperature", "(0, inf)")
    batch_size: int = key(256, "images per forward, per rank", "[1, inf)")
    max_samples: int = key(20000, "per split: the decoded images are kept in memory between evaluations", "[1, inf)")


@dataclass
class SpikeConfig:
    """Loss-spike rollback (train/spike.py; PaLM's procedure): a step is bad when its loss is not
    finite or exceeds `factor` x the running median of the last `window` good losses; `steps` bad
    steps in a row roll back to the last checkpoint before them and skip the data read since it."""
    enabled: bool = key(True, "roll back and skip the data window on a loss spike")
    factor: float = key(3.0, "a loss above factor x the running median of good losses is bad", "(1, inf)")
    steps: int = key(3, "consecutive bad steps that trigger a rollback", "[1, inf)")
    window: int = key(100, "good losses in the running median", "[1, inf)")
    min_history: int = key(20, "good losses needed before a loss can count as a spike (non-finite always counts)",
                           "[1, inf)")
    max_rollbacks: int = key(3, "rollbacks per run; one more spike stops the run with one line", "[0, inf)")


@dataclass
class RunConfig:
    dir: str = key("runs/sim", "run directory: config, checkpoints, metrics, report")
    seed: int = key(0, "seed of init, data order and augmentations", "[0, 4294967295]")
    save_every: int = key(1000, "steps; a checkpoint is also written at the end", "[1, inf)")
    save_every_minutes: float = key(0.0, "also checkpoint by wall time (0: off): bounds the work a failure loses",
                                    "[0, inf)")
    stop_file: str = key("", "a path: when it appears, every rank saves at the next step boundary and stops")
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    keep_last: int = key(3, "checkpoints kept (older ones deleted)", "[1, inf)")
    max_nonfinite_streak: int = key(10, "consecutive skipped steps before the run stops", "[1, inf)")
    # Seconds a rank waits in a collective for the others before the job ends with one line naming
    # the phase (a stopped or hung rank); must exceed the longest skew between ranks (a slow save).
    collective_timeout_s: int = key(600, "seconds a rank waits in a collective before the job ends with one line",
                                    "[5, 604800]")


@dataclass
class Config:
    preset: str = key("vit_b16", "the preset the run was built from (`--preset`; `simscale info` lists them)")
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


def _interval(text: str) -> tuple[float | None, float | None, bool, bool]:
    """"[1, inf)" -> (1, None, True, False): low, high (None = unbounded), each end inclusive?"""
    lo, hi = (t.strip() for t in text[1:-1].split(","))
    return (None if lo == "-inf" else float(lo), None if hi == "inf" else float(hi), text[0] == "[", text[-1] == "]")


def key_fields(obj: Any = None, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, its field, its type) of every config key, in declaration order."""
    cls = type(obj) if obj is not None else Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # a section
            out += key_fields(f.default_factory(), f"{prefix}{f.name}.")
        elif f.metadata:
            out.append((f"{prefix}{f.name}", f, hints[f.name]))
    return out


def key_table() -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed values, meaning) of every key: `simscale info --keys`."""
    rows = []
    for name, f, typ in key_fields():
        meta = f.metadata
        allowed = meta["range"] or " | ".join(meta["choices"])
        if meta["pair"]:
            allowed = f"{allowed}, low <= high"
        shown = list(f.default) if isinstance(f.default, tuple) else f.default
        rows.append((name, typ.__name__ if isinstance(typ, type) else str(typ), yaml.safe_dump(shown, default_flow_style=True).strip()
                     .removesuffix("\n...").strip(), allowed, meta["meaning"]))
    return rows


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_keys(cfg: Config) -> None:
    """Every key inside its declared range (finite), among its choices, (low, high) pairs in order."""
    import math

    for name, f, _ in key_fields():
        value, meta = _get(cfg, name), f.metadata
        if meta["range"]:
            lo, hi, lo_in, hi_in = _interval(meta["range"])
            for v in value if isinstance(value, tuple) else (value,):
                bad = not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and not lo_in))) \
                    or (hi is not None and (v > hi or (v == hi and not hi_in)))
                if bad:
                    left = "unbounded" if lo is None else f"{'[' if lo_in else '('}{lo:g}"
                    right = "inf)" if hi is None else f"{hi:g}{']' if hi_in else ')'}"
                    raise ConfigError(f"config key '{name}' must lie in {left}, {right}, got {v!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"config key '{name}' must be one of {', '.join(meta['choices'])}, got '{value}'")
        if meta["pair"] and value[0] > value[1]:
            low, high = value
            raise ConfigError(f"config key '{name}' is (low, high), got [{low:g}, {high:g}]: "
                              f"swap them, e.g. {name}=[{high:g},{low:g}]")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    _check_keys(cfg)
    if cfg.data.color_jitter[3] > 0.5:
        raise ConfigError(f"data.color_jitter's hue strength must be <= 0.5 (half a turn), got "
                          f"{cfg.data.color_jitter[3]:g}")
    m = cfg.model
    if m.pool == "avg" and m.final_norm:
        raise ConfigError("model.pool=avg needs model.final_norm=false (timm moves the norm to fc_norm)")
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
