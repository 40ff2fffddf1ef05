"""A fine-tuned official checkpoint -> timm (three loading routes), and checkpoints that must be refused."""
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F

from simscale.cli import main
from tests.official.official_format import MICRO, finetune_state, pretrain_state, reference_features, save_like_official

HEADS = 2  # MICRO width 64: give the head count (the official list knows only ViT-S/B/L/H)


@pytest.mark.parametrize("global_pool", [True, False])
def test_finetuned_checkpoint_becomes_a_timm_classifier_with_the_official_logits(tmp_path, global_pool):
    sd = finetune_state(MICRO, classes=10, global_pool=global_pool)
    save_like_official(tmp_path / "ft.pth", sd, global_pool=global_pool, nb_classes=10)
    assert main(["import", "official", str(tmp_path / "ft.pth"), "--out", str(tmp_path / "t"),
                 "--num-heads", str(HEADS)]) == 0
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = reference_features(sd, images, HEADS)
    if global_pool:  # official forward_head: mean of the patch tokens, fc_norm, head
        pooled = F.layer_norm(x[:, 1:].mean(1), (64,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    else:
        pooled = F.layer_norm(x, (64,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]
    want = F.linear(pooled, sd["head.weight"], sd["head.bias"])
    c = json.loads((tmp_path / "t" / "config.json").read_text())
    assert c["num_classes"] == 10 and c["model_args"]["global_pool"] == ("avg" if global_pool else "token")
    assert c["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and c["pretrained_cfg"]["interpolation"] == "bicubic"
    file = str(tmp_path / "t" / "model.safetensors")
    models = [timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True),
              timm.create_model(c["architecture"], pretrained=True, **c["model_args"],
                                pretrained_cfg_overlay={**c["pretrained_cfg"], "file": file}),
              timm.create_model(c["architecture"], checkpoint_path=file, **c["model_args"],
                                pretrained_cfg_overlay=c["pretrained_cfg"])]
    for m in models:
        with torch.no_grad():
            got = m.eval()(images)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['I25_MARK']}",))


def test_planted_reduce_is_refused_in_one_line_and_never_runs(tmp_path, capfd, monkeypatch):
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("I25_MARK", str(mark))
    torch.save({"model": pretrain_state(MICRO), "args": Payload()}, tmp_path / "evil.pth")
    assert main(["import", "official", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "run"),
                 "--preset", "tiny"]) == 2
    err = capfd.readouterr().err.strip()
    assert "refused unread and nothing in it ran" in err and "posix.system" in err.replace("os.system", "posix.system")
    assert len(err.splitlines()) == 1 and not mark.exists() and not (tmp_path / "run").exists()


def test_missing_tensor_is_refused_naming_it_before_anything_is_written(tmp_path, capfd):
    sd = pretrain_state(MICRO)
    del sd["predictor_decoder_blocks.1.attn.proj.weight"]
    save_like_official(tmp_path / "cut.pth", sd)
    assert main(["import", "official", str(tmp_path / "cut.pth"), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    err = capfd.readouterr().err
    assert "'predictor.blocks.1.attn.proj.weight' has no tensor in the checkpoint" in err.replace("\n", "")
    assert not (tmp_path / "run").exists()
