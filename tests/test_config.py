"""The typed config: presets, YAML, overrides, one-line errors, lr scaling."""
import pytest

from simscale.config import (PRESETS, Config, build_config, from_dict, global_batch, load_yaml,
                             parse_override, resolve_lr, save_yaml, to_dict)
from simscale.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_validates(name):
    cfg = build_config(name)
    assert cfg.preset == name
    assert cfg.model.img_size % cfg.model.patch_size == 0


def test_required_presets_exist():
    assert {"tiny", "vit_s16", "vit_b16", "vit_l16", "vit_h14", "vit_g14"} <= set(PRESETS)


def test_vit_b16_is_the_release_recipe():
    c = build_config("vit_b16")
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.patch_size) == (768, 12, 12, 16)
    assert (c.model.decoder_dim, c.model.decoder_heads) == (768, 16)
    assert (c.model.projector_depth, c.model.predictor_depth) == (2, 4)
    assert c.model.final_norm is False and c.model.decoder_norm == "bn"
    assert c.optim.betas == (0.9, 0.95) and c.optim.base_lr == 6.25e-5
    assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.clip_grad) == (1600, 40, 0.05, 1.0)
    assert c.loss.lam == 0.02 and (c.loss.a_global, c.loss.a_dense) == (0.0, 1.0)
    assert c.ema.momentum == 0.995 and c.ema.momentum_end == 1.0
    assert c.data.mask.ratio == 0.6 and c.data.crop_scale == (0.08, 1.0)


def test_larger_presets_follow_timm_shapes():
    assert build_config("vit_l16").model.embed_dim == 1024
    h = build_config("vit_h14").model
    assert (h.embed_dim, h.depth, h.patch_size) == (1280, 32, 14)
    g = build_config("vit_g14").model
    assert (g.embed_dim, g.depth, g.num_heads) == (1408, 40, 16)


