"""Checkpoints that never lie: DeepSpeed's sharded save plus simscale's own per-rank state.

Layout under RUN_DIR/checkpoints/:
    step_00000100/          DeepSpeed's files (any ZeRO stage), simscale_rank00000.safetensors/.json
                            ... (rank_state.py), COMPLETE
    latest                  the name of the newest complete checkpoint
COMPLETE lists every file with its size and sha256; each rank hashes the files it wrote (its
optimizer partition, its simscale state; rank 0 also DeepSpeed's shared model file), the hashes
are gathered, and rank 0 writes COMPLETE after all ranks finished, then moves `latest` by atomic
rename. A checkpoint counts only when COMPLETE exists and every file has its listed size
(`complete_tags`, cheap: used for pruning); before anything is loaded (`--resume`, `export`)
the contents are checked against the hashes too, each rank hashing its own share, and a
damaged checkpoint is skipped with one line for the previous one. Nothing is unpickled: the
simscale state is safetensors + JSON, DeepSpeed's files load under `weights_only_loads()`.
(The run directory must be on a file system every rank sees.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console

from simscale.checksum import ALGORITHM, file_digest
from simscale.errors import CheckpointError
from simscale.train.rank_state import load_rank_state, save_rank_state
from simscale.train.weights_only import loading_through_deepspeed

COMPLETE = "COMPLETE"
LATEST = "latest"
SOURCE_KEY = "simscale_checkpoint"  # in DeepSpeed's model states: the run dir and tag that wrote them
_TAG = re.compile(r"^step_(\d{8})$")
_WRITER = re.compile(r"(?:pp_rank_|simscale_rank)0*(\d+)")  # DeepSpeed's and our per-rank file names
console = Console(stderr=True)


def universal_client_state() -> dict[str, Any]:
    """The client-state key DeepSpeed's `ds_to_universal` requires (else it asks for
    --inject_missing_state): no tensor or pipeline parallelism to describe, only the format version."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def writer_rank(name: str, world_size: int) -> int:
    """The rank that wrote (and hashes) a checkpoint file: its own per-rank files, rank 0 the rest."""
    m = _WRITER.search(Path(name).name)
    return int(m.group(1)) % world_size if m else 0


def verify(tag_dir: Path, content: bool = False, share: tuple[int, int] | None = None) -> str | None:
    """None when the checkpoint is complete, else the reason it is not.

    Sizes of all listed files always; with `content`, also the sha256 of the files in `share`
    (rank, world_size) -> that rank's own files, or of every file when share is None.
    """
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the save did not finish)"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "COMPLETE marker is unreadable"
    for name, entry in files.items():
        if not isinstance(entry, dict) or ALGORITHM not in entry or "bytes" not in entry:
            return f"COMPLETE lists no {ALGORITHM} for '{name}' (written by an older simscale)"
        f = tag_dir / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"COMPLETE names a file outside the checkpoint ('{name}')"
        if not f.is_file():
            return f"file '{name}' is missing"
        if f.stat().st_size != entry["bytes"]:
            return f"file '{name}' is {f.stat().st_size} bytes, expected {entry['bytes']} (truncated)"
    if content:
        for name, entry in files.items():
            if share is not None and writer_rank(name, share[1]) != share[0]:
                continue
            if file_digest(tag_dir / name) != entry[ALGORITHM]:
                return f"file '{name}' does not match its {ALGORITHM} (damaged after it was written)"
    return None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """COMPLETE's contents, checked for the keys a resume/export reads (it may come from anywhere)."""
    try:
        meta = json.loads((tag_dir / COMPLETE).read_text())
        ok = isinstance(meta, dict) and isinstance(meta.get("world_size"), int) and meta["world_size"] >= 1 \
            and isinstance(meta.get("config"), dict) and isinstance(meta.get("step"), int)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"'{tag_dir / COMPLETE}' is not a simscale checkpoint marker (step, world_size, "
                              "config): resume or export another checkpoint")
    return meta


