"""`simscale report RUN_DIR`: PNG plots of a run's metrics.jsonl and a short text summary.

Plots (written to RUN_DIR/report/): loss.png (the UniGrad loss, and its align / uniform terms
as logged by rank 0), schedule.png (lr, weight decay, EMA momentum), throughput.png (images/s,
TFLOP/s per device, MFU on known GPUs), data_wait.png (fraction of each step spent waiting for
data), knn.png (online k-NN top-1, when the run logged `knn_*` keys). summary.txt says the same
in a few lines. The run ledger (events.jsonl: restarts, failures, preemption saves, loss-spike
rollbacks) is listed in summary.txt and marked on loss.png. Training writes the report at its end too. matplotlib draws off-screen (Agg via
`Figure`, no pyplot state), so it works on headless nodes.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from simscale.errors import SimscaleError

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records, one per step (a resumed run that logs a step again wins), in step order.

    A torn last line (a run killed mid-write) is skipped, not fatal.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise SimscaleError(f"'{path}' not found: pass a run.dir of `simscale train` (it writes {METRICS})")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
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

    loss_terms = keys_like(records, "loss_")
    fig, ax = _figure(3, f"{name}: UniGrad loss")
    _panel(ax[0], records, ["loss", *loss_terms], "loss")
    _mark_events(ax[0], events or [])
    _panel(ax[1], records, keys_like(records, "align_"), "align term")
    _panel(ax[2], records, keys_like(records, "uniform_"), "uniform term")
    save(fig, "loss.png")

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

    knn = keys_like(records, "knn_")
    if knn:
        fig, ax = _figure(1, f"{name}: online k-NN")
        _panel(ax[0], records, knn, "k-NN top-1")
        save(fig, "knn.png")
    return written


def _median(records, key) -> float | None:
    _, y = series(records, key)
    return statistics.median(y) if y else None


def summary(records: list[dict[str, Any]], name: str, events: list[dict[str, Any]] | None = None) -> str:
    first, last = records[0], records[-1]
    _, losses = series(records, "loss")
    tail = losses[-max(1, len(losses) // 10):]  # the last tenth of the logged steps
    lines = [f"run {name}: steps {first['step']}..{last['step']} logged ({len(records)} records)"]
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
    for key in keys_like(records, "knn_"):
        x, y = series(records, key)
        if y:
            lines.append(f"{key}: {y[-1]:.4f} at step {x[-1]} (best {max(y):.4f})")
    from simscale.events import summary_lines

    lines += summary_lines(events or [])
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[list[Path], str]:
    """Plots + summary.txt into `out` (default RUN_DIR/report). Returns (files, summary text)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report"
    records = read_metrics(run_dir)
    name = run_dir.resolve().name
    from simscale.events import read_events

    events = read_events(run_dir)
    files = plot(records, out, name, events)
    text = summary(records, name, events)
    (out / "summary.txt").write_text(text + "\n")
    return [*files, out / "summary.txt"], text


def cli_main(args) -> int:
    from rich.console import Console

    files, text = write_report(args.run_dir, args.out)
    console = Console()
    console.print(text, highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(str(f) for f in files)}", highlight=False, soft_wrap=True)
    return 0
