"""No job hangs: a phase label, one line on a collective timeout, and a failing rank ending the others.

- `set_phase(name)` says what this rank is doing (setup, resume, data, train step, checkpoint save,
  eval): a plain assignment, no device sync. The line a timeout prints names it.
- `FailureNotice`: the first rank that fails writes its line into the job's TCPStore (the one the
  rendezvous already runs: torchrun's agent or rank 0). A daemon thread on every rank blocks on that
  key (a server-side wait, no polling) and ends its rank within a second, naming the failed rank. So a
  crash ends the job in seconds under NCCL too (whose collectives would wait for the timeout) and
  across nodes (a launcher only kills its own node's processes).
- `ends_job_on_failure()`: the CLI's guard around training. On any exception in a distributed run it
  prints one line (a bug keeps its traceback), tells the other ranks, and leaves with os._exit: the
  interpreter's teardown could block in a collective or a process group destructor. A rank that has
  said its line goes quiet (stdout/stderr to /dev/null) before it leaves, so the store's host leaving
  does not put torch's C++ connection-reset frames after the one line. A clean end (last step,
  agreed preemption stop) closes the notice on every rank before the interpreter exits (see
  `FailureNotice.close`); after that a failure is no longer announced.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

from simscale.console import make_console
from simscale.errors import SimscaleError

console = make_console(stderr=True)
_phase = "setup"


def set_phase(name: str) -> None:
    global _phase
    _phase = name


def current_phase() -> str:
    return _phase


_on_failure: list = []


def on_failure(fn) -> None:
    """Call `fn` (best effort, at most 2 s for all) before a failing rank leaves with os._exit:
    e.g. the metrics sink's close, which stops a live progress bar and flushes TensorBoard."""
    _on_failure.append(fn)


_on_failure_line: list = []
_resume_hint = None


def on_failure_line(fn) -> None:
    """Call `fn(rank, phase, line, exit_code)` when this rank fails (the run ledger's record); the
    latest trainer's replaces an earlier one (a process may build several, e.g. tests)."""
    _on_failure_line[:] = [fn]


def set_resume_hint(fn) -> None:
    """`fn()` -> 'at step N; resume with: COMMAND', for the line of an interrupted (Ctrl-C) rank."""
    global _resume_hint
    _resume_hint = fn


def has_resume_hint() -> bool:
    return _resume_hint is not None


def interrupted_line(phase: str) -> str:
    try:
        hint = _resume_hint() if _resume_hint is not None else ""
    except Exception:  # noqa: BLE001 - the plain line is still true
        hint = ""
    return f"interrupted {hint} (during '{phase}')" if hint else f"interrupted during '{phase}'"


def _run_on_failure() -> None:
    def run() -> None:
        for fn in list(_on_failure):
            try:
                fn()
            except Exception:  # noqa: BLE001 - leaving anyway; a closed file or a half-written line
                pass

    worker = threading.Thread(target=run, daemon=True)  # a thread: a callback that blocks cannot hang us
    worker.start()
    worker.join(2.0)


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_timeout(exc: BaseException) -> bool:
    # gloo: "Timed out waiting 20000ms for recv operation to complete"; NCCL (blocking wait):
    # "Watchdog caught collective operation timeout"; torch's DistBackendError/DistStoreError names.
    for e in _chain(exc):
        text = str(e).lower()
        if "timed out waiting" in text or "operation timeout" in text or \
                (type(e).__name__.startswith("Dist") and "timeout" in text):
            return True
    return False


def _is_peer_gone(exc: BaseException) -> bool:
    # gloo: "Connection closed by peer [addr]" / "Connection reset by peer" when another rank died.
    return any(s in str(e).lower() for e in _chain(exc)
               for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def describe(exc: BaseException, timeout_s: int) -> tuple[str, int, bool]:
    """(one line, exit code, is a bug) for what ended this rank; the caller puts the rank in front."""
    phase = current_phase()
    if isinstance(exc, KeyboardInterrupt):
        return interrupted_line(phase), 130, False
    if isinstance(exc, SimscaleError):
        return str(exc), 2, False
    if _is_timeout(exc):
        return (f"collective '{phase}' timed out after {timeout_s} s waiting for another rank "
                "(stopped or hung); raise run.collective_timeout_s or find the stuck rank"), 1, False
    if _is_peer_gone(exc):
        return (f"another rank left during '{phase}' (its own line says why); "
                "this rank stops too"), 1, False
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__} during '{phase}': {first}", 1, True


