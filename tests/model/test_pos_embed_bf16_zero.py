"""The fixed sin-cos tables are float32 and exact under `deepspeed.zero.Init` with bf16.

zero.Init (bf16) patches torch's tensor constructors (torch.arange, zeros, ...) to return the
compute dtype. Tables built from bf16 frequencies differ from the ones `simscale export`
rebuilds outside DeepSpeed (up to 7e-3 at grid 14): the exported encoder would not be the one
that trained. One real process (gloo, CPU accelerator), ZeRO-3 and ZeRO-2, bf16, ViT-B/16 widths;
the relative embedding (computed in the forward) and one bf16 training step are checked too.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distrun import cpu_env, free_port

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib
    import torch
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no g++ compile
    import deepspeed
    from simscale.config import build_config
    from simscale.model.pos_embed import abs_pos_embed_2d, relative_pos_embed
    from simscale.model.sim import SIM

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    # ViT-B/16 widths at grid 14 (where bf16 frequencies are off by ~7e-3), shallow to stay fast
    cfg = build_config("vit_b16", overrides=["model.depth=1", "model.projector_depth=0", "model.predictor_depth=1"])
    m = cfg.model
    grid = m.img_size // m.patch_size
    want_enc = abs_pos_embed_2d(grid, m.embed_dim)
    want_dec = abs_pos_embed_2d(grid, m.decoder_dim)
    geometry = torch.tensor([[0.13, -0.21, 0.83, 1.27, 1.0, 0.91], [0.02, 0.3, 1.6, 0.7, 0.0, 0.4]])
    want_rel = relative_pos_embed(geometry, m.decoder_dim, grid)
    for stage in (3, 2):
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}}
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds):
                probe = torch.arange(4, dtype=torch.float32)  # the patching this test is about
                assert probe.dtype == torch.bfloat16, probe.dtype
                model = SIM(cfg)
        else:
            model = SIM(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.online_parameters(), config=ds)
        mod = engine.module
        tables = {"online.encoder": mod.online.encoder.pos_embed[0, 1:], "predictor": mod.predictor.pos_embed[0]}
        if hasattr(mod, "target"):
            tables["target.encoder"] = mod.target.encoder.pos_embed[0, 1:]
        for name, t in tables.items():
            assert t.dtype == torch.float32, (stage, name, t.dtype)
            want = want_dec if name == "predictor" else want_enc
            err = (t - want).abs().max().item()
            assert torch.equal(t, want), f"ZeRO-{stage} {name}: max error {err:.2e} against the fp32 table"
        assert torch.all(mod.online.encoder.pos_embed[0, 0] == 0)
        # relative embedding, computed at run time inside the bf16 engine's forward
        seen = {}
        hook = mod.predictor.rel_proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("rel", args[0]))
        g = torch.Generator().manual_seed(0)
        a = torch.randn(2, 3, m.img_size, m.img_size, generator=g).bfloat16()
        b = torch.randn(2, 3, m.img_size, m.img_size, generator=g).bfloat16()
        mask = torch.zeros(2, grid * grid, dtype=torch.bool)
        mask[:, :round(cfg.data.mask.ratio * grid * grid)] = True  # the count SIM expects (60 %)
        loss, _ = mod.loss(engine(a, b, geometry, mask))
        hook.remove()
        torch.testing.assert_close(seen["rel"].float(), want_rel.bfloat16().float(), atol=0, rtol=0)
        engine.backward(loss)  # a bf16 step trains (the BatchNorm predictor mixes dtypes at ZeRO-2)
        engine.step()
        assert torch.isfinite(loss), loss
        print("STAGE_OK", stage)
    """
)


@pytest.mark.slow
def test_fixed_tables_are_fp32_exact_under_zero_init_bf16(tmp_path):
    script = tmp_path / "pos_bf16.py"
    script.write_text(SCRIPT)
    env = cpu_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240,
                          cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "STAGE_OK 2" in out, out[-4000:]
