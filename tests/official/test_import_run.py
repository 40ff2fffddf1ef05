"""An official-format micro checkpoint imported with `simscale import official`, then exported, trained
from (first loss), and continued on 2 ranks ZeRO-2 then resumed on 1 rank (real DeepSpeed, gloo)."""
import json
import math
import shutil

import pytest
import timm
import torch

from simscale.config import build_config
from simscale.export import export
from simscale.official.cli import simscale_shapes
from simscale.official.names import map_pretrain
from tests.distrun import simscale_cli, tail, train_cli
from tests.official.official_format import MICRO, pretrain_state, reference_features, save_like_official

pytestmark = pytest.mark.slow
COMMON = ["data.num_workers=0", "optim.batch_size=4", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    official = pretrain_state(MICRO, seed=3)
    save_like_official(root / "micro.pth", official)
    proc = simscale_cli(["import", "official", str(root / "micro.pth"), "--out", str(root / "run"),
                         "--preset", "tiny", *COMMON])
    assert proc.returncode == 0, tail(proc)
    assert "mm_mask_token" in proc.stderr and (root / "run" / "checkpoints" / "step_00000000" / "COMPLETE").is_file()
    return root, official


def import_official(root, out, *over):
    proc = simscale_cli(["import", "official", str(root / "micro.pth"), "--out", str(out), "--preset", "tiny", *over,
                         *COMMON])
    assert proc.returncode == 0, tail(proc)
    return out


@pytest.fixture(scope="module")
def imported_z3(imported, tmp_path_factory):
    """The same checkpoint imported at ZeRO-3 fp32 (one import, one process start): one test reads it,
    another trains a copy of it."""
    root, _ = imported
    return import_official(root, tmp_path_factory.mktemp("official_z3") / "run", "deepspeed.zero_stage=3",
                           "deepspeed.precision=fp32")


def simscale_model(official):
    """simscale's SIM holding the official tensors (the same mapping the import uses)."""
    from simscale.model.sim import SIM

    cfg = build_config("tiny", overrides=[*COMMON, "data.partitions=4"])
    tensors, _ = map_pretrain(official, cfg, simscale_shapes(cfg))
    torch.manual_seed(0)
    model = SIM(cfg)
    model.load_state_dict(tensors, strict=True)
    return cfg, model


def test_export_of_an_import_gives_the_official_encoder_features(imported, tmp_path):
    root, official = imported
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, model = simscale_model(official)
    model.eval()
    for encoder, prefix, ours in (("online", "", model.online.encoder), ("target", "mm_", model.target.encoder)):
        export(root / "run", tmp_path / encoder, encoder=encoder)  # in-process: tests/test_export.py runs the CLI
        exported = timm.create_model(f"local-dir:{tmp_path / encoder}", pretrained=True).eval()
        with torch.no_grad():
            got = exported.forward_features(images)
            torch.testing.assert_close(got, ours(images), atol=1e-6, rtol=0)  # simscale's encoder, same tensors
            want = reference_features(official, images, heads=2, prefix=prefix)  # the official forward
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(official["blocks.0.attn.qkv.weight"], official["mm_blocks.0.attn.qkv.weight"])


def first_batch_loss(cfg, model, train_shards):
    from simscale.data.photometric import apply_photometric
    from simscale.data.stream import TwoViewStream

    cfg.data.train = str(train_shards)
    batch = next(iter(TwoViewStream(cfg, rank=0, world_size=1).batches(epoch=0, start=0)))
    a = apply_photometric(batch["view_a"], batch["photo_a"], view="a")
    b = apply_photometric(batch["view_b"], batch["photo_b"], view="b")
    model.train()
    with torch.no_grad():
        loss, _ = model.loss(model(a, b, batch["geometry"], batch["mask"]))
    return loss.item()


def test_first_loss_after_import_is_that_of_the_official_weights(imported, train_shards, tmp_path):
    root, official = imported
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    proc = simscale_cli(["train", "--preset", "tiny", "--resume", "auto", f"run.dir={run}", f"data.train={train_shards}",
                         "optim.max_steps=1", *COMMON])
    assert proc.returncode == 0, tail(proc)
    assert "resumed from" in proc.stderr and "step_00000000 at step 0" in proc.stderr.replace("\n", "")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in logged if r.get("step") == 1 and "loss" in r)
    cfg, model = simscale_model(official)
    fresh = first_batch_loss(cfg, model, train_shards)
    assert first == pytest.approx(fresh, rel=1e-5, abs=1e-7)
    model.copy_online_to_target()  # the control: had the momentum branch not become the target
    assert abs(first_batch_loss(cfg, model, train_shards) - fresh) > 1e-4