def _collective() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def os_reason(exc: BaseException, where: Path) -> str:
    """What went wrong in words ('No space left on device: path'), from an OSError or torch's wrapper."""
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return f"{cause.strerror}: '{cause.filename}'" if cause.filename else str(cause.strerror)
    try:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file ..."
        if shutil.disk_usage(where).free < (16 << 20):
            return f"No space left on device: '{where}'"
    except OSError:
        pass
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class Checkpointer:
    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    # -- listing ---------------------------------------------------------------------------------
    def tags(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name)]
        return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))

    def complete_tags(self) -> list[Path]:
        """Checkpoints whose files all exist at their listed sizes (no hashing: cheap)."""
        return [p for p in self.tags() if verify(p) is None]

    def intact_line(self, exclude: Path | None = None) -> str:
        good = [p for p in self.complete_tags() if p != exclude]
        return f"the previous checkpoint {good[-1].name} is intact" if good else "no earlier checkpoint exists"

    def verify_content(self, tag_dir: Path) -> str | None:
        """Full check before a load: every rank hashes its own files; collective when distributed."""
        if not _collective():
            return verify(tag_dir, content=True)
        problem = verify(tag_dir, content=True, share=(self.rank, self.world_size))
        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def _from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (its own when not distributed)."""
        if not _collective():
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _verdicts(self, tag_dir: Path) -> list[tuple[int, str, bool]]:
        """(rank, problem, seen) of every rank that cannot use `tag_dir`; `seen` False when that rank
        does not even see the marker or the listed files at their sizes (a file system that differs
        between ranks), True when it sees them but its own files' hashes differ (damage)."""
        problem = verify(tag_dir) if tag_dir.is_dir() else "it does not exist"
        seen = problem is None
        if seen:
            share = (self.rank, self.world_size) if _collective() else None
            problem = verify(tag_dir, content=True, share=share)
        verdicts: list[tuple[int, str | None, bool]] = [(self.rank, problem, seen)]
        if _collective():
            verdicts = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(verdicts, (self.rank, problem, seen))
        return [v for v in verdicts if v[1]]

    def find_resumable(self, resume: str) -> Path | None:
        """'none' -> None; 'auto' -> newest checkpoint every rank verified (or None); else that directory.

        Collective. Rank 0 alone lists the checkpoints and broadcasts its choice (ranks listing on their
        own could pick different ones on a file system with stale caches, then hang); every rank checks
        that exact checkpoint (COMPLETE, sizes, the hashes of its own files) and the verdicts are
        gathered, so all ranks load it or all stop with the same line naming the rank. Under 'auto' a
        checkpoint that rank 0 cannot use or whose contents are damaged is skipped with one line; one
        that rank 0 sees complete but another rank does not see at all stops the run (falling back
        would discard the newer checkpoint for a cache that may catch up).
        """
        if resume == "none":
            return None
        if resume != "auto":
            tag_dir = Path(self._from_rank0(resume))
            bad = self._verdicts(tag_dir)
            if bad:
                rank, problem, _ = bad[0]
                who = f"rank {rank}: " if _collective() else ""
                raise CheckpointError(f"cannot resume from '{tag_dir}': {who}{problem}; "
                                      "pick another step_* directory or use --resume auto")
            return tag_dir
        names = self._from_rank0([p.name for p in reversed(self.tags())] if self.rank == 0 or not _collective()
                                 else None)
        for name in names:
            tag_dir = self.root / name
            bad = self._verdicts(tag_dir)
            if not bad:
                return tag_dir
            unseen = [v for v in bad if not v[2]]
            if _collective() and unseen and bad[0][0] != 0:  # rank 0 sees it complete, another rank does not
                rank, problem, _ = unseen[0]
                raise CheckpointError(
                    f"rank {rank} cannot see checkpoint '{tag_dir}' that rank 0 chose ({problem}): run.dir must "
                    "be on a file system every rank sees the same; retry when it has caught up, or pass "
                    "--resume with a checkpoint every rank sees")
            rank, problem, _ = bad[0]
            if self.rank == 0:
                who = f"rank {rank}: " if _collective() else ""
                console.print(f"[yellow]skipping checkpoint {tag_dir.name}: {who}{problem}; "
                              "using the previous one[/yellow]", highlight=False, soft_wrap=True)
        return None

    # -- saving ----------------------------------------------------------------------------------
    def _write_error(self, exc: BaseException, tag_dir: Path) -> CheckpointError:
        return CheckpointError(f"cannot write checkpoint '{tag_dir}' ({os_reason(exc, self.root)}); "
                               f"{self.intact_line(exclude=tag_dir)}: free space or fix permissions, "
                               "then rerun (--resume auto continues from it)")

    def _hash_own(self, tag_dir: Path) -> dict[str, dict[str, Any]]:
        own = {}
        for p in sorted(tag_dir.rglob("*")):
            name = str(p.relative_to(tag_dir))
            if p.is_file() and p.name != COMPLETE and writer_rank(name, self.world_size) == self.rank:
                own[name] = {"bytes": p.stat().st_size, ALGORITHM: file_digest(p)}
        return own

    def save(self, engine, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `state` is this rank's simscale state (rank_state.py)."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        try:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():  # a leftover of a crashed save of the same step
                    shutil.rmtree(tag_dir)
        except OSError as exc:
            raise self._write_error(exc, tag_dir) from None
        dist.barrier()
        try:
            # universal_checkpoint_info: what `ds_to_universal` needs to convert without extra flags
            # and where it came from: `ds_to_universal` copies this file, so its output leads back here
            source = {SOURCE_KEY: {"run_dir": str(self.root.parent.resolve()), "tag": tag}}
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False,
                                   client_state={**universal_client_state(), **source})
            save_rank_state(tag_dir, self.rank, state)
        except (OSError, RuntimeError) as exc:
            # This rank stops with one line; the launcher ends the others. The partial directory
            # never counts (no COMPLETE) and is removed to give the space back.
            shutil.rmtree(tag_dir, ignore_errors=True)
            raise self._write_error(exc, tag_dir) from None
        dist.barrier()
        own = self._hash_own(tag_dir)
        shares: list[dict | None] = [own]
        if _collective():
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, own)
        if self.rank == 0:
            files = {k: v for share in shares for k, v in (share or {}).items()}
            try:
                _atomic_write(tag_dir / COMPLETE, json.dumps(
                    {"step": step, "world_size": self.world_size, "files": dict(sorted(files.items())), **meta},
                    indent=1))
                _atomic_write(self.root / LATEST, tag)
            except OSError as exc:
                (tag_dir / COMPLETE).unlink(missing_ok=True)
                raise self._write_error(exc, tag_dir) from None
            self._prune()
        dist.barrier()
        return tag_dir

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; never the newest one or `latest`'s."""
        complete = self.complete_tags()
        if not complete:
            return
        protected = {p.name for p in complete[-max(self.keep_last, 1):]}
        try:
            protected.add((self.root / LATEST).read_text().strip())
        except OSError:
            pass
        for old in complete:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
        # Incomplete directories older than the newest complete one are dead leftovers.
        newest = int(_TAG.match(complete[-1].name).group(1))
        for p in self.tags():
            if p.name not in protected and verify(p) is not None and int(_TAG.match(p.name).group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, engine, tag_dir: Path) -> dict[str, Any]:
        meta = read_meta(tag_dir)
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint '{tag_dir}' was written by {meta['world_size']} ranks, this run has "
                f"{self.world_size}: resume with the same number of processes"
            )
        with loading_through_deepspeed(lambda exc: f"DeepSpeed could not load '{tag_dir}' ({type(exc).__name__}); "
                                       "the checkpoint is damaged: delete it to resume from the previous one"):
            path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load '{tag_dir}': the checkpoint is damaged; "
                                  "delete it to resume from the previous one")
        return load_rank_state(tag_dir, self.rank)

