"""The `simscale` command surface."""
import subprocess
import sys

from simscale.cli import build_parser, main


def test_help_lists_every_subcommand(capsys):
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("prepare", "train", "export", "eval", "info"):
        assert cmd in text


def test_info_prints_versions_and_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "deepspeed", "timm", "webdataset", "vit_l16", "tiny", "accelerator"):
        assert word in out


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "simscale", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prepare" in r.stdout


def test_bad_override_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "simscale", "train", "--preset", "tiny", "optim.bach_size=2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "optim.batch_size" in r.stderr and "Traceback" not in r.stderr


def test_deepspeed_launcher_local_rank_before_the_subcommand_is_accepted():
    args = build_parser().parse_args(["--local_rank=1", "train", "--preset", "tiny", "run.dir=x"])
    assert args.command == "train" and args.overrides == ["run.dir=x"]


def _in_a_fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    from tests.distrun import ROOT

    full = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full,
                          cwd=ROOT)


def test_a_missing_path_stops_train_before_torch_and_deepspeed_load(tmp_path):
    code = ("import sys\nfrom simscale.cli import main\n"
            f"rc = main(['train', '--preset', 'tiny', 'run.dir={tmp_path}/run', 'data.train={tmp_path}/nope'])\n"
            "print(rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    r = _in_a_fresh_python(code)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: data.train: shards '{tmp_path}/nope' not found: pass a "
                                             "`simscale prepare` output directory, its manifest.json, or a brace "
                                             "pattern like dir/shard-{000000..000009}.tar"]


def test_a_wrong_resume_dir_stops_before_torch_loads(tmp_path, train_shards):
    code = ("import sys\nfrom simscale.cli import main\n"
            f"rc = main(['train', '--preset', 'tiny', '--resume', '{tmp_path}/no_ckpt', 'run.dir={tmp_path}/run', "
            f"'data.train={train_shards}'])\nprint(rc, 'torch' in sys.modules)")
    r = _in_a_fresh_python(code)
    assert r.stdout.split() == ["2", "False"] and f"--resume '{tmp_path}/no_ckpt' not found" in r.stderr


def test_without_a_gpu_deepspeed_is_told_cpu_before_it_guesses_and_warns(tmp_path):
    # No nvidia-smi on PATH and DS_ACCELERATOR unset: DeepSpeed's own detection would print "Setting
    # accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    code = ("import os\nfrom simscale.cli import main\nmain(['info'])\n"
            "import deepspeed\nprint('DS', os.environ.get('DS_ACCELERATOR'))")
    r = _in_a_fresh_python(code, PATH=str(tmp_path))
    assert "DS cpu" in r.stdout and "unable to detect" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_redirected_output_has_no_escape_codes_and_no_hard_wrap(tmp_path):
    # FORCE_COLOR is what CI systems set for other tools; a log file still gets plain text.
    from tests.conftest import load_images_module
    from tests.distrun import cpu_env

    load_images_module().class_folders(tmp_path / "src", per_class=1)
    out = tmp_path / ("a_long_folder_name_" * 4) / "shards"
    env = cpu_env(FORCE_COLOR="1", COLUMNS="")
    env.pop("COLUMNS")
    r = subprocess.run([sys.executable, "-m", "simscale", "prepare", str(tmp_path / "src"), "--out", str(out),
                        "--workers", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "\x1b" not in text
    wrote = [line for line in text.splitlines() if line.startswith("wrote 3 images")]
    assert len(wrote) == 1 and len(wrote[0]) > 80 and wrote[0].endswith("resumed)"), text
