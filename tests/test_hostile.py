"""Hostile input, end to end through the CLI: every bad config is one line and exit 2; planted
pickles in shards and checkpoint files never run. (Checkpoint byte flips, disk full and kills of a
real training run: tests/train/test_checkpoint_trust.py; shards: tests/data/test_bad_samples.py,
tests/data/test_prepare_trust.py.)"""
import io
import tarfile

import pytest
import torch

from simscale.cli import main
from simscale.data.shards import write_manifest
from simscale.errors import CheckpointError
from simscale.train.rank_state import load_ema, load_rank_state
from simscale.train.weights_only import weights_only_loads
from tests.conftest import load_images_module
from tests.distrun import simscale_cli
from tests.hostile import pickle_bytes, torch_bytes

BAD_OVERRIDES = [
    "optim.max_steps=-5", "optim.base_lr=-1", "optim.base_lr=0", "optim.lr=-0.001", "optim.epochs=0",
    "model.depth=0", "model.num_heads=0", "model.patch_size=0", "data.shuffle_buffer=0", "run.save_every=0",
    "log.every=0", "data.num_workers=-1", "data.crop_scale=[1.5,0.1]", "data.crop_scale=[0.9,0.1]",
    "data.crop_ratio=[2.0,0.5]", "run.keep_last=0", "optim.eps=0", "optim.betas=[0.9,1.0]",
    "optim.weight_decay=-0.1", "optim.warmup_epochs=-1", "optim.warmup_steps=-2", "optim.clip_grad=-1",
    "optim.batch_size=0", "optim.grad_accum=0", "optim.min_lr=-1", "ema.momentum=1.5", "loss.lam=-1",
    "data.max_bad_fraction=1.5", "data.mask.ratio=1", "data.mask.min_block_patches=0", "data.mask.min_aspect=0",
    "model.img_size=0", "model.embed_dim=0", "model.mlp_ratio=0", "model.drop_path=1", "model.decoder_dim=0",
    "model.decoder_heads=0", "model.predictor_depth=-1", "data.samples_per_epoch=-1", "run.seed=-1",
    "run.max_nonfinite_streak=0", "deepspeed.zero_stage=4", "deepspeed.reduce_bucket_size=0",
    "optim.base_lr=.nan", "optim.epochs=.inf", "data.color_jitter=[0.4,0.4,0.2,0.6]", "data.color_jitter=[0.4,-1,0,0]",
    "data.color_jitter=[0.4,0.4]", "data.grayscale_p=1.5",
]


