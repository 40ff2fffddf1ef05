"""Resume on another number of ranks through DeepSpeed's universal checkpoint (real DeepSpeed, gloo).

Three launches build everything: 2 ranks train (ZeRO-2 and ZeRO-3), 1 rank resumes those and
trains its own, 2 ranks resume the 1-rank ones. Right after each resume the run saves; that
checkpoint (new world's layout) must hold exactly the online weights, Adam moments and EMA
target of the one it came from, and the run must go on to its last step with finite losses.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from simscale.errors import CheckpointError
from simscale.train.checkpoint import read_meta, tag_for, verify
from simscale.train.ema import consolidate
from simscale.train.rank_state import load_ema
from simscale.train.universal import prepare, source_of
from tests.distrun import ROOT, cpu_env, simscale_cli, tail, torchrun
from tests.train.elastic_worker import KILL, STAGES, STEPS

pytestmark = pytest.mark.slow
MOVES = [(2, 1), (1, 2)]


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    logs = {}
    for name, nproc, phases in (("w2", 2, ["train"]), ("w1", 1, ["resume:2", "train"]), ("w1to2", 2, ["resume:1"])):
        proc = torchrun(["tests.train.elastic_worker", str(train_shards), str(out), *phases], nproc=nproc, timeout=400)
        assert proc.returncode == 0, tail(proc)
        logs[name] = proc.stdout + proc.stderr
    return out, logs


def ds_to_universal(tag_dir, out_dir):
    """DeepSpeed's own converter, as a user runs it: no --inject_missing_state."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                           "--output_folder", str(out_dir), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, tail(proc)
    return out_dir


def universal_states(folder):
    """{param/state: value} of a universal folder: DeepSpeed's per-parameter fp32 weight and Adam moments."""
    found = {}
    for f in sorted((folder / "zero").glob("*/*.pt")):
        found[f"{f.parent.name}/{f.stem}"] = torch.load(f, weights_only=True)
    return found


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def ema_target(tag_dir):
    return consolidate([load_ema(tag_dir, r) for r in range(read_meta(tag_dir)["world_size"])])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("move", MOVES, ids=lambda m: f"{m[0]}to{m[1]}")
def test_resume_on_another_world_keeps_weights_moments_and_ema(runs, stage, move, tmp_path):
    out, logs = runs
    src_world, dst_world = move
    source = out / f"w{src_world}_z{stage}" / "checkpoints" / tag_for(KILL)
    resumed = out / f"w{src_world}to{dst_world}_z{stage}"
    resaved = resumed / "checkpoints" / tag_for(KILL)
    assert read_meta(source)["world_size"] == src_world and read_meta(resaved)["world_size"] == dst_world

    # online weights and Adam moments, per parameter, through DeepSpeed's converter: the source as the
    # resume converted it (in-process), the new world's checkpoint with the CLI as a user runs it
    assert (resumed / "universal" / source.name / "COMPLETE").is_file()
    before = universal_states(resumed / "universal" / source.name)
    after = universal_states(ds_to_universal(resaved, tmp_path / "u_after" / resaved.name))
    assert before.keys() == after.keys()
    assert any(k.endswith("/exp_avg_sq") for k in before) and any(k.startswith("online.") for k in before)
    for k, v in before.items():
        assert same(v, after[k]), k
    # the EMA target from simscale's fp32 slices, written in the other world's layout
    ema_before, ema_after = ema_target(source), ema_target(resaved)
    assert ema_before.keys() == ema_after.keys() and ema_before
    for k in ema_before:
        assert torch.equal(ema_before[k], ema_after[k]), k

    # training went on from step KILL + 1 to the end
    steps = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(KILL + 1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in steps)
    log = logs["w1" if dst_world == 1 else "w1to2"]
    assert f"resume changes: world size {src_world} -> {dst_world}" in log
    assert f"{source.name} was written by {src_world} ranks: converting it to DeepSpeed's universal" in log
    if dst_world == 1:
        assert "optim.batch_size 4 -> 8" in log and "data.num_workers 0 -> 2" in log
    else:
        assert "optim.batch_size 4 -> 2" in log


