"""Official SIM names and shapes -> simscale: every tensor accounted for, refusals name the tensor."""
import pytest
import torch

from simscale.config import build_config
from simscale.errors import CheckpointError
from simscale.official.cli import simscale_shapes
from simscale.official.names import map_pretrain, simscale_name

from tests.official.official_format import MICRO, VIT_B, pretrain_state


def test_vit_b_release_names_and_shapes_map_one_to_one():
    official = pretrain_state(VIT_B, meta=True)  # ViT-B shapes, no memory (no forward needed)
    cfg = build_config("vit_b16")
    ours = simscale_shapes(cfg)
    mapped, notes = map_pretrain(official, cfg, ours)
    assert sorted(mapped) == sorted(ours)  # every simscale tensor filled
    used = {simscale_name(k) for k in official} - {None}
    assert used == set(ours)  # ... each by exactly one official tensor
    assert len(official) == len(ours) + 3  # + pos_embed, decoder_pos_embed (checked), mm_mask_token (unused)
    assert any("mm_mask_token" in n for n in notes) and sum("checked" in n for n in notes) == 2
    for off, ss in [("mm_blocks.11.attn.qkv.weight", "target.encoder.blocks.11.attn.qkv.weight"),
                    ("mm_projector_decoder_blocks.1.norm2.bn.running_var", "target.projector.blocks.1.norm2.running_var"),
                    ("projector_decoder_blocks.0.norm1.bn.num_batches_tracked",
                     "online.projector.blocks.0.norm1.num_batches_tracked"),
                    ("predictor_decoder_blocks.3.mlp.fc2.bias", "predictor.blocks.3.mlp.fc2.bias"),
                    ("decoder_pos_mlp.weight", "predictor.rel_proj.weight"), ("decoder_pred.bias", "predictor.head.bias"),
                    ("mask_token", "predictor.mask_token"), ("mm_cls_token", "target.encoder.cls_token"),
                    ("decoder_embed.weight", "online.projector.proj.weight"),
                    ("mm_patch_embed.proj.weight", "target.encoder.patch_embed.proj.weight")]:
        assert simscale_name(off) == ss
        assert tuple(official[off].shape) == tuple(ours[ss].shape)


@pytest.mark.parametrize("change, expect", [
    (lambda sd: sd.pop("mm_blocks.1.mlp.fc1.bias"), "'target.encoder.blocks.1.mlp.fc1.bias' has no tensor"),
    (lambda sd: sd.update({"blocks.0.ls1.gamma": torch.ones(64)}), "'blocks.0.ls1.gamma'"),
    (lambda sd: sd.update({"student_norm.weight": torch.ones(64)}), "'student_norm.weight' [64] has no place"),
    (lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(64)}), "'blocks.2.norm1.weight' maps to"),
    (lambda sd: sd.update({"decoder_pred.weight": torch.ones(32, 64)}), "'decoder_pred.weight' is [32, 64]"),
    (lambda sd: sd["pos_embed"].mul_(2), "'pos_embed' differs from simscale's sin-cos table"),
])
def test_missing_extra_or_misshapen_tensors_are_refused_by_name(change, expect):
    official = pretrain_state(MICRO)
    change(official)
    cfg = build_config("tiny")
    with pytest.raises(CheckpointError, match=None) as err:
        map_pretrain(official, cfg, simscale_shapes(cfg))
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_layernorm_checkpoint_against_batchnorm_model_names_the_fix():
    official = pretrain_state(MICRO)
    official = {k.replace(".bn.", ".") : v for k, v in official.items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    cfg = build_config("tiny")
    with pytest.raises(CheckpointError, match="decoder_norm"):
        map_pretrain(official, cfg, simscale_shapes(cfg))
    cfg = build_config("tiny", overrides=["model.decoder_norm=ln"])
    mapped, _ = map_pretrain(official, cfg, simscale_shapes(cfg))
    assert torch.equal(mapped["online.projector.blocks.0.norm1.weight"], official["projector_decoder_blocks.0.norm1.weight"])
