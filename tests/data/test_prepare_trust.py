"""prepare trusts no shard it finds: --verify, resume checks sha256 and rebuilds what differs,
its workers die with it, and every tar member it does not take is listed in skipped.tsv."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import images
from simscale.cli import main
from simscale.data.prepare import Options, prepare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def src(tmp_path):
    return images.class_folders(tmp_path / "src", per_class=4)


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def flip(path, at=600, n=64):
    raw = bytearray(path.read_bytes())
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    path.write_bytes(bytes(raw))


def test_verify_names_each_bad_shard_and_exits_2(src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare([str(src)], out, Options(shard_size=3), workers=1, progress=False)
    assert main(["prepare", "--verify", str(out)]) == 0
    flip(out / "shard-000001.tar")
    (out / "shard-000003.tar").write_bytes((out / "shard-000003.tar").read_bytes()[:1000])
    capsys.readouterr()
    assert main(["prepare", "--verify", str(out)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    bad = [ln for ln in lines if ln.startswith("bad shard")]
    assert len(bad) == 2 and "shard-000001.tar" in bad[0] and "sha256" in bad[0] and "shard-000003.tar" in bad[1]
    assert main(["prepare", "--verify", str(tmp_path / "nowhere")]) == 2


def test_resume_rebuilds_a_damaged_shard_byte_identical(src, tmp_path):
    out = tmp_path / "out"
    opts = Options(shard_size=3)
    prepare([str(src)], out, opts, workers=1, progress=False)
    good = shard_bytes(out)
    manifest = json.loads((out / "manifest.json").read_text())
    flip(out / "shard-000002.tar")
    summary = prepare([str(src)], out, opts, workers=1, progress=False)
    assert summary["resumed_shards"] == 2  # shards 0 and 1 kept, 2 and 3 rebuilt
    assert shard_bytes(out) == good
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_tar_members_of_every_kind_are_listed_in_skipped_tsv(tmp_path):
    tar = tmp_path / "odd.tar"
    with tarfile.open(tar, "w") as tf:
        data = images.jpeg_bytes(images.variant(1, (64, 48)))
        info = tarfile.TarInfo("good.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind in (("sym.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE), ("fifo.jpg", tarfile.FIFOTYPE),
                           ("dev.jpg", tarfile.CHRTYPE), ("blk.jpg", tarfile.BLKTYPE), ("dir.jpg", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "good.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
    prepare([str(tar)], tmp_path / "out", Options(), workers=1, progress=False)
    rows = [ln.split("\t") for ln in (tmp_path / "out" / "skipped.tsv").read_text().splitlines()[1:]]
    reasons = {r[0].split("::")[1]: r[1] for r in rows}
    assert reasons == {"sym.jpg": "tar-symlink", "hard.jpg": "tar-hardlink", "fifo.jpg": "tar-fifo",
                       "dev.jpg": "tar-char-device", "blk.jpg": "tar-block-device", "dir.jpg": "tar-directory"}


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_pool_workers_die_with_a_killed_prepare(tmp_path):
    images.class_folders(tmp_path / "src", per_class=60)  # long enough to be killed mid-way
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "simscale", "prepare", str(tmp_path / "src"), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--shard-size", "5"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(workers := children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(workers) >= 2, "prepare never started its pool"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 10
        alive = workers
        while alive and time.time() < deadline:
            alive = [w for w in alive if Path(f"/proc/{w}").exists()
                     and "Z" not in Path(f"/proc/{w}/stat").read_text().split(")")[-1][:3]]
            time.sleep(0.1)
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in locals().get("alive", []):  # on failure: do not leave the orphans running
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
