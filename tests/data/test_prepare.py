"""`simscale prepare`: shards, manifest, skip report, hostile inputs, resume, determinism."""
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import images
from simscale.cli import main as cli_main
from simscale.data import prepare as prep
from simscale.data.prepare import Options, prepare
from simscale.data.shards import resolve_shards
from simscale.errors import DataError


def read_tar(path):
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            out[m.name] = tf.extractfile(m).read()
    return out


def samples_of(out_dir):
    res = {}
    for url in resolve_shards(str(out_dir)).urls:
        for name, data in read_tar(url).items():
            key, ext = name.rsplit(".", 1)
            res.setdefault(key, {})[ext] = data
    return res


def short(source):
    """'.../cat/a.jpg' -> 'cat/a.jpg'; '.../x.tar::m.jpg' -> 'tar:m.jpg'."""
    if "::" in source:
        return "tar:" + source.split("::")[1]
    return "/".join(source.split("/")[-2:])


def test_prepare_class_folders_hostile_files_and_tar(tmp_path):
    src = images.class_folders(tmp_path / "classes", per_class=2)
    fates = images.hostile(tmp_path / "classes" / "dog")
    evil = images.evil_tar(tmp_path / "evil.tar")
    out = tmp_path / "out"
    summary = prepare([str(src), str(evil)], out, Options(shard_size=4, max_pixels=50_000_000), workers=1,
                      progress=False)
    n_ok = 6 + sum(v == "ok" for v in fates.values()) + 2
    assert summary["written"] == n_ok
    man = json.loads((out / "manifest.json").read_text())
    assert man["total"] == n_ok and man["classes"] == ["cat", "dog", "rocket"]
    assert [s["samples"] for s in man["shards"]] == [4] * (n_ok // 4) + ([n_ok % 4] if n_ok % 4 else [])
    for s in man["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
    report = (out / "skipped.tsv").read_text().splitlines()[1:]
    reasons = {Path(line.split("\t")[0].split("::")[-1]).name: line.split("\t")[1] for line in report}
    for name, fate in fates.items():
        if fate == "ok":
            assert name not in reasons
        else:
            assert reasons[name] == fate, name
    assert reasons["evil.jpg"] == reasons["abs.jpg"] == "unsafe-tar-path"
    assert summary["skipped"]["unsafe-tar-path"] == 2
    samples = samples_of(out)
    by_source = {short(json.loads(s["json"])["source"]): s for s in samples.values()}
    for s in samples.values():  # every output is an RGB JPEG
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
    rot = Image.open(io.BytesIO(by_source["dog/rotated.jpg"]["jpg"]))
    assert rot.size == (375, 500)  # EXIF orientation applied
    assert by_source["cat/img000.jpg"]["cls"] == b"0" and by_source["dog/rgba.png"]["cls"] == b"1"
    assert by_source["tar:good1.jpg"]["cls"] == b"7"  # label from the source tar's .cls
    assert "cls" not in by_source["tar:sub/good2.jpg"]
    # A JPEG that is already fine keeps its exact bytes.
    assert by_source["cat/img001.jpg"]["jpg"] == (src / "cat" / "img001.jpg").read_bytes()


def test_max_side_downscales_shorter_side_and_pixel_limit(tmp_path):
    images.write_jpeg(tmp_path / "src" / "big.jpg", images.variant(1, (800, 600)))
    images.write_jpeg(tmp_path / "src" / "small.jpg", images.variant(2, (200, 150)))
    out = tmp_path / "out"
    summary = prepare([str(tmp_path / "src")], out, Options(max_side=300, max_pixels=300_000),
                      workers=1, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == {"too-many-pixels": 1}
    (s,) = samples_of(out).values()
    assert Image.open(io.BytesIO(s["jpg"])).size == (200, 150)
    summary = prepare([str(tmp_path / "src")], out, Options(max_side=300), workers=1, progress=False)
    sizes = sorted(Image.open(io.BytesIO(s["jpg"])).size for s in samples_of(out).values())
    assert sizes == [(200, 150), (400, 300)]


def test_output_is_deterministic_across_worker_counts(tmp_path):
    src = images.class_folders(tmp_path / "src", per_class=3)
    images.hostile(tmp_path / "src" / "cat")
    opts = Options(shard_size=3, shuffle=True, seed=5, max_side=256)
    prepare([str(src)], tmp_path / "a", opts, workers=1, progress=False)
    prepare([str(src)], tmp_path / "b", opts, workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar"))
    assert len(names) > 2
    for n in names + ["manifest.json", "skipped.tsv"]:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    prepare([str(src)], tmp_path / "c", Options(shard_size=3, shuffle=True, seed=6, max_side=256),
            workers=1, progress=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() != (tmp_path / "c" / "manifest.json").read_bytes()


def test_interrupted_run_leaves_no_whole_looking_shard_and_resumes(tmp_path, monkeypatch):
    src = images.class_folders(tmp_path / "src", per_class=4)
    opts = Options(shard_size=2)
    prepare([str(src)], tmp_path / "clean", opts, workers=1, progress=False)

    calls = {"n": 0}
    real_close = prep.ShardWriter.close

    def dying_close(self):
        calls["n"] += 1
        if calls["n"] == 3:  # die while the third shard is still a temp file
            raise KeyboardInterrupt
        real_close(self)

    out = tmp_path / "out"
    monkeypatch.setattr(prep.ShardWriter, "close", dying_close)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, opts, workers=1, progress=False)
    monkeypatch.setattr(prep.ShardWriter, "close", real_close)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert list(out.glob(".shard-*.tmp"))  # the half shard only exists under its temp name
    with pytest.raises(DataError):
        resolve_shards(str(out / "manifest.json"))

    summary = prepare([str(src)], out, opts, workers=1, progress=False)
    assert summary["resumed_shards"] == 2
    assert not list(out.glob("*.tmp"))
    for p in (tmp_path / "clean").iterdir():
        if not p.name.startswith("."):
            assert p.read_bytes() == (out / p.name).read_bytes(), p.name
    # Different options: a rebuild from scratch, not a resume.
    summary = prepare([str(src)], out, Options(shard_size=5), workers=1, progress=False)
    assert summary["resumed_shards"] == 0 and summary["shards"] == 3
    assert len(list(out.glob("shard-*.tar"))) == 3


def test_text_list_with_labels_and_bytes_limit(tmp_path):
    paths = [images.write_jpeg(tmp_path / f"i{k}.jpg", images.variant(k)) for k in range(5)]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n" + "".join(f"{p.name} {10 + k}\n" for k, p in enumerate(paths)))
    out = tmp_path / "out"
    one = paths[0].stat().st_size
    prepare([str(lst)], out, Options(shard_bytes=int(2.5 * one) + 6000), workers=1, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["total"] == 5 and len(man["shards"]) >= 2
    assert all(s["samples"] <= 2 for s in man["shards"])
    labels = sorted(int(s["cls"]) for s in samples_of(out).values())
    assert labels == [10, 11, 12, 13, 14]


def test_user_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare([str(tmp_path / "nope")], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        prepare([str(tmp_path / "empty")], tmp_path / "out", progress=False)
    images.write_jpeg(tmp_path / "src" / "a.jpg", images.variant(0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not writable"):
        prepare([str(tmp_path / "src")], tmp_path / "file" / "out", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "z.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images"):
        prepare([str(tmp_path / "bad")], tmp_path / "out2", workers=1, progress=False)


def test_cli_prepare(tmp_path, capsys):
    src = images.class_folders(tmp_path / "src", per_class=1)
    rc = cli_main(["prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert rc == 0 and (tmp_path / "out" / "manifest.json").is_file()
    assert cli_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def _labels_in_shard_order(out: Path) -> list[int]:
    labels = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            labels += [int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")]
    return labels


def test_class_folders_are_shuffled_by_default_and_kept_in_order_on_request(tmp_path):
    src = images.class_folders(tmp_path / "src", per_class=6)
    prepare([str(src)], tmp_path / "mixed", Options(shard_size=6, max_side=64), workers=1, progress=False)
    mixed = _labels_in_shard_order(tmp_path / "mixed")
    assert sorted(mixed) == [0] * 6 + [1] * 6 + [2] * 6
    # No shard of 6 is a one-class run, as it was with the sorted class folders.
    assert all(len(set(mixed[i:i + 6])) > 1 for i in range(0, 18, 6))
    assert cli_main(["prepare", str(src), "--out", str(tmp_path / "kept"), "--shard-size", "6",
                     "--max-side", "64", "--workers", "1", "--no-shuffle"]) == 0
    assert _labels_in_shard_order(tmp_path / "kept") == [0] * 6 + [1] * 6 + [2] * 6
