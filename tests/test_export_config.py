"""An export's config.json, read by real timm: every documented loading route gives SIM's
preprocessing, and a non-standard shape says so. Random-init weights (no training needed)."""
import json

import pytest
import timm
from timm.data import resolve_data_config

from simscale.config import build_config
from simscale.data.photometric import MEAN, STD
from simscale.export import init_encoder_state_dict, to_timm_state_dict, write_timm


def exported(preset, tmp_path):
    return exported_with(preset, tmp_path)


def exported_with(preset, tmp_path, *overrides):
    cfg = build_config(preset, overrides=list(overrides))
    out = write_timm(cfg, to_timm_state_dict(cfg, init_encoder_state_dict(cfg)), tmp_path / preset, tag="init")
    return cfg, out, json.loads((out / "config.json").read_text())


def routes(out, c):
    """The README's routes, written as the README writes them."""
    weights = str(out / "model.safetensors")
    return {
        "local-dir": timm.create_model(f"local-dir:{out}", pretrained=True),
        "pretrained_cfg_overlay": timm.create_model(c["architecture"], pretrained=True,
                                                    pretrained_cfg_overlay={**c["pretrained_cfg"], "file": weights},
                                                    **c["model_args"]),
        "checkpoint_path": timm.create_model(c["architecture"], checkpoint_path=weights,
                                             pretrained_cfg_overlay=c["pretrained_cfg"], **c["model_args"]),
    }


@pytest.mark.parametrize("preset", ["tiny", pytest.param("vit_s16", marks=pytest.mark.slow)])  # ViT-S: ~5 s each
def test_every_documented_route_resolves_sims_preprocessing(preset, tmp_path):
    cfg, out, c = exported(preset, tmp_path)
    size = cfg.model.img_size
    for route, model in routes(out, c).items():
        data = resolve_data_config({}, model=model)
        assert tuple(data["input_size"]) == (3, size, size), route
        assert tuple(data["mean"]) == MEAN and tuple(data["std"]) == STD, route  # ImageNet, not timm's 0.5
        assert (data["interpolation"], data["crop_pct"], data["crop_mode"]) == ("bicubic", 0.875, "center"), route
        assert model.patch_embed.patch_size == (cfg.model.patch_size,) * 2 and model.embed_dim == cfg.model.embed_dim


def test_a_non_standard_shape_says_so_in_config_json(tmp_path):
    _, _, c = exported("tiny", tmp_path)
    assert c["architecture"] == "vit_tiny_patch16_224"
    assert c["model_args"]["patch_size"] == 8 and c["model_args"]["embed_dim"] == 64
    note = c["simscale"]
    assert note["standard_shape"] is False
    assert note["note"].startswith("NOT timm's standard vit_tiny_patch16_224: this model is 32 px input, patch 8, "
                                   "width 64, depth 2")
    assert "local-dir:" in note["load"]


@pytest.mark.slow
def test_a_preset_without_the_final_norm_names_that_one_difference(tmp_path):
    _, _, c = exported("vit_s16", tmp_path)  # the SIM release has no final encoder norm; timm's ViT-S has one
    assert c["simscale"]["standard_shape"] is False
    assert "it differs in final_norm False (timm's True)." in c["simscale"]["note"]


@pytest.mark.slow
def test_timms_own_shape_is_called_standard(tmp_path):
    _, _, c = exported_with("vit_s16", tmp_path, "model.final_norm=true")
    assert c["simscale"]["standard_shape"] is True and c["simscale"]["note"].startswith("timm's standard")
