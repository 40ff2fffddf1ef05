"""SIM under DeepSpeed ZeRO-3 (1 gloo rank, CPU accelerator): zero.Init build, init, copy, step.

A real run: `deepspeed.zero.Init` partitions every parameter at construction, and the engine
gathers a module's own parameters only while that module's forward runs. The forward of the
partitioned model must equal the forward of a plain model holding the same (gathered) weights.
"""
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys
    import torch
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no g++ compile
    import deepspeed
    from simscale.config import build_config
    from simscale.model.sim import SIM

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = build_config("tiny")
    ds_config = {
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = SIM(cfg)
    params = list(model.parameters())
    assert all(hasattr(p, "ds_id") for p in params), "not partitioned"
    assert all(p.numel() == 0 for p in params if p.ds_numel > 0), "not partitioned"
    with deepspeed.zero.GatheredParameters(params):
        for name, po, pt in model.ema_pairs():
            assert torch.equal(po, pt), name
        state = {k: v.clone() for k, v in model.state_dict().items()}
        w = model.online.projector.proj.weight
        assert w.abs().max() > 0 and w.std() < 1.0, "init did not reach the partitioned weight"
    plain = SIM(cfg)
    plain.load_state_dict(state)

    g = torch.Generator().manual_seed(1)
    a, v = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    geometry = torch.tensor([[0.1, -0.2, 0.9, 1.2, 0.0, 0.7]] * 3)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i in range(3):
        mask[i, torch.randperm(16, generator=g)[:10]] = True
    ref_loss, _ = plain.loss(plain(a, v, geometry, mask))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.online_parameters(), config=ds_config)
    loss, _ = engine.module.loss(engine(a, v, geometry, mask))
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    engine.backward(loss)
    engine.step()
    loss2, _ = engine.module.loss(engine(a, v, geometry, mask))
    assert torch.isfinite(loss2) and not torch.equal(loss2.detach(), loss.detach())
    print("ZERO3_OK", float(loss), float(loss2))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sim_builds_and_trains_under_zero3_init(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_sim.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0 and "ZERO3_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
