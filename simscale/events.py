"""The run ledger: RUN_DIR/events.jsonl, one JSON record per thing that happened to the run.

Kinds: `start` (every process start: attempt, world size, launcher restart count), `resume`
(checkpoint, world size, what changed), `failure` (rank, phase, exit code or signal),
`interrupted` (found at the next start: the previous attempt ended without a clean stop, e.g. a
SIGKILL, a lost node or an out-of-memory kill that left no line), `preempt` (a SIGTERM or
`run.stop_file` save), `rollback` (loss spike: from/to step and the skipped global sample range),
`end`. Records are appended with O_APPEND in one write each, so ranks and restarts never interleave
a line; a torn last line (a kill mid-write) is skipped by `read_events`. `simscale report` lists
them in summary.txt and marks them on loss.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"
# Kinds that end an attempt before the run is done (what `simscale report` counts as interruptions).
INTERRUPTIONS = ("failure", "interrupted", "preempt")


def attempt() -> dict[str, Any]:
    """Which launcher attempt this process belongs to (torch's elastic agent sets these)."""
    env = os.environ
    return {"restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            "run_id": env.get("TORCHELASTIC_RUN_ID", ""), "pid": os.getpid()}


def record(run_dir: str | Path, kind: str, **fields: Any) -> None:
    """Append one record (best effort: a ledger that cannot be written never stops training)."""
    line = json.dumps({"time": round(time.time(), 3), "kind": kind, **fields}, default=str) + "\n"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def json_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line; torn or foreign lines are skipped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    return [rec for rec in json_records(path) if isinstance(rec.get("kind"), str)]


def note_start(run_dir: str | Path, world_size: int, resume: str) -> None:
    """Rank 0 at every start: an `interrupted` record when the previous attempt left no clean end
    (no `end`/`preempt`/`failure` after its `start`), then this `start`."""
    events = read_events(run_dir)
    last_start = max((i for i, e in enumerate(events) if e["kind"] == "start"), default=None)
    if last_start is not None:
        after = events[last_start + 1:]
        if not any(e["kind"] in ("end", "preempt", "failure") for e in after):
            steps = [e["step"] for e in events[last_start:] if isinstance(e.get("step"), int)]
            record(run_dir, "interrupted", previous=events[last_start].get("attempt"),
                   last_known_step=max(steps) if steps else None,
                   why="the previous attempt ended without a line (SIGKILL, a lost node, out of memory)")
    record(run_dir, "start", attempt=attempt(), world_size=world_size, resume=resume)


def skipped_range(skipped: Any) -> str:
    """{'from': [epoch, sample], 'to': [epoch, sample]} in words (samples of the epochs' global order)."""
    try:
        (e0, s0), (e1, s1) = skipped["from"], skipped["to"]
    except (TypeError, KeyError, ValueError):
        return f"samples {skipped}"
    if e0 == e1:
        return f"samples [{s0}, {s1}) of epoch {e0}"
    return f"samples from epoch {e0} sample {s0} to epoch {e1} sample {s1}"


def summary_lines(events: list[dict[str, Any]]) -> list[str]:
    """One line per ledger record that matters to a reader, for summary.txt."""
    if not events:
        return []
    starts = [i for i, e in enumerate(events) if e["kind"] == "start"]
    # an attempt (from one start to the next) counts once, however many ranks wrote a failure in it
    bounds = zip([0, *starts[1:]], [*starts[1:], len(events)]) if starts else [(0, len(events))]
    stops = sum(any(e["kind"] in INTERRUPTIONS for e in events[a:b]) for a, b in bounds)
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    lines = [f"ledger (events.jsonl): {len(starts)} start(s), {stops} interruption(s), {len(rollbacks)} rollback(s)"]
    for e in events:
        k = e["kind"]
        if k == "resume":
            changes = "; ".join(e.get("changes") or []) or "nothing changed"
            lines.append(f"  resume from {e.get('checkpoint')} at step {e.get('step')} on {e.get('world_size')} "
                         f"rank(s) ({changes})")
        elif k == "failure":
            lines.append(f"  failure: rank {e.get('rank')} during '{e.get('phase')}' (exit {e.get('exit_code')}): "
                         f"{e.get('line', '')}")
        elif k == "interrupted":
            lines.append(f"  interrupted without a line after step {e.get('last_known_step')} ({e.get('why')})")
        elif k == "preempt":
            lines.append(f"  preemption save at step {e.get('step')} ({e.get('reason')})")
        elif k == "rollback":
            lines.append(f"  rollback at step {e.get('step')} to {e.get('checkpoint')} ({e.get('why')}); skipped "
                         f"{skipped_range(e.get('skipped'))}")
    return lines
