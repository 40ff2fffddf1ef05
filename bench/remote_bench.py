"""Two-view samples/s per core: TwoViewStream reading shards from a loopback HTTP server vs local disk.

Same shards (real photographs, written by `simscale prepare`), same stream (num_workers=0: tar
read, decode, two crops, mask, parameter draws, collate), rounds interleaved. The HTTP server
(tests/data/loopback.py: Range support, keep-alive) runs in its own process, so the figures are
the reader's cost: samples per second of wall time and per CPU-second of the reading process
(its fsspec/aiohttp I/O thread included).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))
import images  # noqa: E402

from simscale.config import build_config  # noqa: E402
from simscale.data.prepare import Options, prepare  # noqa: E402
from simscale.data.stream import TwoViewStream  # noqa: E402

SIZES = [(500, 375), (500, 375), (800, 600), (1200, 900)]
SERVER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from loopback import LoopbackHTTP
with LoopbackHTTP(sys.argv[1]) as srv:
    print(srv.url, flush=True)
    sys.stdin.read()
"""


def bench(train: str, batch: int) -> tuple[float, float]:
    cfg = build_config("vit_b16", overrides=[f"data.train={train}", "data.num_workers=0",
                                             f"optim.batch_size={batch}", "data.shuffle_buffer=64"])
    stream = TwoViewStream(cfg)
    n = 0
    t, c = time.perf_counter(), time.process_time()
    for b in stream.batches(epoch=0):
        n += b["view_a"].shape[0]
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for k in range(args.images):
            images.write_jpeg(src / f"{k:05d}.jpg", images.variant(k, SIZES[k % len(SIZES)]))
        out = Path(tmp) / "shards"
        prepare([str(src)], out, Options(shard_size=32), workers=1, progress=False)
        shard_bytes = int(np.mean([p.stat().st_size for p in out.glob("*.tar")]))
        server = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(ROOT / "tests" / "data")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().strip() + "/shards"
            runs = {k: [] for k in ("local_wall", "local_cpu", "http_wall", "http_cpu")}
            for _ in range(args.rounds):
                for name, train in (("local", str(out)), ("http", url)):
                    wall, cpu = bench(train, args.batch)
                    runs[f"{name}_wall"].append(wall)
                    runs[f"{name}_cpu"].append(cpu)
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    res = {"images": args.images, "batch": args.batch, "rounds": args.rounds, "shard_bytes_mean": shard_bytes}
    for k, v in runs.items():
        res[f"{k}_samples_per_s"] = float(np.median(v))
        res[f"{k}_all_rounds"] = [round(x, 1) for x in v]
    res["ratio_http_vs_local_per_cpu_s"] = res["http_cpu_samples_per_s"] / res["local_cpu_samples_per_s"]
    res["ratio_http_vs_local_wall"] = res["http_wall_samples_per_s"] / res["local_wall_samples_per_s"]
    for k, v in res.items():
        print(f"{k:34s} {v:10.3f}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
