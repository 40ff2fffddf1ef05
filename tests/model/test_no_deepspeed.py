"""The model package knows nothing of DeepSpeed: ZeRO internals live in simscale/zero.py."""
import re
import subprocess
import sys
from pathlib import Path

from tests.distrun import ROOT, cpu_env

MODEL = Path(__file__).resolve().parents[2] / "simscale" / "model"


def test_importing_the_model_package_does_not_import_deepspeed():
    modules = sorted(f"simscale.model.{p.stem}" for p in MODEL.glob("*.py") if p.stem != "__init__")
    code = f"import sys; import {', '.join(modules)}; from simscale.model.sim import SIM; " \
           "print('deepspeed' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=cpu_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_model_sources_name_no_zero_internals():
    pattern = re.compile(r"import deepspeed|from deepspeed|\bds_(tensor|shape|id|numel|persist)\b")
    for path in MODEL.glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        assert not pattern.search(code), path.name
