"""Launcher scripts: syntax, the exact commands they run (DRY_RUN=1), overrides passed through,
CPU/GPU environment, SLURM wiring, and the accelerate config checked by accelerate itself.

Real multi-process training through the launchers is tested with the trainer (not here)."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"
SCRIPTS = ["common.sh", "single_node.sh", "multi_node.sh", "slurm.sbatch", "torchrun.sh", "accelerate.sh", "elastic.sh"]
# Overrides with a space, quotes and a glob character must arrive as the same words.
OVERRIDES = ["optim.batch_size=32", "run.dir=/tmp/a b", "data.train=/s/shard-{0..9}.tar", "x='y'*"]
TRAIN = ["train", "--preset", "tiny", "--resume", "auto"]


def fake_bin(tmp_path: Path, **programs: str) -> Path:
    """A directory of stand-in cluster programs (nvidia-smi, scontrol, srun) for PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        (bin_dir / name.replace("_", "-")).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name.replace("_", "-")).chmod(0o755)
    return bin_dir


def launch(script: str, *args: str, path_prefix: Path | None = None, dry: bool = True, **env: str):
    base = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    base.update({"PRESET": "tiny", **env})
    if dry:
        base["DRY_RUN"] = "1"
    if path_prefix:
        base["PATH"] = f"{path_prefix}:{base['PATH']}"
    return subprocess.run(["bash", str(LAUNCHERS / script), *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=30)


def command(script: str, *args: str, **kw) -> list[str]:
    result = launch(script, *args, **kw)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_syntax(name):
    subprocess.run(["bash", "-n", str(LAUNCHERS / name)], check=True, timeout=10)


def test_every_launcher_is_covered():
    on_disk = {p.name for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch")}
    assert on_disk == set(SCRIPTS) | {"quickstart.sh"}  # quickstart.sh is run in tests/test_quickstart.py


def test_launchers_refer_to_no_file_outside_the_repository():
    for path in LAUNCHERS.iterdir():
        text = path.read_text()
        assert "/work/" not in text and "CPU_NOTES" not in text, path.name  # notes of the dev machines


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck")
def test_shellcheck_clean():
    files = sorted(str(p) for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch"))
    result = subprocess.run(["shellcheck", "-s", "bash", "-x", "-P", "SCRIPTDIR", *files],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_scripts_document_their_variables_and_are_strict(name):
    text = (LAUNCHERS / name).read_text()
    assert "set -euo pipefail" in text and "PRESET" in text and "RUN_DIR" in text and "DRY_RUN" in text
    assert '"$@"' in text  # overrides passed through


def test_single_node_command():
    cmd = command("single_node.sh", *OVERRIDES, NPROC="4", MASTER_PORT="29611")
    assert cmd == ["deepspeed", "--num_nodes", "1", "--num_gpus", "4", "--master_port", "29611",
                   "--log_level", "error", "--no_local_rank", "--module", "simscale", *TRAIN, *OVERRIDES]


def test_run_dir_and_config_become_train_arguments():
    cmd = command("single_node.sh", "a=1", NPROC="1", RUN_DIR="runs/x", CONFIG="c.yaml", RESUME="none")
    assert cmd[cmd.index("train"):] == ["train", "--preset", "tiny", "--resume", "none", "--config", "c.yaml",
                                        "run.dir=runs/x", "a=1"]


def test_cpu_environment_without_gpu():
    result = launch("single_node.sh", NPROC="2")
    assert "DS_ACCELERATOR=cpu" in result.stderr
    cores = os.cpu_count() or 1
    assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in result.stderr
    assert "OMP_NUM_THREADS=5" in launch("single_node.sh", OMP_NUM_THREADS="5").stderr  # kept if set


def test_gpu_node_counts_gpus_and_leaves_the_accelerator_alone(tmp_path):
    bin_dir = fake_bin(tmp_path, nvidia_smi='echo "GPU 0: H100 (UUID: a)"; echo "GPU 1: H100 (UUID: b)"\n')
    result = launch("single_node.sh", path_prefix=bin_dir)
    assert "DS_ACCELERATOR= " in result.stderr
    assert shlex.split(result.stdout)[3:5] == ["--num_gpus", "2"]


def test_multi_node_ssh_mode(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# cluster\nnode-a slots=8\nnode-b slots=8\n")
    cmd = command("multi_node.sh", *OVERRIDES, HOSTFILE=str(hosts))
    assert cmd == ["deepspeed", "--hostfile", str(hosts), "--master_addr", "node-a", "--master_port", "29500",
                   "--log_level", "warning", "--launcher", "pdsh", "--no_local_rank", "--module", "simscale", *TRAIN,
                   *OVERRIDES]


def test_multi_node_no_ssh_mode(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    cmd = command("multi_node.sh", "a=1", HOSTFILE=str(hosts), NODE_RANK="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="29700", NNODES="2", NPROC="1")
    assert cmd == ["deepspeed", "--hostfile", str(hosts), "--master_addr", "127.0.0.1", "--master_port", "29700",
                   "--log_level", "warning", "--num_nodes", "2", "--num_gpus", "1", "--no_ssh", "--node_rank", "1",
                   "--no_local_rank", "--module", "simscale", *TRAIN, "a=1"]


def test_multi_node_needs_a_hostfile(tmp_path):
    result = launch("multi_node.sh")
    assert result.returncode != 0 and "HOSTFILE" in result.stderr
    result = launch("multi_node.sh", HOSTFILE=str(tmp_path / "missing"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_torchrun_single_and_multi_node():
    assert command("torchrun.sh", *OVERRIDES, NPROC="2") == [
        "torchrun", "--nproc_per_node", "2", "--standalone", "-m", "simscale", *TRAIN, *OVERRIDES]
    assert command("torchrun.sh", "a=1", NPROC="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="n0") == [
        "torchrun", "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "n0",
        "--master_port", "29500", "-m", "simscale", *TRAIN, "a=1"]
    assert launch("torchrun.sh", NNODES="2").returncode != 0  # NODE_RANK required


def test_elastic_restarts_through_torchrun_and_always_resumes_auto():
    assert command("elastic.sh", *OVERRIDES, NPROC="2", RESUME="none", RUN_DIR="runs/x") == [
        "torchrun", "--nnodes", "1:1", "--nproc_per_node", "2", "--max-restarts", "10", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "simscale-x", "--rdzv-conf",
        "join_timeout=600,last_call_timeout=15", "--monitor-interval", "1", "-m", "simscale",
        *TRAIN, "run.dir=runs/x", *OVERRIDES]  # RESUME=none is overruled: every restart resumes
    cmd = command("elastic.sh", "a=1", NPROC="8", NNODES="2:4", MAX_RESTARTS="3", RDZV_ENDPOINT="n0:29400",
                  RDZV_ID="job7")
    assert cmd[:15] == ["torchrun", "--nnodes", "2:4", "--nproc_per_node", "8", "--max-restarts", "3",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "n0:29400", "--rdzv-id", "job7", "--rdzv-conf",
                        "join_timeout=600,last_call_timeout=15"]


def test_elastic_gives_every_attempt_a_store_of_its_own(tmp_path):
    # the agent's shared store keeps a dead attempt's gloo addresses: a restart would connect to them
    bin_dir = fake_bin(tmp_path, torchrun='echo "share off: $TORCH_DISABLE_SHARE_RDZV_TCP_STORE"\n')
    result = launch("elastic.sh", dry=False, path_prefix=bin_dir, NPROC="2", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "share off: 1"


SLURM_BIN = dict(
    scontrol='[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-[01-02]" ] && printf "gpu-01\\ngpu-02\\n"\n',
    # srun stand-in: run the task once per node with that node's SLURM_NODEID, like --ntasks-per-node 1.
    srun='while [ "$1" != bash ]; do shift; done\n'
         'for id in 0 1; do SLURM_NODEID=$id "$@" || exit 1; done\n',
    deepspeed='printf "%q " deepspeed "$@"; echo\n',
)
SLURM_ENV = dict(SLURM_JOB_NODELIST="gpu-[01-02]", SLURM_JOB_ID="4321", SLURM_GPUS_ON_NODE="8")


def test_slurm_dry_run_derives_hostfile_and_master(tmp_path):
    bin_dir = fake_bin(tmp_path, **SLURM_BIN)
    hostfile = tmp_path / "hostfile"
    cmd = command("slurm.sbatch", *OVERRIDES, path_prefix=bin_dir, HOSTFILE=str(hostfile),
                  SIMSCALE_DIR=str(ROOT), **SLURM_ENV)
    assert hostfile.read_text() == "gpu-01 slots=8\ngpu-02 slots=8\n"
    assert cmd[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert cmd[-len(OVERRIDES) - 9:] == [str(hostfile), "gpu-01", "29821", "8", *TRAIN, *OVERRIDES]


def test_slurm_runs_one_launcher_per_node_with_its_rank(tmp_path):
    bin_dir = fake_bin(tmp_path, **SLURM_BIN)
    hostfile = tmp_path / "hostfile"
    result = launch("slurm.sbatch", *OVERRIDES, dry=False, path_prefix=bin_dir, HOSTFILE=str(hostfile),
                    SIMSCALE_DIR=str(ROOT), MASTER_PORT="29999", **SLURM_ENV)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    for node_rank, cmd in enumerate(lines):
        assert cmd == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                       "--master_addr", "gpu-01", "--master_port", "29999", "--num_gpus", "8",
                       "--log_level", "warning", "--no_local_rank", "--module", "simscale", *TRAIN, *OVERRIDES]
    assert len(lines) == 2


def test_slurm_elastic_mode_runs_the_elastic_agent_on_every_node(tmp_path):
    bin_dir = fake_bin(tmp_path, **SLURM_BIN, torchrun='printf "%q " torchrun "$@"; echo\n')
    result = launch("slurm.sbatch", "a=1", dry=False, path_prefix=bin_dir, HOSTFILE=str(tmp_path / "hostfile"),
                    SIMSCALE_DIR=str(ROOT), ELASTIC="1", MAX_RESTARTS="5", **SLURM_ENV)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and lines[0] == lines[1]  # the same command on every node: the rendezvous ranks them
    assert lines[0] == ["torchrun", "--nnodes", "1:2", "--nproc_per_node", "8", "--max-restarts", "5",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-01:29821", "--rdzv-id", "simscale-4321",
                        "--rdzv-conf", "join_timeout=600,last_call_timeout=15", "--monitor-interval", "1",
                        "-m", "simscale", *TRAIN, "a=1"]


def test_slurm_outside_an_allocation_says_so():
    result = launch("slurm.sbatch", SIMSCALE_DIR=str(ROOT))
    assert result.returncode != 0 and "SLURM" in result.stderr


def test_accelerate_yaml_loads_with_accelerates_config_class():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(LAUNCHERS / "accelerate_deepspeed.yaml"))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.deepspeed_config["zero_stage"] in (0, 1, 2, 3) and cfg.mixed_precision == "bf16"


def test_accelerate_command_is_valid_for_accelerate_launch():
    """The exact dry-run command, parsed and validated by accelerate's own launch code, becomes
    a torchrun launch of `python -m simscale train ...` with the DeepSpeed plugin's environment
    and the overrides intact (everything `accelerate launch` does short of starting processes)."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cmd = command("accelerate.sh", *OVERRIDES, NPROC="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert cmd[:2] == ["accelerate", "launch"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(cmd[2:]))
    assert args.use_deepspeed and args.num_processes == 8 and args.num_machines == 2 and args.machine_rank == 1
    # What `accelerate launch` does next (accelerate/commands/launch.py, launch_command):
    args.deepspeed_fields_from_accelerate_config = ",".join(
        list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
    run_cmd, env = prepare_deepspeed_cmd_env(args)
    assert run_cmd is None  # multinode launcher "standard": accelerate runs torchrun on each node
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    torchrun = _filter_args(args, distrib_run.get_args_parser(),
                            ["--training_script", args.training_script,
                             "--training_script_args", args.training_script_args])
    assert (torchrun.nproc_per_node, torchrun.nnodes, torchrun.node_rank) == ("4", "2", 1)
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint) == ("static", "10.0.0.1:29500")
    assert torchrun.module and torchrun.training_script == "simscale"
    assert torchrun.training_script_args == [*TRAIN, "deepspeed.zero_stage=2", "deepspeed.precision=bf16",
                                             *OVERRIDES]


def test_without_preset_the_config_files_preset_applies():
    cmd = command("single_node.sh", NPROC="1", PRESET="", CONFIG="c.yaml")
    assert "--preset" not in cmd and cmd[cmd.index("train"):][:5] == ["train", "--resume", "auto", "--config", "c.yaml"]


@pytest.mark.slow
def test_a_user_error_under_the_deepspeed_launcher_is_one_line_per_rank_without_cpp_frames(tmp_path, train_shards):
    # 36 samples cannot fill 2 ranks x 64: both ranks fail in 'resume'; rank 0 hosts the rendezvous
    # store, and its leaving used to put ~50 lines of torch's C++ TCPStore frames after the error.
    from tests.distrun import cpu_env, free_port

    env = cpu_env(NPROC="2", PRESET="tiny", RESUME="none", RUN_DIR=str(tmp_path / "run"),
                  MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(LAUNCHERS / "single_node.sh"), f"data.train={train_shards}",
                           "optim.batch_size=64", "data.num_workers=0", "log.tensorboard=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # ~25 s idle
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: rank")]
    assert 1 <= len(errors) <= 2 and len({line.split(":")[1] for line in errors}) == len(errors), out[-3000:]
    assert all("optim.batch_size=64" in line and "optim.batch_size <= 18" in line for line in errors), out[-3000:]
    for noise in ("TCPStore", "frame #", "Traceback", "Connection reset", "[INFO]", "Unable to find hostfile"):
        assert noise not in out, out[-3000:]