class FailureNotice:
    """The job-wide 'a rank failed' flag in the rendezvous store, and the thread that acts on it."""

    LINGER_S = 3.0  # how long a failing rank keeps its store up for the others to read (rank 0 may host it)
    CLOSE_S = 10.0  # how long rank 0 (perhaps the store's host) waits at a clean end for the others to close
    FINISHED = "(finished)"  # the key's value at a clean end: wakes every watcher, ends nothing

    def __init__(self, host: str, port: int, rank: int, world_size: int, key: str):
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self.key, self.seen_key, self.closed_key = key, f"{key}/seen", f"{key}/closed"
        # Two clients: one client serialises its requests, and the thread's wait never returns by itself.
        # Short timeout: a failing rank must not wait long on a store whose host is the stopped rank.
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
        self._waiting = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
        self.finished = False
        self._ending = threading.Lock()  # the first path that ends this rank prints; the other waits
        self._thread = threading.Thread(target=self._watch, name="simscale-failure-notice", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._waiting.wait([self.key], timedelta(days=3650))
            line = self._waiting.get(self.key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store ended (the job is over); collectives report the rest
            return
        if self.finished or line == self.FINISHED or not self._ending.acquire(blocking=False):
            return
        console.print(f"[red]error:[/red] rank {self.rank}: stopping during '{current_phase()}' because "
                      f"{line}", highlight=False, soft_wrap=True)
        flush_std()
        _run_on_failure()
        _silence()  # said its line: the store host leaving next must not make it print C++ frames
        self._mark_seen()
        os._exit(1)

    def _mark_seen(self) -> None:
        try:
            self.store.add(self.seen_key, 1)
        except Exception:  # noqa: BLE001 - best effort: the failing rank lingers a few seconds anyway
            pass

    def close(self) -> None:
        """A clean end (the last step, an agreed preemption stop): no watcher is left blocked in the store.

        A thread blocked in the store while the interpreter exits aborts the process ("terminate called
        without an active exception", exit 134, after C++ frames) once the store's host leaves; under
        the elastic agent (launchers/elastic.sh) rank 0 hosts each attempt's store, and an aborted rank
        at the end would make the agent restart a finished job. So every rank wakes the watchers
        (FINISHED, unless a failure line is there already) and joins its own; rank 0 then waits until
        every rank has, at most CLOSE_S, before it leaves.
        """
        self.finished = True
        try:
            self.store.compare_set(self.key, "", self.FINISHED)
            self._thread.join(self.CLOSE_S)
            self.store.add(self.closed_key, 1)
            deadline = time.monotonic() + self.CLOSE_S
            while self.rank == 0 and time.monotonic() < deadline and \
                    self.store.add(self.closed_key, 0) < self.world_size:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone: no watcher is waiting on it any more
            pass

    def claim(self) -> bool:
        """This rank's failure ends it (False: the notice thread is already ending it for another's)."""
        return self._ending.acquire(blocking=False)

    def announce(self, line: str) -> None:
        """Tell every rank that this one failed (the first failure's line wins)."""
        try:
            self.store.compare_set(self.key, "", f"rank {self.rank} failed: {line}"[:1000])
            self._mark_seen()
        except Exception:  # noqa: BLE001 - the store is gone: the others learn it from their collectives
            pass

    def linger(self) -> None:
        """Keep this rank (perhaps the store's host) up until every rank has read the notice, at most LINGER_S."""
        try:
            deadline = time.monotonic() + self.LINGER_S
            while time.monotonic() < deadline and self.store.add(self.seen_key, 0) < self.world_size:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone: nothing left to wait for
            pass


_notice: FailureNotice | None = None


def start_failure_notice(host: str, port: int, rank: int, world_size: int, key: str) -> None:
    global _notice
    if world_size > 1 and _notice is None:
        try:
            _notice = FailureNotice(host, port, rank, world_size, key)
        except Exception as exc:  # noqa: BLE001 - training works without it; say what is lost
            console.print(f"[yellow]rank {rank}: no failure notice ({type(exc).__name__}: {exc}): a failing rank "
                          "ends the others only through the launcher or run.collective_timeout_s[/yellow]",
                          highlight=False, soft_wrap=True)


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _silence() -> None:
    """After a rank's one line: point its stdout/stderr at /dev/null until os._exit. The store host
    (rank 0) leaving closes every other rank's store connections, and torch's C++ prints each reset
    with ~30 stack frames: noise after a clean stop, not news."""
    flush_std()
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
    except OSError:
        pass


def _tell_failure_line(rank: int, line: str, code: int) -> None:
    for fn in _on_failure_line:
        try:
            fn(rank, current_phase(), line, code)
        except Exception:  # noqa: BLE001 - the ledger is best effort; the line is printed anyway
            pass


@contextmanager
def ends_job_on_failure(timeout_s: int):
    """Around training on every rank: see the module docstring. Single-process runs are left alone."""
    try:
        yield
    except BaseException as exc:
        notice = _notice
        if isinstance(exc, SystemExit) and not exc.code or getattr(exc, "clean_stop", False):
            if notice is not None:
                notice.close()  # an agreed stop (preemption.Stopped): every rank leaves the same way
            raise
        line, code, bug = describe(exc, timeout_s)
        if notice is None:  # one process: the CLI prints the line; the ledger still records it
            _tell_failure_line(0, line, code)
            raise
        if not notice.claim():  # another rank's failure is already ending this one: its line says it
            time.sleep(3600)
        if bug:
            traceback.print_exception(exc)
        console.print(f"[red]error:[/red] rank {notice.rank}: {line}", highlight=False, soft_wrap=True)
        flush_std()
        _tell_failure_line(notice.rank, line, code)
        notice.announce(line)
        _run_on_failure()
        _silence()
        notice.linger()
        os._exit(code)
    if _notice is not None:
        _notice.close()
