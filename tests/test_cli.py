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