@pytest.mark.parametrize("src_world", [2, 1])
def test_a_model_change_is_refused_across_worlds(runs, src_world):
    out, _ = runs
    refused = json.loads((out / f"refused_from_w{src_world}.json").read_text())
    for stage in STAGES:
        msg = refused[str(stage)]
        assert "model.depth=2" in msg and "\n" not in msg


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("move", MOVES, ids=lambda m: f"{m[0]}to{m[1]}")
def test_losses_after_a_resize_equal_the_run_that_stayed(runs, stage, move):
    """2 x B for KILL steps then 1 x 2B (or the reverse) sees the same global batches as the run
    that stayed: per-step losses equal to float tolerance (drop_path 0, see elastic_worker)."""
    out, _ = runs
    src_world, dst_world = move
    stayed = {r["step"]: r["loss"] for r in metrics(out / f"w{src_world}_z{stage}") if "loss" in r}
    moved = {r["step"]: r["loss"] for r in metrics(out / f"w{src_world}to{dst_world}_z{stage}") if "loss" in r}
    for step in range(KILL + 1, STEPS + 1):
        assert moved[step] == pytest.approx(stayed[step], rel=1e-4, abs=1e-6), step


def test_universal_folders_resume_on_one_process(runs, train_shards, tmp_path):
    """`--resume DIR` takes simscale's own universal folder, and a bare one made by `ds_to_universal`
    (it leads back to its source checkpoint, whose model states it must match byte for byte)."""
    out, _ = runs
    source = out / "w2_z2" / "checkpoints" / tag_for(KILL)
    bare = ds_to_universal(source, tmp_path / "bare" / source.name)
    ours = out / "w2to1_z2" / "universal" / source.name
    for name, folder, batch in (("from_ours", ours, 8), ("from_bare", bare, 16)):
        proc = simscale_cli(["train", "--preset", "tiny", "--resume", str(folder), f"data.train={train_shards}",
                             "data.num_workers=0", f"optim.batch_size={batch}", f"optim.max_steps={KILL + 1}",
                             "log.every=1",
                             "log.tensorboard=false", "model.drop_path=0", "optim.base_lr=2e-3",
                             f"run.dir={tmp_path / name}"])
        assert proc.returncode == 0, tail(proc)
        assert [r["step"] for r in metrics(tmp_path / name) if "loss" in r] == [KILL + 1]
        if name == "from_bare":  # global batch 8 -> 16 (a multiple of the run's 8 data partitions): the
            # lr rule is applied again, and said so
            err = proc.stderr.replace("\n", "")
            assert f"is DeepSpeed's universal form of {source}" in err
            assert "global batch 8 -> 16, lr 6.250e-05 -> 1.250e-04 (the lr rule re-applied)" in err

    # a model states file that is not the source's: refused in one line, naming the folder
    victim = next(bare.glob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="differs from the one in it") as err:
        source_of(bare)
    assert "\n" not in str(err.value)


def test_a_finished_conversion_is_reused(runs, capfd):
    out, _ = runs
    udir = out / "w2to1_z3" / "universal" / tag_for(KILL)
    stamp = (udir / "COMPLETE").stat().st_mtime_ns
    again = prepare(out / "w2_z3" / "checkpoints" / tag_for(KILL), out / "w2to1_z3", rank=0)
    assert again == udir and (udir / "COMPLETE").stat().st_mtime_ns == stamp
    assert f"using its universal form in {udir}" in capfd.readouterr().err
    # a damaged file (same size) in the conversion: converted again, never loaded
    victim = next((udir / "zero").glob("*/exp_avg.pt"))
    raw = bytearray(victim.read_bytes())
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    victim.write_bytes(bytes(raw))
    prepare(out / "w2_z3" / "checkpoints" / tag_for(KILL), out / "w2to1_z3", rank=0)
    assert "converting it to DeepSpeed's universal" in capfd.readouterr().err
    assert verify(udir, content=True) is None


def test_a_conversion_that_cannot_be_written_is_one_line(runs, tmp_path):
    out, _ = runs
    (tmp_path / "universal").write_text("a file where the folder should go")
    with pytest.raises(CheckpointError, match="cannot convert .* resume on 2 ranks") as err:
        prepare(out / "w2_z2" / "checkpoints" / tag_for(KILL), tmp_path, rank=0)
    assert "\n" not in str(err.value)
