"""Counts device->host syncs that simscale's own code makes during non-logging train steps.

    python tests/train/host_sync_worker.py SHARDS RUN_DIR [key=value ...]   # prints JSON

One process, world size 1, the tiny preset on real shards, `Trainer.fit` for 5 steps (steps 0 and
4 log, 1-3 do not). Per step, from the start of its `train_step` to the start of the next one (so
fit's own body counts too), every call of a Tensor method that makes the host wait for the
device (`item`, `tolist`, `numpy`, `nonzero`, `cpu`, `__bool__`, `__float__`, `__int__`,
`__index__`, and `torch.nonzero/argwhere/masked_select/unique`) whose caller is a `simscale.*`
module is counted, except on the DataLoader's own host tensors (the batch as the stream yields
it: reading those never waits for the device).
- step 1: the photometric ops on the CPU's path (one image at a time, python-float parameters);
- step 2: on the accelerator's path (whole batch at once, per-image parameters as tensors);
- step 3: as step 2 plus one deliberate `float(loss)` from `simscale.train.loop`'s frame (the
  check that the counter sees a sync).
"""
from __future__ import annotations

import functools
import json
import sys
from collections import Counter

import torch

METHODS = ("item", "tolist", "numpy", "nonzero", "cpu", "__bool__", "__float__", "__int__", "__index__")
FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique")


class SyncCounter:
    def __init__(self):
        self.step: int | None = None  # the step being counted, None: not counting
        self.host: set[int] = set()  # ids of the stream's batch tensors
        self.calls: dict[int, Counter] = {}

    def _wrap(self, name, fn):
        counter = self

        def wrapper(*args, **kwargs):
            if counter.step is not None and not (args and id(args[0]) in counter.host):
                frame = sys._getframe(1)
                module = frame.f_globals.get("__name__", "")
                if module.startswith("simscale"):
                    counter.calls.setdefault(counter.step, Counter())[f"{module}:{frame.f_lineno} {name}"] += 1
            return fn(*args, **kwargs)

        return wrapper

    def install(self):
        for name in METHODS:
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        for name in FUNCTIONS:
            setattr(torch, name, self._wrap(f"torch.{name}", getattr(torch, name)))


def main() -> None:
    shards, run_dir, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    import simscale.data.photometric as photometric
    import simscale.train.loop as loop
    from simscale.config import build_config
    from simscale.train.loop import Trainer

    cfg = build_config("tiny", overrides=[f"data.train={shards}", f"run.dir={run_dir}", "data.num_workers=1",
                                          "optim.batch_size=4", "optim.max_steps=5", "log.every=1000",
                                          "log.tensorboard=false", "log.progress=false", "run.save_every=1000",
                                          *extra])
    counter = SyncCounter()
    trainer = Trainer(cfg, resume="none")
    batches = trainer._batches

    def recorded_batches():
        for batch in batches():
            counter.host |= {id(v) for v in batch.values() if isinstance(v, torch.Tensor)}
            yield batch

    trainer._batches = recorded_batches
    cpu_path = photometric.apply_photometric
    device_path = functools.partial(cpu_path, chunk=1 << 30)  # what an accelerator gets by default
    read_float = eval("lambda x: float(x)", vars(loop))  # a float() whose caller is simscale.train.loop
    step = trainer.train_step

    def counted_step(*args, **kwargs):
        n = trainer.state.step
        counter.step = n if n in (1, 2, 3) else None
        photometric.apply_photometric = cpu_path if n == 1 else device_path
        m = step(*args, **kwargs)
        if n == 3:
            read_float(m["loss"])
        return m

    trainer.train_step = counted_step
    counter.install()
    state = trainer.fit()
    names = {1: "cpu_path", 2: "device_path", 3: "injected"}
    print(json.dumps({"steps": state.step, "losses": len(state.losses),
                      **{names[k]: dict(counter.calls.get(k, {})) for k in names}}))


if __name__ == "__main__":
    main()
