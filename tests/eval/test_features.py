"""Loading exported encoders with timm and encoding real labelled shards."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from simscale.cli import main as simscale_main
from simscale.errors import CheckpointError, DataError
from simscale.eval.features import (IMAGENET_MEAN, eval_transform, extract_features, input_config, load_encoder,
                                    pooled_features)
from simscale.eval.knn import knn_top1


def test_export_layout_is_timms_pretrained_dir(exported):
    _, path = exported
    cfg = json.loads(open(f"{path}/config.json").read())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0
    assert cfg["model_args"]["embed_dim"] == 64 and cfg["model_args"]["depth"] == 2
    assert tuple(cfg["pretrained_cfg"]["mean"]) == IMAGENET_MEAN


def test_load_encoder_rebuilds_the_exported_shape_and_weights(exported):
    model, path = exported
    loaded = load_encoder(path)
    assert loaded.embed_dim == 64 and len(loaded.blocks) == 2 and loaded.patch_embed.img_size == (32, 32)
    assert loaded.num_classes == 0 and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(pooled_features(loaded, x), pooled_features(model, x))


def test_features_are_the_cls_token_output(exported):
    model, _ = exported
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)  # [B, 1 + patches, D]
    assert model.global_pool == "token"
    assert torch.allclose(pooled_features(model, x), model.fc_norm(tokens[:, 0]))


def test_eval_transform_is_timms_own_for_the_exported_model(exported, digits):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = load_encoder(exported[1])
    ours = eval_transform(data_config=input_config(model))
    timms = create_transform(**resolve_data_config({}, model=model))
    assert [repr(t) for t in ours.transforms[1:]] == [repr(t) for t in timms.transforms]  # after the RGB step
    assert "size=36" in repr(ours.transforms[1])  # floor(32 / 0.875), as timm resizes; not round(32*256/224) = 37
    image = Image.fromarray(np.stack([digits[0][0]] * 3, -1)).resize((45, 40))
    assert torch.equal(ours(image), timms(image))


def test_extract_features_from_real_shards(exported, digit_shards):
    model, path = exported
    train, _, _ = digit_shards
    feats, labels = extract_features(load_encoder(path), train, batch_size=64)
    assert feats.shape == (600, 64) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    from sklearn.datasets import load_digits
    assert torch.equal(labels, torch.from_numpy(load_digits().target[:600]).long())  # shard order kept
    # The live module (the in-training path) gives the same rows; with 2 decode workers the
    # order interleaves, so compare per-class sums.
    live_feats, live_labels = extract_features(model, train, batch_size=50, workers=2)
    assert torch.equal(live_labels.sort().values, labels.sort().values)
    for c in range(10):
        assert torch.allclose(live_feats[live_labels == c].sum(0), feats[labels == c].sum(0), atol=1e-3)


def test_extract_features_matches_manual_preprocessing(exported, digits, tmp_path, shard_writer):
    model, path = exported
    images, labels = digits
    shards = shard_writer(tmp_path / "one", images[:4], labels[:4], per_shard=4)
    feats, _ = extract_features(load_encoder(path), shards)
    from PIL import Image
    import io
    t = eval_transform(32)
    manual = []
    for im in images[:4]:  # the shard holds JPEG bytes; decode the same bytes
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        manual.append(t(Image.open(io.BytesIO(buf.getvalue()))))
    x = torch.stack(manual)
    assert x.shape == (4, 3, 32, 32)
    assert torch.allclose(feats, pooled_features(model, x), atol=1e-5)


def test_random_micro_vit_knn_on_real_digits_beats_chance(exported, digit_shards):
    # Even random patch features separate handwritten digits far above 10% chance.
    _, path = exported
    train, val, _ = digit_shards
    model = load_encoder(path)
    tf, ty = extract_features(model, train)
    vf, vy = extract_features(model, val)
    assert knn_top1(tf, ty, vf, vy) > 0.5


def test_missing_model_dir_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_encoder(tmp_path / "nope")
    assert "\n" not in str(exc.value)


def test_missing_weights_is_one_line_error(exported, tmp_path):
    _, path = exported
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as exc:
        load_encoder(broken)
    assert "\n" not in str(exc.value)


def test_weights_not_matching_config_fail_strictly(exported, tmp_path):
    _, path = exported
    broken = tmp_path / "deeper"
    shutil.copytree(path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_args"]["depth"] = 3  # config promises a block the weights do not have
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match") as exc:
        load_encoder(broken)
    assert "\n" not in str(exc.value)
    # ... and an extra tensor in the weights is refused too (strict load).
    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    sd = load_file(extra / "model.safetensors")
    sd["unexpected.weight"] = torch.zeros(1)
    save_file(sd, extra / "model.safetensors")
    with pytest.raises(CheckpointError):
        load_encoder(extra)


def test_unlabelled_shards_are_refused(digits, tmp_path, make_vit):
    import webdataset as wds
    images, _ = digits
    tmp_path.mkdir(exist_ok=True)
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.fromarray(images[0]).save(buf, format="JPEG")
        sink.write({"__key__": "a", "jpg": buf.getvalue()})
    with pytest.raises(DataError, match=".cls"):
        extract_features(make_vit(), str(tmp_path))


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_eval_cli_prints_top1(probe, exported, digit_shards, capsys):
    _, path = exported
    train, val, _ = digit_shards
    rc = simscale_main(["eval", probe, "--model", path, "--train", train, "--val", val, "--workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "top-1" in out and "600" in out and "200" in out


def test_eval_cli_wrong_model_dir_exits_2(digit_shards, tmp_path, capsys):
    train, val, _ = digit_shards
    rc = simscale_main(["eval", "knn", "--model", str(tmp_path / "x"), "--train", train, "--val", val])
    assert rc == 2 and "not found" in capsys.readouterr().err