def one_line_exit_2(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_bad_config_value_is_one_line_and_exit_2(override, capsys):
    err = one_line_exit_2(capsys, ["train", "--preset", "tiny", override])
    assert override.split("=")[0] in err


def test_crop_scale_order_is_blamed_on_the_key_not_the_data(capsys):
    err = one_line_exit_2(capsys, ["train", "--preset", "tiny", "data.crop_scale=[1.5,0.1]"])
    assert "data.crop_scale" in err and "shard" not in err


@pytest.mark.parametrize("content", [b"- a\n- b\n", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", b"just a string\n", b"42\n"])
def test_config_file_that_is_not_a_mapping_is_one_line(content, tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(content)
    err = one_line_exit_2(capsys, ["train", "--preset", "tiny", "--config", str(tmp_path / "c.yaml")])
    assert "c.yaml" in err


@pytest.mark.parametrize("flag", [["--workers", "-1"], ["--shard-bytes", "-5"], ["--max-side", "-1"],
                                  ["--max-pixels", "0"], ["--shard-size", "0"]])
def test_bad_prepare_flags_are_one_line(flag, tmp_path, capsys):
    load_images_module().class_folders(tmp_path / "src", per_class=1)
    one_line_exit_2(capsys, ["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *flag])


def test_bad_values_in_a_real_process_exit_2_without_traceback(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    for args in (["train", "--preset", "tiny", "optim.max_steps=-5"],
                 ["train", "--preset", "tiny", "--config", str(tmp_path / "bin.yaml")]):
        proc = simscale_cli(args, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


# -- planted pickles ------------------------------------------------------------------------------

def planted_shards(root, marker):
    """Labelled JPEG shards whose every sample also carries .pyd, .pkl and .pth payload members."""
    images = load_images_module()
    root.mkdir(parents=True)
    name = "shard-000000.tar"
    with tarfile.open(root / name, "w") as tf:
        for k in range(8):
            for ext, data in (("jpg", images.jpeg_bytes(images.variant(k, (64, 48)))), ("cls", str(k % 2).encode()),
                              ("pyd", pickle_bytes(marker)), ("pkl", pickle_bytes(marker)),
                              ("pth", torch_bytes(marker))):
                info = tarfile.TarInfo(f"{k:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    import hashlib

    write_manifest(root, [{"name": name, "samples": 8, "bytes": (root / name).stat().st_size,
                           "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}], ["a", "b"])
    return root


def test_payload_members_in_shards_are_never_unpickled(tmp_path):
    import timm

    from simscale.config import build_config
    from simscale.data.stream import TwoViewStream
    from simscale.eval.features import extract_features

    marker = tmp_path / "RAN"
    shards = planted_shards(tmp_path / "shards", marker)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=64, depth=1, num_heads=2)
    feats, labels = extract_features(model, str(shards), batch_size=4, workers=1)  # eval: a worker process
    assert feats.shape == (8, 64) and labels.tolist() == [k % 2 for k in range(8)]
    cfg = build_config("tiny", overrides=[f"data.train={shards}", "optim.batch_size=4", "data.num_workers=1"])
    batches = list(TwoViewStream(cfg).batches(epoch=0))
    assert len(batches) == 2 and batches[0]["label"].tolist() != [-1] * 4
    assert not marker.exists()


def test_payload_in_a_deepspeed_file_is_refused_unread(tmp_path):
    marker = tmp_path / "RAN"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(torch_bytes(marker))
    with weights_only_loads(), pytest.raises(CheckpointError, match="refused unread"):
        torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed 0.19.8 asks for
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"  # restored


def test_payload_in_place_of_the_simscale_state_is_refused(tmp_path):
    marker = tmp_path / "RAN"
    (tmp_path / "simscale_rank00000.safetensors").write_bytes(torch_bytes(marker))
    (tmp_path / "simscale_rank00000.json").write_bytes(pickle_bytes(marker))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_rank_state(tmp_path, 0)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_ema(tmp_path, 0)
    assert not marker.exists()


def test_the_planted_payload_is_live(tmp_path):
    """The tests above can fail: unpickled the old way, the payload does write its marker."""
    import pickle

    pickle.loads(pickle_bytes(tmp_path / "RAN"))
    assert (tmp_path / "RAN").read_text() == "ran"


@pytest.mark.parametrize("damage", ["truncate", "jpeg"])
def test_damaged_eval_shards_are_one_line(damage, tmp_path):
    import timm

    from simscale.errors import DataError
    from simscale.eval.features import extract_features

    shards = planted_shards(tmp_path / "shards", tmp_path / "RAN")
    shard = shards / "shard-000000.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    else:
        with tarfile.open(shard) as tf:
            m = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        raw = bytearray(shard.read_bytes())
        raw[m.offset_data:m.offset_data + 16] = b"\0" * 16
        shard.write_bytes(bytes(raw))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(DataError) as exc:
        extract_features(model, str(shards), batch_size=4, workers=1)
    assert "\n" not in str(exc.value)


def test_bad_probe_flags_are_one_line(tmp_path, capsys):
    for flag in (["--k", "0"], ["--batch-size", "0"], ["--workers", "-1"], ["--temperature", "0"]):
        one_line_exit_2(capsys, ["eval", "knn", "--model", str(tmp_path), "--train", str(tmp_path),
                                 "--val", str(tmp_path), *flag])


@pytest.mark.parametrize("entry", [{"name": "../outside.tar", "samples": 1}, {"name": "shard-000000.tar"},
                                   {"name": "shard-000000.tar", "samples": -3}, "just a string"])
def test_malformed_manifest_entries_are_one_line(entry, tmp_path):
    import json

    from simscale.data.shards import read_manifest
    from simscale.errors import DataError

    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    with pytest.raises(DataError, match="malformed shard entry"):
        read_manifest(tmp_path / "manifest.json")


@pytest.mark.parametrize("marker", ['[1, 2]', '{"step": 1, "world_size": "two", "config": {}}', '{"step": 1}', "\xff"])
def test_a_forged_complete_marker_is_one_line(marker, tmp_path):
    from simscale.train.checkpoint import read_meta

    (tmp_path / "COMPLETE").write_text(marker)
    with pytest.raises(CheckpointError, match="not a simscale checkpoint marker"):
        read_meta(tmp_path)
