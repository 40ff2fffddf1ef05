"""`simscale report RUN_DIR`: PNG plots of a run's metrics.jsonl and a short text summary.

Plots (written to RUN_DIR/report/): loss.png (the UniGrad loss, and its align / uniform terms
as logged by rank 0), schedule.png (lr, weight decay, EMA momentum), throughput.png (images/s,
TFLOP/s per device, MFU on known GPUs), data_wait.png (fraction of each step spent waiting for
data), knn.png (online k-NN top-1 in %, when the run logged `knn_*` keys, against the random-init
and raw-pixel reference lines). summary.txt says the same in a few lines. The run ledger
(events.jsonl: restarts, failures, preemption saves, loss-spike rollbacks) is listed in
summary.txt and marked on loss.png. Training writes the report at its end too. matplotlib draws off-screen (Agg via
`Figure`, no pyplot state), so it works on headless nodes.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from simscale.errors import SimscaleError
from simscale.events import json_records, read_events, summary_lines

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records, one per step (a resumed run that logs a step again wins), in step order.

    A torn last line (a run killed mid-write) is skipped, not fatal.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise SimscaleError(f"'{path}' not found: pass a run.dir of `simscale train` (it writes {METRICS})")
    by_step: dict[int, dict[str, Any]] = {}
    for record in json_records(path):
        if isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {}).update(record)  # eval records may share a step
    if not by_step:
        raise SimscaleError(f"'{path}' holds no metric records yet: train for at least one step")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))
           and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def keys_like(records: list[dict[str, Any]], prefix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix)})


def _panel(ax, records, keys, ylabel, scale: float = 1.0, missing: str = "not logged") -> bool:
    drawn = False
    for i, key in enumerate(keys):
        x, y = series(records, key)
        if x:  # the first key solid, the parts of it dashed
            ax.plot(x, [v * scale for v in y], label=key, linewidth=1.2, linestyle="-" if i == 0 else "--",
                    marker="." if len(x) < 30 else None)
            drawn = True
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn


def _figure(rows: int, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    return fig, axes


_MARKS = {"failure": ("tab:red", "failure"), "interrupted": ("tab:red", "killed"),
          "preempt": ("tab:orange", "preemption save"), "rollback": ("tab:purple", "spike rollback"),
          "resume": ("tab:gray", "resume")}


def _mark_events(ax, events: list[dict[str, Any]]) -> None:
    """A vertical line per ledger record at its step, one legend entry per kind."""
    labelled = set()
    for e in events:
        kind = e.get("kind")
        step = e.get("step", e.get("last_known_step"))
        if kind not in _MARKS or not isinstance(step, (int, float)):
            continue
        color, label = _MARKS[kind]
        ax.axvline(step, color=color, linestyle=":", linewidth=1,
                   label=None if kind in labelled else label)
        labelled.add(kind)
    if labelled:
        ax.legend(fontsize=8, loc="best")


def plot(records: list[dict[str, Any]], out: Path, name: str,
         events: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, file):
        fig.savefig(out / file, dpi=100)
        written.append(out / file)

    save(loss_figure(records, name, events), "loss.png")

    fig, ax = _figure(3, f"{name}: schedules")
    _panel(ax[0], records, ["lr"], "learning rate")
    _panel(ax[1], records, ["momentum"], "EMA momentum")
    _panel(ax[2], records, ["weight_decay"], "weight decay")
    save(fig, "schedule.png")

    fig, ax = _figure(3, f"{name}: throughput")
    _panel(ax[0], records, ["images_per_s"], "images / s (global)")
    _panel(ax[1], records, ["tflops_per_device"], "TFLOP/s per device")
    _panel(ax[2], records, ["mfu"], "MFU (%)", scale=100,
           missing="no MFU: the device's peak FLOP/s is unknown (CPU or an unlisted GPU)")
    save(fig, "throughput.png")

    fig, ax = _figure(1, f"{name}: data wait (fraction of step time)")
    _panel(ax[0], records, ["data_wait"], "data wait (%)", scale=100)
    save(fig, "data_wait.png")

    if knn_curves(records):
        fig, ax = _figure(1, f"{name}: online k-NN top-1 (the same probe as `simscale eval knn`)")
        knn_panel(ax[0], records)
        save(fig, "knn.png")
    return written


def loss_figure(records: list[dict[str, Any]], name: str, events: list[dict[str, Any]] | None = None):
    """The loss (mean over ranks, with the run ledger's events marked) and rank 0's terms, with what
    a rising uniform term means."""
    fig, ax = _figure(3, f"{name}: UniGrad loss (loss: mean over ranks; loss_*, align, uniform: rank 0's)")
    _panel(ax[0], records, ["loss", *keys_like(records, "loss_")], "loss")
    _mark_events(ax[0], events or [])
    _panel(ax[1], records, keys_like(records, "align_"), "align term (rank 0)")
    _panel(ax[2], records, keys_like(records, "uniform_"), "uniform term (rank 0)")
    ax[2].text(0.01, 0.02, UNIFORM_NOTE, transform=ax[2].transAxes, fontsize=7, color="dimgray", va="bottom")
    return fig


# What the uniform term says (loss.py: p^T C p / D, C the targets' second moment over all ranks).
UNIFORM_NOTE = ("uniform = prediction energy along the targets' main directions: it rises when features crowd "
                "into fewer directions (towards collapse), falls as they spread out")


def knn_curves(records: list[dict[str, Any]]) -> list[str]:
    """The encoders' k-NN series (knn_online_top1, knn_target_top1); knn_pixels_top1 is a reference."""
    return [k for k in keys_like(records, "knn_") if k != "knn_pixels_top1"]


def knn_references(records: list[dict[str, Any]]) -> dict[str, float]:
    """The lines every k-NN figure is read against: the encoder at initialisation (the monitor's
    step-0 evaluation) and the raw pixels (the monitor's knn_pixels_top1, logged at step 0)."""
    refs = {}
    x, y = series(records, "knn_online_top1")
    if x and x[0] == 0:
        refs["random init (step 0)"] = y[0]
    _, pixels = series(records, "knn_pixels_top1")
    if pixels:
        refs["raw pixels"] = pixels[0]
    return refs


def knn_panel(ax, records: list[dict[str, Any]]) -> None:
    """k-NN top-1 in %, on a 0-100 axis (a few points on an auto-scaled one look like large moves),
    with the random-init and raw-pixel figures as horizontal reference lines."""
    _panel(ax, records, knn_curves(records), "k-NN top-1 (%)")
    for (label, value), style in zip(knn_references(records).items(), ("-.", ":")):
        ax.axhline(value, color="gray" if style == "-." else "black", linestyle=style, linewidth=1,
                   label=f"{label}: {value:.1f}%")
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter("{x:.0f}%")
    ax.legend(fontsize=8, loc="best")


def _median(records, key) -> float | None:
    _, y = series(records, key)
    return statistics.median(y) if y else None


def summary(records: list[dict[str, Any]], name: str, events: list[dict[str, Any]] | None = None) -> str:
    first, last = records[0], records[-1]
    _, losses = series(records, "loss")
    tail = losses[-max(1, len(losses) // 10):]  # the last tenth of the logged steps
    lines = [f"{name}: steps {first['step']}..{last['step']} logged ({len(records)} records)"]
    _, times = series(records, "time")
    if times:
        lines[0] += f", {(max(times) - min(times)) / 60:.1f} min between first and last"
    if losses:
        lines.append(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}, mean of last tenth {statistics.fmean(tail):.4f}, "
                     f"min {min(losses):.4f}")
    for key, label, fmt in (("images_per_s", "images/s", "{:.1f}"), ("tflops_per_device", "TFLOP/s per device", "{:.3f}"),
                            ("mfu", "MFU", "{:.1%}"), ("data_wait", "data wait", "{:.0%}")):
        med = _median(records, key)
        if med is not None:
            lines.append(f"{label} (median): {fmt.format(med)}")
    _, mem = series(records, "memory_gb")
    if mem:
        lines.append(f"peak memory: {max(mem):.2f} GB")
    skipped = last.get("skipped_total")
    if skipped is not None:
        lines.append(f"non-finite steps skipped: {skipped}")
    for key in knn_curves(records):
        x, y = series(records, key)
        if y:
            lines.append(f"{key}: {y[-1]:.4f} at step {x[-1]} (best {max(y):.4f})")
    refs = knn_references(records)
    if refs:
        lines.append("k-NN references: " + ", ".join(f"{k} {v:.2f}%" for k, v in refs.items()))
    lines += summary_lines(events or [])
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[list[Path], str]:
    """Plots + summary.txt into `out` (default RUN_DIR/report). Returns (files, summary text)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report"
    records = read_metrics(run_dir)
    name = run_dir.resolve().name
    events = read_events(run_dir)
    files = plot(records, out, name, events)
    text = summary(records, name, events)
    (out / "summary.txt").write_text(text + "\n")
    return [*files, out / "summary.txt"], text


def cli_main(args) -> int:
    from simscale.console import make_console

    files, text = write_report(args.run_dir, args.out)
    console = make_console()
    console.print(text, highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(str(f) for f in files)}", highlight=False, soft_wrap=True)
    return 0
