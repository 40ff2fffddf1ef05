"""Two 'nodes' on loopback: two DeepSpeed launcher invocations (no-ssh, node ranks 0 and 1,
one process each) via launchers/multi_node.sh train one model; it is the same model that one
node with two processes trains (identical per-step losses), and the checkpoint has both ranks."""
import json
import subprocess

import pytest

from simscale.train.checkpoint import read_meta, tag_for
from tests.conftest import ZERO3_RECIPE
from tests.distrun import ROOT, cpu_env, free_port

pytestmark = pytest.mark.slow


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_train_the_same_model_as_one_node(train_shards, zero3_run, tmp_path):
    overrides = [f"data.train={train_shards}", *ZERO3_RECIPE]  # zero3_run: this recipe on one node, 2 processes
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launchers/multi_node.sh", *overrides], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=cpu_env(HOSTFILE=str(hostfile), NODE_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port, PRESET="tiny", RUN_DIR=str(tmp_path / "two_nodes")))
             for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]

    assert len(losses(zero3_run)) == 3 and losses(tmp_path / "two_nodes") == losses(zero3_run)
    meta = read_meta(tmp_path / "two_nodes" / "checkpoints" / tag_for(3))
    assert meta["world_size"] == 2
    assert (tmp_path / "two_nodes" / "checkpoints" / tag_for(3) / "simscale_rank00001.safetensors").is_file()
