"""The README's first command, shortened: real images -> shards -> SIM under the deepspeed
launcher on 2 CPU processes -> export to timm -> k-NN numbers (trained and random init)."""
import os
import re
import subprocess
import sys

import pytest

from simscale.data.fashion_mnist import DEFAULT_ROOT
from tests.distrun import ROOT, cpu_env, free_port

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").exists() and os.environ.get("CI") != "true",
                    reason="needs Debian's dataset-fashion-mnist (.ci/setup installs it; in CI it must be there)")
def test_quickstart_runs_end_to_end(tmp_path):
    env = cpu_env(WORK=str(tmp_path), PER_CLASS="20", VAL_PER_CLASS="10", STEPS="4", BATCH="8",
                  PYTHON=sys.executable, MASTER_PORT=str(free_port()), SIMSCALE_NO_PROGRESS="0")
    proc = subprocess.run(["bash", "launchers/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in out
    assert (tmp_path / "export" / "model.safetensors").is_file()
    top1 = [float(x) for x in re.findall(r"│\s+20 │\s+0\.07 │\s+([\d.]+) │", out)]
    assert len(top1) == 2 and all(0 <= x <= 100 for x in top1)
