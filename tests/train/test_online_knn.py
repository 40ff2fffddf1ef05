"""The online k-NN monitor measures what `simscale eval knn` measures on the export."""
import json

import pytest

from simscale.eval.features import extract_features, load_encoder, pixel_features
from simscale.eval.knn import knn_top1
from simscale.export import export
from tests.distrun import simscale_cli, tail

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(train_shards, tmp_path_factory):
    """A 4-step world-1 run with the monitor every 2 steps, exported (online and target)."""
    root = tmp_path_factory.mktemp("knn_run")
    proc = simscale_cli(["train", "--preset", "tiny", "--resume", "none", f"run.dir={root / 'run'}",
                         f"data.train={train_shards}", "optim.batch_size=4", "optim.max_steps=4",
                         "data.num_workers=0", "eval.every=2", f"eval.train={train_shards}",
                         f"eval.val={train_shards}", "log.tensorboard=false"])
    assert proc.returncode == 0, tail(proc)
    for enc in ("online", "target"):  # in-process: the export CLI has its own tests (tests/test_export.py)
        export(root / "run", root / enc, encoder=enc)
    return root


def test_monitor_logs_the_curve_from_initialisation_to_the_last_step(run):
    records = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "knn_online_top1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0 <= r["knn_online_top1"] <= 100 and 0 <= r["knn_target_top1"] <= 100 and r["eval_time"] > 0


@pytest.mark.parametrize("encoder", ["online", "target"])
def test_monitor_equals_eval_knn_on_the_exported_encoder(run, train_shards, encoder):
    records = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "knn_online_top1" in r][-1]
    model = load_encoder(run / encoder)
    feats, labels = extract_features(model, str(train_shards), workers=0)
    assert 100 * knn_top1(feats, labels, feats, labels) == pytest.approx(last[f"knn_{encoder}_top1"], abs=1e-6)


@pytest.mark.parametrize("encoder", ["online", "target"])
def test_monitor_also_scores_the_other_readout_as_timm_pools_it(run, train_shards, encoder):
    """`model.pool` is exported; the other readout (class token / mean patch token) is monitored
    beside it and equals timm's other global_pool on the same export."""
    records = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "knn_online_top1" in r][-1]
    model = load_encoder(run / encoder)
    other = "avg" if model.global_pool == "token" else "token"
    model.reset_classifier(0, global_pool=other)
    feats, labels = extract_features(model, str(train_shards), workers=0)
    assert 100 * knn_top1(feats, labels, feats, labels) == pytest.approx(last[f"knn_{encoder}_{other}_top1"], abs=1e-6)


def test_raw_pixel_baseline_from_the_cli(train_shards):
    proc = simscale_cli(["eval", "knn", "--pixels", "--img-size", "32", "--train", str(train_shards),
                         "--val", str(train_shards)])
    assert proc.returncode == 0, tail(proc)
    feats, labels = pixel_features(str(train_shards), 32)
    assert feats.shape == (36, 3 * 32 * 32)
    assert f"{100 * knn_top1(feats, labels, feats, labels):.2f}" in proc.stdout


def test_monitor_logs_the_raw_pixel_baseline_once_at_step_0(run, train_shards):
    records = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_pixels_top1" in r] == [0]
    feats, labels = pixel_features(str(train_shards), 32)  # what `simscale eval knn --pixels` scores
    pixels = [r for r in records if "knn_pixels_top1" in r][0]["knn_pixels_top1"]
    assert pixels == pytest.approx(100 * knn_top1(feats, labels, feats, labels), abs=1e-6)


def test_eval_every_without_shards_is_one_line(tmp_path):
    proc = simscale_cli(["train", "--preset", "tiny", "eval.every=5", f"run.dir={tmp_path}"])
    assert proc.returncode == 2 and "eval.train" in proc.stderr and "Traceback" not in proc.stderr
