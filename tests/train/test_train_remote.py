"""Training steps from shards behind HTTP (with a dropped connection mid-tar and 503 answers)
and S3 (moto's server): real `python -m simscale train` processes against servers on 127.0.0.1
started here; both runs see the same samples, so their per-step losses are identical."""
import json

import pytest

from tests.data.loopback import LoopbackHTTP, moto_s3
from tests.distrun import simscale_cli, tail

pytestmark = pytest.mark.slow


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_from_http_with_faults_and_from_s3_gives_the_same_losses(train_shards, tmp_path, monkeypatch):
    common = ["train", "--preset", "tiny", "--resume", "none", "optim.batch_size=4", "optim.max_steps=3",
              "data.num_workers=1", "log.tensorboard=false", "data.io_retries=3", "data.io_timeout=20"]
    with LoopbackHTTP(train_shards.parent) as http:
        http.fail_503 = 2
        http.drop_at["/shards/shard-000001.tar"] = 3000
        run = simscale_cli(common + [f"data.train={http.url}/shards", f"run.dir={tmp_path / 'http'}"], timeout=600)
        assert run.returncode == 0, tail(run)
        assert http.dropped and http.fail_503 == 0  # both faults happened and were retried
    import s3fs

    with moto_s3(monkeypatch):
        s3fs.S3FileSystem().put(str(train_shards), "bkt/shards", recursive=True)
        run = simscale_cli(common + ["data.train=s3://bkt/shards", f"run.dir={tmp_path / 's3'}"], timeout=600)
        assert run.returncode == 0, tail(run)
    a, b = losses(tmp_path / "http"), losses(tmp_path / "s3")
    assert len(a) == 3 and a == b
