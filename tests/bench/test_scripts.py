"""The bench shell scripts are shellcheck-clean (they run once, unattended, on a machine without a registry)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck")
def test_bench_scripts_are_shellcheck_clean():
    scripts = [str(ROOT / "bench" / s) for s in ("gpu.sh", "make_wheels.sh")]
    proc = subprocess.run(["shellcheck", "-s", "bash", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