def test_overrides_are_typed_and_nested():
    c = build_config("tiny", overrides=["optim.batch_size=16", "loss.lam=1e-2", "model.final_norm=true",
                                        "data.crop_scale=[0.2, 1.0]", "run.dir=/tmp/x"])
    assert c.optim.batch_size == 16 and c.loss.lam == 0.01 and c.model.final_norm is True
    assert c.data.crop_scale == (0.2, 1.0) and c.run.dir == "/tmp/x"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert build_config("tiny", overrides=["loss.lam=1"]).loss.lam == 1.0
    with pytest.raises(ConfigError, match="optim.batch_size"):
        build_config("tiny", overrides=["optim.batch_size=2.5"])


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError) as err:
        build_config("tiny", overrides=["optim.batchsize=4"])
    msg = str(err.value)
    assert "optim.batchsize" in msg and "optim.batch_size" in msg and "\n" not in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="closest valid key: 'optim'"):
        build_config("tiny", overrides=["optm.lr=1"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as err:
        build_config("tiny", overrides=["model.depth=deep"])
    assert "model.depth" in str(err.value) and "int" in str(err.value)


def test_bad_choice_is_rejected():
    with pytest.raises(ConfigError, match="deepspeed.precision"):
        build_config("tiny", overrides=["deepspeed.precision=fp8"])


def test_unknown_preset_suggests_one():
    with pytest.raises(ConfigError, match="vit_b16"):
        build_config("vit_b61")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")


def test_yaml_round_trip(tmp_path):
    c = build_config("tiny", overrides=["optim.batch_size=3", "data.same_view=true"])
    path = tmp_path / "cfg.yaml"
    save_yaml(c, path)
    again = build_config("tiny", yaml_file=path)
    assert again == c
    assert from_dict(to_dict(c)) == c


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  batch_size: 5\nloss:\n  lam: 0.5\n")
    c = build_config("tiny", yaml_file=path, overrides=["optim.batch_size=7"])
    assert c.optim.batch_size == 7 and c.loss.lam == 0.5


def test_yaml_with_bad_key_is_rejected(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  dept: 3\n")
    with pytest.raises(ConfigError, match="model.depth"):
        build_config("tiny", yaml_file=path)


def test_missing_and_broken_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


def test_lr_scaling_is_applied_once():
    c = build_config("vit_b16", overrides=["optim.batch_size=64"])
    assert global_batch(c, 64) == 4096
    scaled, msg = resolve_lr(c, world_size=64)
    assert scaled.optim.lr == pytest.approx(6.25e-5 * 4096 / 256)
    assert "4096" in msg and c.optim.lr == 0.0  # input untouched
    again, msg2 = resolve_lr(scaled, world_size=64)
    assert again.optim.lr == scaled.optim.lr and "no scaling" in msg2


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="patch_size"):
        build_config("tiny", overrides=["model.img_size=30"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        build_config("tiny", overrides=["deepspeed.offload_param=cpu"])


def test_defaults_equal_the_vit_b16_preset():
    assert build_config("vit_b16") == Config(preset="vit_b16")


def test_fault_injection_is_not_a_config_key():  # it is a test-only Trainer subclass (tests/train/faults.py)
    from simscale.config import build_config, to_dict

    assert "fault" not in to_dict(build_config("tiny"))
    with pytest.raises(ConfigError, match="fault"):
        build_config("tiny", overrides=["fault.kill_at_step=1"])


def test_compile_is_refused_under_zero3_in_one_line():
    from simscale.errors import ConfigError

    assert build_config("tiny", overrides=["model.compile=true"]).model.compile
    with pytest.raises(ConfigError, match="model.compile=true needs deepspeed.zero_stage") as exc:
        build_config("tiny", overrides=["model.compile=true", "deepspeed.zero_stage=3"])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["vit_l16", "vit_h14", "vit_l16_141g", "vit_h14_141g"])
def test_vit_l_and_h_presets_pay_for_no_zero3_or_recomputation(name):
    cfg = build_config(name)
    assert cfg.deepspeed.zero_stage == 2 and not cfg.model.grad_checkpointing
    assert cfg.deepspeed.precision == "bf16"


def test_a_yaml_files_preset_applies_without_preset(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: tiny\noptim: {batch_size: 8}\n")
    cfg = build_config(yaml_file=path)
    assert cfg.preset == "tiny" and cfg.model.img_size == PRESETS["tiny"]["model"]["img_size"]
    assert cfg.optim.batch_size == 8
    assert build_config("tiny", path).preset == "tiny"  # an explicit --preset that agrees
    assert build_config().preset == "vit_b16"  # neither: the default


def test_an_explicit_preset_that_disagrees_with_the_yaml_file_names_both(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: tiny\n")
    with pytest.raises(ConfigError, match=r"--preset vit_s16 disagrees with 'preset: tiny' in '.*cfg.yaml'"):
        build_config("vit_s16", path)


def test_a_saved_run_config_rebuilds_its_own_preset(tmp_path):
    path = tmp_path / "config.yaml"
    save_yaml(build_config("tiny", overrides=["optim.batch_size=4"]), path)
    assert build_config(yaml_file=path) == build_config("tiny", overrides=["optim.batch_size=4"])


def test_every_key_is_declared_once_with_its_meaning_and_allowed_values():
    """config.key(...) is the one place: every key has a meaning; a declared range or choice is enforced."""
    import dataclasses

    from simscale.config import _all_keys, key_fields, key_table

    declared = {name for name, _, _ in key_fields()}
    assert declared == set(_all_keys(Config()))  # no key without its metadata
    rows = {r[0]: r for r in key_table()}
    assert all(r[4] for r in rows.values())
    assert rows["optim.batch_size"][1:4] == ("int", "64", "[1, inf)")
    assert rows["data.crop_scale"][3] == "(0, 1], low <= high"
    assert rows["deepspeed.precision"][3] == "bf16 | fp32"
    for name, f, _ in key_fields():  # each declared bound really refuses a value past it
        if f.metadata["range"].startswith("["):
            low = float(f.metadata["range"][1:].split(",")[0])
            typ = int if isinstance(f.default, int) or (isinstance(f.default, tuple) and
                                                        isinstance(f.default[0], int)) else float
            bad = typ(low) - 1
            value = [bad, bad] if isinstance(f.default, tuple) else bad
            with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
                build_config("tiny", overrides=[f"{name}={value}"])
        if f.metadata["choices"]:
            with pytest.raises(ConfigError, match="must be one of"):
                build_config("tiny", overrides=[f"{name}=nonesuch"])
    assert dataclasses.fields(Config)[0].name == "preset"


def test_info_keys_lists_every_key(capsys):
    from simscale.cli import main
    from simscale.config import key_fields

    assert main(["info", "--keys"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in key_fields():
        assert name in out


def test_colour_jitter_takes_four_strengths_and_a_hue_of_at_most_half_a_turn():
    cfg = build_config("tiny", overrides=["data.color_jitter=[0.4,0.4,0,0]", "data.grayscale_p=0"])
    assert cfg.data.color_jitter == (0.4, 0.4, 0.0, 0.0) and cfg.data.grayscale_p == 0.0
    with pytest.raises(ConfigError, match="hue strength must be <= 0.5"):
        build_config("tiny", overrides=["data.color_jitter=[0.4,0.4,0.2,0.6]"])
    with pytest.raises(ConfigError, match="data.color_jitter"):
        build_config("tiny", overrides=["data.color_jitter=[0.4,0.4]"])
    with pytest.raises(ConfigError, match="data.grayscale_p"):
        build_config("tiny", overrides=["data.grayscale_p=1.5"])
