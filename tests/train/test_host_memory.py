"""keep_freed_host_memory: a large block freed in one step is reused by the next, not re-faulted.

Run in a subprocess: the setting is process-wide and would change the rest of the test session.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from simscale.train.host_memory import keep_freed_host_memory

    def faults_per_step(steps=10):
        out = []
        for _ in range(steps):  # as DeepSpeed's step: small tensors, then a 128 MB flat copy, freed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            small = [torch.empty(1000) for _ in range(3)]
            flat = torch.empty(1 << 25).fill_(1.0)
            del flat
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    default = faults_per_step()
    applied = keep_freed_host_memory()
    print(json.dumps({"default": default, "applied": applied, "kept": faults_per_step()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_freed_block_is_reused_without_page_faults():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["applied"] is True
    # glibc default: every step maps the block afresh and faults it in again (32768 4 KiB pages; 64
    # if transparent huge pages are always on): no step is free of faults.
    assert min(r["default"][1:]) > 50, r
    # With the setting the freed block stays in the heap and most steps reuse it without a fault.
    # Not every step: a small block carved out of the freed big one (glibc's best fit) makes the
    # next big one grow the heap again now and then (seen in 2 of 10 runs at 6 steps), so the
    # check counts the fault-free steps instead of demanding all of them.
    reused = sum(f <= 10 for f in r["kept"][1:])
    assert reused >= len(r["kept"][1:]) // 2, r