def test_continue_on_two_ranks_zero2_then_resume_on_one(imported, train_shards, tmp_path):
    root, official = imported
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    args = [f"run.dir={run}", f"data.train={train_shards}", "deepspeed.zero_stage=2", "run.save_every=2", *COMMON]
    two = train_cli([*args, "optim.max_steps=4"], nproc=2, timeout=400)
    assert two.returncode == 0, tail(two)
    out = (two.stdout + two.stderr).replace("\n", "")
    assert "world size 1 -> 2" in out and "step_00000000 at step 0" in out
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # stop the 2-rank run at step 2 ...
    (run / "checkpoints" / "latest").write_text("step_00000002")
    one = train_cli([*args, "optim.max_steps=4"], nproc=1, timeout=400)  # ... and finish it on 1 rank
    assert one.returncode == 0, tail(one)
    out = (one.stdout + one.stderr).replace("\n", "")
    assert "world size 2 -> 1" in out and "step_00000002 at step 2" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    # The frozen online patch embedding never trains: after two world-size changes it is still the official one.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from simscale.train.weights_only import weights_only_loads

    with weights_only_loads():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000004")
    assert torch.equal(sd["online.encoder.patch_embed.proj.weight"], official["patch_embed.proj.weight"])
    assert not torch.equal(sd["online.encoder.blocks.0.attn.qkv.weight"], official["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("stage, precision", [(2, "bf16"), (3, "fp32")])
def test_import_keeps_exact_fp32_weights_on_other_stages_and_precisions(imported, tmp_path, stage, precision,
                                                                        request):
    """A bf16 engine's optimizer master and the EMA master hold the official fp32 values, not a bf16
    round trip; ZeRO-3 partitions them (one rank) the same way."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from simscale.train.ema import consolidate
    from simscale.train.rank_state import load_ema
    from simscale.train.weights_only import weights_only_loads

    root, official = imported
    if (stage, precision) == (3, "fp32"):  # the import the ZeRO-3 world-size test trains from
        run = request.getfixturevalue("imported_z3")
    else:
        run = import_official(root, tmp_path / "run", f"deepspeed.zero_stage={stage}",
                              f"deepspeed.precision={precision}")
    tag = run / "checkpoints" / "step_00000000"
    with weights_only_loads():
        online = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    target = consolidate([load_ema(tag, 0)])
    for name in ("blocks.1.mlp.fc1.weight", "decoder_embed.bias", "projector_decoder_blocks.1.norm2.bn.weight"):
        ours = name.replace("blocks.1.", "encoder.blocks.1.", 1) if name.startswith("blocks") else name
        ours = ours.replace("decoder_embed", "projector.proj").replace("projector_decoder_blocks", "projector.blocks")
        ours = ours.replace(".bn.", ".")
        assert torch.equal(online[f"online.{ours}"], official[name]), name
        assert torch.equal(target[ours], official[f"mm_{name}"]), name
    assert torch.equal(online["predictor.rel_proj.weight"], official["decoder_pos_mlp.weight"])


def test_zero3_import_keeps_its_frozen_patch_embedding_across_world_sizes(imported, imported_z3, train_shards,
                                                                          tmp_path):
    """ZeRO-3, world 1 (the import) -> 2 -> 1: both resumes go through DeepSpeed's universal checkpoint,
    which carries only the optimizer's parameters. The frozen online patch embedding is in none, yet it
    must stay the imported one (not the seeded init): the first loss on 2 ranks is that of the official
    weights, every later checkpoint holds them, and the 1-rank resume continues the 2-rank run's losses."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from simscale.train.weights_only import weights_only_loads

    _, official = imported
    run = shutil.copytree(imported_z3, tmp_path / "run")
    args = [f"run.dir={run}", f"data.train={train_shards}", "deepspeed.zero_stage=3", "run.save_every=2",
            "optim.max_steps=4", *COMMON]
    two = train_cli([*args, "optim.batch_size=2"], nproc=2, timeout=400)  # global batch 4, as the import's 1 x 4
    assert two.returncode == 0, tail(two)
    assert "world size 1 -> 2" in (two.stdout + two.stderr).replace("\n", "")
    stayed = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(stayed) == [1, 2, 3, 4]
    cfg, model = simscale_model(official)
    # tight: this micro loss moves only ~5e-5 (relative) when the patch embedding is reset to its init
    assert stayed[1] == pytest.approx(first_batch_loss(cfg, model, train_shards), rel=1e-6, abs=1e-7)

    def frozen_in(tag):
        with weights_only_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
        return sd["online.encoder.patch_embed.proj.weight"], sd["online.encoder.patch_embed.proj.bias"]

    for tag in ("step_00000002", "step_00000004"):
        weight, bias = frozen_in(tag)
        assert torch.equal(weight, official["patch_embed.proj.weight"]), tag
        assert torch.equal(bias, official["patch_embed.proj.bias"]), tag

    shutil.rmtree(run / "checkpoints" / "step_00000004")  # stop the 2-rank run at step 2 ...
    (run / "checkpoints" / "latest").write_text("step_00000002")
    one = train_cli(args, nproc=1, timeout=400)  # ... and finish it on 1 rank x 4
    assert one.returncode == 0, tail(one)
    assert "world size 2 -> 1" in (one.stdout + one.stderr).replace("\n", "")
    moved = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    for step in (3, 4):
        assert moved[step] == pytest.approx(stayed[step], rel=1e-4, abs=1e-6), step
    weight, bias = frozen_in("step_00000004")
    assert torch.equal(weight, official["patch_embed.proj.weight"])
    assert torch.equal(bias, official["patch_embed.proj.bias"])
