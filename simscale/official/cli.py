"""`simscale import official CKPT --out DIR`: a pretraining checkpoint -> a resumable run directory,
a fine-tuned one -> a timm export (the kind is read from the tensor names)."""
from __future__ import annotations

from pathlib import Path

import torch

from simscale.config import build_config
from simscale.console import make_console
from simscale.errors import SimscaleError
from simscale.official.finetune import export_finetuned, is_finetuned
from simscale.official.names import map_pretrain
from simscale.official.reader import describe_args, model_state, read_official

console = make_console(stderr=True)


def simscale_shapes(cfg) -> dict[str, torch.Tensor]:
    """SIM's state dict on the meta device: names and shapes, no memory."""
    from simscale.model.sim import SIM

    with torch.device("meta"):
        return SIM(cfg).state_dict()


def import_pretrain(ckpt_path: str, sd: dict[str, torch.Tensor], out: Path, preset: str, config: str | None,
                    overrides: list[str], start_step: int, args_seen: dict) -> Path:
    from simscale.official.writer import write_run

    cfg = build_config(preset, config, [*overrides, f"run.dir={out}"])
    if cfg.model.target != "ema":
        raise SimscaleError("model.target=pixel has no momentum branch to import into: drop the override")
    tensors, notes = map_pretrain(sd, cfg, simscale_shapes(cfg))
    for line in notes:
        console.print(f"simscale import: {line}", highlight=False, soft_wrap=True)
    console.print("simscale import: optimizer state not carried over (fresh AdamW moments); "
                  f"the step and schedules start at {start_step}", highlight=False, soft_wrap=True)
    source = {"file": str(Path(ckpt_path).resolve()), "official_args": {k: str(v) for k, v in args_seen.items()},
              "start_step": start_step, "tensors": len(sd)}
    return write_run(cfg, tensors, start_step, source)


def cli_main(args) -> int:
    out = Path(args.out)
    ckpt = read_official(args.checkpoint)
    sd = model_state(ckpt, args.checkpoint)
    seen = describe_args(ckpt)
    if args.start_step < 0:
        raise SimscaleError(f"--start-step {args.start_step} must be >= 0")
    if is_finetuned(sd):
        if args.overrides or args.config:
            raise SimscaleError("a fine-tuned checkpoint becomes a timm export: its shape comes from the tensors, "
                                "drop the key=value overrides / --config")
        out, targs = export_finetuned(sd, out, args.num_heads)
        make_console().print(f"wrote {out}/model.safetensors + config.json (fine-tuned {targs['num_classes']}-class "
                        f"classifier, global_pool={targs['global_pool']}); load with "
                        f"timm.create_model('local-dir:{out}', pretrained=True)")
        return 0
    tag_dir = import_pretrain(args.checkpoint, sd, out, args.preset, args.config, args.overrides, args.start_step, seen)
    make_console().print(f"wrote {tag_dir} ({len(sd)} official tensors); continue pretraining with: simscale train "
                    f"--preset {args.preset} --resume auto run.dir={out} data.train=YOUR_SHARDS ...")
    return 0
