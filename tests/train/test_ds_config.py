"""The DeepSpeed config is derived from ours: batch sizes, precision, ZeRO stage never disagree."""
import json

import pytest

from simscale.config import build_config, resolve_lr
from simscale.errors import ConfigError
from simscale.train.ds_config import build_ds_config


def cfg(*over):
    c, _ = resolve_lr(build_config("tiny", overrides=list(over)), world_size=4)
    return c


def test_batch_sizes_come_from_simscale():
    ds = build_ds_config(cfg("optim.batch_size=6", "optim.grad_accum=3"), world_size=4, on_cpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 72


def test_precision_clip_and_optimizer():
    c = cfg("deepspeed.precision=bf16", "optim.clip_grad=0.5")
    ds = build_ds_config(c, 4, on_cpu=True)
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    for on_cpu in (True, False):  # torch's fused AdamW, never a JIT-compiled FusedAdam
        params = build_ds_config(c, 4, on_cpu=on_cpu)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True


def test_zero3_keeps_no_persistent_params_by_default():
    ds = build_ds_config(cfg("deepspeed.zero_stage=3"), 4, on_cpu=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload_cpu", "zero3_offload_nvme"])
def test_shipped_templates_load(name):
    stage = json.load(open(f"ds_configs/{name}.json"))["zero_optimization"]["stage"]
    ds = build_ds_config(cfg(f"deepspeed.config=ds_configs/{name}.json", f"deepspeed.zero_stage={stage}"),
                         4, on_cpu=False)
    assert ds["zero_optimization"]["stage"] == stage


def test_template_batch_disagreement_is_an_error(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        build_ds_config(cfg(f"deepspeed.config={f}"), 4, on_cpu=True)


def test_template_stage_disagreement_is_an_error():
    with pytest.raises(ConfigError, match="zero_stage"):
        build_ds_config(cfg("deepspeed.config=ds_configs/zero3.json", "deepspeed.zero_stage=2"), 4, on_cpu=True)


def test_cpu_offload_config():
    ds = build_ds_config(cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                             "deepspeed.offload_param=cpu"), 4, on_cpu=True)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
