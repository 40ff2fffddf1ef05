"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` into class folders."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from simscale.data import fashion_mnist as fm
from simscale.errors import DataError

installed = pytest.mark.skipif(not (fm.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                               reason="apt-get install dataset-fashion-mnist")


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), a)


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((2, 3, 4)))
    data = gzip.open(tmp_path / "a.gz").read()[:-5]
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(data)
    with pytest.raises(DataError, match="truncated"):
        fm.read_idx(tmp_path / "b.gz")


def test_missing_package_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fm.load_split("test", root=tmp_path)


@installed
def test_real_test_split_has_10k_balanced_28x28_images():
    images, labels = fm.load_split("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert 0 < images.mean() < 255  # real pictures, not blank


@installed
def test_class_folders_sort_in_label_order(tmp_path):
    counts = fm.write_class_folders(tmp_path, split="test", per_class=3)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == list(fm.FOLDERS) and all(n == 3 for n in counts.values())
    images, labels = fm.load_split("test")
    first = sorted((tmp_path / fm.FOLDERS[9]).iterdir())[0]
    index = int(first.stem)
    assert labels[index] == 9
    assert np.array_equal(np.asarray(Image.open(first)), images[index])  # PNG is lossless


@installed
def test_command_line(tmp_path, capsys):
    assert fm.main(["--out", str(tmp_path), "--split", "test", "--per-class", "2"]) == 0
    assert "wrote 20 images" in capsys.readouterr().out
