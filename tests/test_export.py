"""`simscale export`: a ZeRO-3 checkpoint written by 2 ranks -> timm, on one CPU process.

timm must load the result strictly in all three of its ways (local directory, pretrained file
overlay, checkpoint_path), and timm's model must give the same features as simscale's own
encoder with the checkpoint's weights on the same real images. The run is tests/conftest.py's
`zero3_run` (3 steps, lr 1e-2), shared with tests/test_multinode.py.
"""
import contextlib
import io
import json

import numpy as np
import pytest
import timm
import torch

from simscale.config import from_dict
from simscale.data.photometric import MEAN, STD
from simscale.errors import CheckpointError
from simscale.export import export, timm_model_args
from simscale.model.sim import SIM
from simscale.train.checkpoint import read_meta, tag_for
from tests.conftest import load_images_module
from tests.distrun import simscale_cli, tail

pytestmark = pytest.mark.slow


def real_images(cfg, n=4):
    """Real photographs, resized to the model's input and normalised as training does."""
    images = load_images_module()
    side = (cfg.model.img_size,) * 2
    x = torch.stack([torch.from_numpy(np.array(images.variant(k).resize(side))).permute(2, 0, 1)
                     for k in range(n)]).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def simscale_encoder(run, encoder):
    """simscale's own encoder carrying the checkpoint's weights (online or EMA target)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = run / "checkpoints" / tag_for(3)  # the newest: what export picks
    cfg = from_dict(read_meta(tag)["config"])
    model = SIM(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    model.load_state_dict(sd, strict=True)
    if encoder == "target":
        from simscale.export import encoder_state_dict

        model.target.encoder.load_state_dict(encoder_state_dict(tag, "target"), strict=True)
        return cfg, model.target.encoder.eval()
    return cfg, model.online.encoder.eval()


@pytest.mark.parametrize("encoder", ["online", "target"])
def test_timm_loads_strictly_and_gives_the_same_features(zero3_run, tmp_path, encoder):
    out = export(zero3_run, tmp_path / encoder, encoder=encoder)
    cfg, ours = simscale_encoder(zero3_run, encoder)
    x = real_images(cfg)
    with torch.no_grad():
        expected = ours(x)
        args = timm_model_args(cfg)
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        c = json.loads((out / "config.json").read_text())  # the README's routes
        assert c["model_args"] == {**args, "img_size": [cfg.model.img_size] * 2, "in_chans": 3}
        by_overlay = timm.create_model(c["architecture"], pretrained=True, **c["model_args"],
                                       pretrained_cfg_overlay={**c["pretrained_cfg"],
                                                               "file": str(out / "model.safetensors")}).eval()
        by_path = timm.create_model(c["architecture"], checkpoint_path=str(out / "model.safetensors"),
                                    pretrained_cfg_overlay=c["pretrained_cfg"], **c["model_args"]).eval()
        for model in (by_dir, by_overlay, by_path):
            got = model.forward_features(x)
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
            assert model.forward(x).shape == (x.shape[0], cfg.model.embed_dim)  # no head: features out
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["mean"] == list(MEAN)
    assert config["model_args"]["final_norm"] is False


def test_online_and_target_differ_after_training(zero3_run, tmp_path):
    on = timm.create_model(f"local-dir:{export(zero3_run, tmp_path / 'on')}", pretrained=True)
    tg = timm.create_model(f"local-dir:{export(zero3_run, tmp_path / 'tg', encoder='target')}", pretrained=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(on.state_dict().values(), tg.state_dict().values())]
    assert max(diffs) > 0


def test_export_cli_and_errors(zero3_run, tmp_path):
    ok = simscale_cli(["export", str(zero3_run), "--out", str(tmp_path / "cli"), "--step", "3"])
    assert ok.returncode == 0, tail(ok)
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    missing = simscale_cli(["export", str(zero3_run), "--out", str(tmp_path / "x"), "--step", "7"])
    assert missing.returncode == 2 and "step 7" in missing.stderr and "Traceback" not in missing.stderr
    with pytest.raises(CheckpointError, match="no checkpoints"):
        export(tmp_path, tmp_path / "y")
