"""The `simscale` command: prepare, train, report, export, eval, info.

The CLI only parses arguments and dispatches; each stage lives in its own module and is
imported lazily, so `simscale info` and `--help` stay fast and never touch DeepSpeed.
User errors (SimscaleError) print as one red line and exit 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from simscale.errors import SimscaleError

console = Console(stderr=True)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST}


class RichParser(argparse.ArgumentParser):
    """argparse with its help rendered through rich (a panel, highlighted flags)."""

    def print_help(self, file=None) -> None:  # noqa: ARG002 - rich picks the stream
        out = Console()
        out.print(Panel(Text(self.format_help().rstrip()), title=f"[bold]{self.prog}", expand=False))

    def error(self, message: str) -> None:  # one line, then the usage hint
        console.print(f"[red]error:[/red] {message}  (see `{self.prog} --help`)")
        raise SystemExit(2)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="turn images (folders, file lists, tars) into WebDataset shards",
                       description="Write WebDataset shards + manifest.json from image folders, "
                       "class folders, text files of paths (optionally 'path label') or existing tars.")
    p.add_argument("sources", nargs="*", metavar="SRC", help="folder, .txt file list or .tar file")
    p.add_argument("--out", default=None, help="output directory (or s3://, gs://... URL: written "
                   "locally, then uploaded) for shard-%%06d.tar and manifest.json")
    p.add_argument("--verify", metavar="DIR", default=None,
                   help="check a shard set against its manifest.json (one line per bad shard, exit 2 if any)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=int, default=0, help="also cut a shard past this many bytes")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale so the shorter side is <= this (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: all cores)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the sources' order (default: a seeded shuffle across all shards)")
    p.add_argument("--shuffle", dest="shuffle", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="refuse images with more pixels (decompression bombs)")
    p.add_argument("--stage", default=None,
                   help="--out URL: local folder to write shards into before upload (default: a temp dir)")
    p.add_argument("--index", default=None, metavar="DIR_OR_URL",
                   help="write manifest.json for existing WebDataset tars (e.g. img2dataset output), no SRC")
    p.add_argument("--manifest-out", default=None, metavar="PATH",
                   help="--index: write the manifest here instead of beside the tars")
    p.set_defaults(module="simscale.data.prepare", issue=3)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="SIM pretraining on every rank (start it with deepspeed/torchrun)",
                       description="Train SIM. Configuration: --preset, then --config YAML, then "
                       "key.sub=value overrides, e.g. run.dir=runs/x optim.batch_size=128.")
    p.add_argument("--preset", default="vit_b16", help="tiny, vit_s16, vit_b16, vit_l16, vit_h14, vit_g14")
    p.add_argument("--config", default=None, help="YAML file with config overrides")
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest complete checkpoint in run.dir), 'none', or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(module="simscale.train.run", issue=5)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plots (PNG) and a text summary of a run's metrics.jsonl",
                       description="Plot loss (with its align/uniform terms), lr and momentum, images/s and "
                       "MFU, data wait and online k-NN from RUN_DIR/metrics.jsonl; write a short summary.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    p.set_defaults(module="simscale.report", issue=16)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a timm checkpoint (model.safetensors + config.json)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--encoder", choices=("online", "target"), default="online")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--init", action="store_true",
                   help="write a freshly initialised encoder of the run's architecture and seed (a baseline)")
    p.set_defaults(module="simscale.export", issue=6)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="k-NN or linear probe of an encoder on labelled shards")
    esub = p.add_subparsers(dest="probe", required=True, parser_class=RichParser)
    for name, helptext in (("knn", "weighted k-NN top-1 (DINO-style)"),
                           ("linear", "logistic-regression probe on frozen features")):
        e = esub.add_parser(name, help=helptext)
        if name == "knn":
            src = e.add_mutually_exclusive_group(required=True)
            src.add_argument("--model", help="exported timm directory (simscale export)")
            src.add_argument("--pixels", action="store_true",
                             help="the raw-pixel baseline: k-NN on the eval-transformed images themselves")
            e.add_argument("--img-size", type=int, default=224, help="image side for --pixels (default 224)")
        else:
            e.add_argument("--model", required=True, help="exported timm directory (simscale export)")
        e.add_argument("--train", required=True, help="labelled training shards (manifest/dir/pattern)")
        e.add_argument("--val", required=True, help="labelled validation shards")
        e.add_argument("--batch-size", type=int, default=128)
        e.add_argument("--workers", type=int, default=None, help="decode workers (default: min(4, cores))")
        if name == "knn":
            e.add_argument("--k", type=int, default=20)
            e.add_argument("--temperature", type=float, default=0.07)
        else:
            e.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the probe")
        e.set_defaults(module=f"simscale.eval.{name}", issue=6)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, accelerator and presets")
    p.add_argument("--keys", action="store_true", help="every config key: type, default, allowed values, meaning")
    p.set_defaults(module="simscale.info", issue=2)


def build_parser() -> RichParser:
    parser = RichParser(prog="simscale", description="Siamese Image Modeling pretraining at scale.")
    from simscale import __version__

    parser.add_argument("--version", action="version", version=f"simscale {__version__}")
    # `deepspeed --module simscale train` puts --local_rank=N before the subcommand; the rank
    # comes from the environment (LOCAL_RANK) anyway, so accept and ignore it here.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=RichParser)
    for add in (_add_prepare, _add_train, _add_report, _add_export, _add_eval, _add_info):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            module = importlib.import_module(args.module)
        except ModuleNotFoundError as exc:
            if exc.name != args.module:
                raise
            raise SimscaleError(
                f"`simscale {args.command}` is not built yet (tracked as issue {args.issue})"
            ) from None
        return int(module.cli_main(args) or 0)
    except SimscaleError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:  # the environment, not a bug: a full disk, a permission, a missing path
        if exc.errno not in _USER_ERRNOS:
            raise
        where = f": '{exc.filename}'" if exc.filename else ""
        console.print(f"[red]error:[/red] {exc.strerror}{where}; files written before this are kept: "
                      "fix it and rerun", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        from simscale.train import watchdog  # a training run names its step and the resume command

        line = watchdog.interrupted_line(watchdog.current_phase()) if watchdog.has_resume_hint() else "interrupted"
        console.print(f"[yellow]{line}[/yellow]", highlight=False, soft_wrap=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
