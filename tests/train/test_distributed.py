"""GPUs present but unusable by torch: one line (DeviceError), never a silent CPU run."""
import pytest
import torch

from simscale.errors import DeviceError, SimscaleError
from simscale.train import distributed


@pytest.fixture
def gpus_visible(monkeypatch):
    monkeypatch.setattr(distributed, "visible_nvidia_gpus", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_driver_too_old_stops_with_its_reason(gpus_visible, monkeypatch):
    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).\nmore")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(DeviceError) as exc:
        distributed.init_distributed()  # stops before any process group is made
    msg = str(exc.value)
    assert isinstance(exc.value, SimscaleError) and "\n" not in msg
    assert "/dev/nvidia0" in msg and "driver on your system is too old" in msg and "DS_ACCELERATOR=cpu" in msg


def test_cpu_only_torch_on_a_gpu_machine(gpus_visible, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="CPU-only build"):
        distributed.check_cuda_usable()


@pytest.mark.parametrize("env", [{"DS_ACCELERATOR": "cpu"}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}])
def test_cpu_on_purpose_is_not_stopped(gpus_visible, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    distributed.check_cuda_usable()


def test_no_gpu_no_error(monkeypatch):
    monkeypatch.setattr(distributed, "visible_nvidia_gpus", lambda: [])
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    distributed.check_cuda_usable()


def test_torchrun_restarts_on_the_shared_store_are_named():
    """torchrun's agent shares one store with every attempt unless told not to (pytorch#135712)."""
    under = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    line = distributed.shared_store_restart_warning(under)
    assert line and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line and "\n" not in line
    assert distributed.shared_store_restart_warning({**under, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert distributed.shared_store_restart_warning({**under, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert distributed.shared_store_restart_warning({}) is None
