"""`simscale prepare`: images -> WebDataset shards + manifest.json, in parallel, skipping bad files.

Why each choice:
- Workers only turn one item into (jpeg bytes, metadata) or (skip reason); the main process
  writes shards in item order, so the output depends on the inputs and options only (same
  inputs + options -> byte-identical shards, whatever the worker count).
- Source JPEGs that are already RGB, upright and small enough keep their bytes (no generation
  loss); anything else is decoded, EXIF-rotated, converted to RGB and re-encoded.
- A shard is written under a temp name and renamed when complete; `.prepare-state.json` records
  the finished shards, so a re-run with the same inputs and options resumes after the last
  complete one, and a re-run with different ones rebuilds from scratch.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import random
import tarfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from simscale.checksum import file_digest
from simscale.data.shards import MANIFEST, REPORT, write_manifest
from simscale.data.sources import Item, list_sources, read_item
from simscale.errors import DataError

STATE = ".prepare-state.json"
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Options:
    shard_size: int = 1000
    shard_bytes: int = 0
    max_side: int = 0
    quality: int = 95
    shuffle: bool = True  # seeded: class folders never come out as one-class runs of samples
    seed: int = 0
    max_pixels: int = 89_478_485


# ---------------------------------------------------------------------------------------------
# One item -> ("ok", jpeg, meta) or ("skip", reason, detail). Runs in worker processes.

def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit/float grey: scale, not clip
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # transparent pixels become white
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im


def process_item(item: Item, opts: Options) -> tuple:
    try:
        data = read_item(item)
    except OSError as exc:
        return ("skip", "unreadable", type(exc).__name__)
    if not data:
        return ("skip", "empty-file", "0 bytes")
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before any pixel is decoded
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return ("skip", "not-an-image", "unidentified format")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        return ("skip", "corrupt", f"{type(exc).__name__}: {exc}"[:200])
    w0, h0 = im.size
    if w0 * h0 > opts.max_pixels:
        return ("skip", "too-many-pixels", f"{w0}x{h0} > --max-pixels {opts.max_pixels}")
    if w0 < 1 or h0 < 1:
        return ("skip", "corrupt", f"size {w0}x{h0}")
    try:
        fmt = im.format
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()  # full decode: truncated files fail here, not in the training loader
        small = not opts.max_side or min(w0, h0) <= opts.max_side
        if fmt == "JPEG" and im.mode == "RGB" and orientation in (0, 1) and small:
            out = data
            w, h = w0, h0
        else:
            im = ImageOps.exif_transpose(im) if orientation not in (0, 1) else im
            im = _to_rgb(im)
            w, h = im.size
            if opts.max_side and min(w, h) > opts.max_side:
                s = opts.max_side / min(w, h)
                w, h = max(1, round(w * s)), max(1, round(h * s))
                im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=opts.quality)
            out = buf.getvalue()
    except Exception as exc:  # noqa: BLE001
        return ("skip", "corrupt", f"{type(exc).__name__}: {exc}"[:200])
    meta = {"source": item.source, "orig_width": w0, "orig_height": h0, "width": w, "height": h}
    return ("ok", out, meta)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: the kernel kills this worker when prepare dies, even by SIGKILL (Linux)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _process_chunk(chunk: list[Item], opts: Options) -> list[tuple]:
    return [process_item(item, opts) for item in chunk]


# ---------------------------------------------------------------------------------------------
# Shard writing (main process).

def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: identical inputs give identical bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


class ShardWriter:
    def __init__(self, out: Path, opts: Options, index: int, first_key: int):
        self.out, self.opts, self.index, self.key = out, opts, index, first_key
        self.shards: list[dict] = []
        self._open()

    def _open(self) -> None:
        self.name = f"shard-{self.index:06d}.tar"
        self.tmp = self.out / f".{self.name}.tmp"
        self.tf = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.n = 0
        self.nbytes = 0

    def add(self, jpeg: bytes, label: int, meta: dict) -> bool:
        """Add one sample; returns True when this closed a shard (a resume point)."""
        key = f"{self.key:09d}"
        size = len(jpeg) + 2048
        closed = False
        self.closed_at = []  # per shard closed by this call: 0 = before this sample, 1 = after it
        if self.n and self.opts.shard_bytes and self.nbytes + size > self.opts.shard_bytes:
            self.close()
            self._open()
            closed = True
            self.closed_at.append(0)
        _tar_add(self.tf, f"{key}.jpg", jpeg)
        if label >= 0:
            _tar_add(self.tf, f"{key}.cls", str(label).encode())
        _tar_add(self.tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.key += 1
        self.n += 1
        self.nbytes += size
        if self.n >= self.opts.shard_size:
            self.close()
            self._open()
            closed = True
            self.closed_at.append(1)
        return closed

    def close(self) -> None:
        self.tf.close()
        if self.n == 0:
            self.tmp.unlink()
            return
        digest = hashlib.sha256(self.tmp.read_bytes()).hexdigest()
        final = self.out / self.name
        self.tmp.replace(final)  # the rename makes the shard visible only once complete
        self.shards.append({"name": self.name, "samples": self.n,
                            "bytes": final.stat().st_size, "sha256": digest})
        self.index += 1


def _fingerprint(items: list[Item], opts: Options, classes) -> str:
    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    h.update(json.dumps(classes).encode())
    for it in items:
        h.update(f"{it.source}\t{it.label}\t{it.size}\n".encode())
    return h.hexdigest()


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"output directory '{out}' is not writable ({exc.strerror}): "
                        "choose another --out or fix its permissions") from None


def shard_problem(path: Path, entry: dict) -> str | None:
    """None when the shard file matches its manifest/state entry (size and sha256), else why not."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"{path.stat().st_size} bytes, expected {entry.get('bytes')} (truncated or replaced)"
    if file_digest(path) != entry.get("sha256"):
        return "sha256 differs from the manifest (damaged)"
    return None


def _load_state(out: Path, fingerprint: str) -> dict | None:
    """The finished part of an earlier run with the same inputs and options, up to its first damaged shard.

    Each shard's content is checked against its sha256; from the first one that differs on, the
    shards are rebuilt (output is deterministic, so they come back byte-identical).
    """
    try:
        state = json.loads((out / STATE).read_text())
        if state.get("fingerprint") != fingerprint:
            return None
        shards, ends = state["shards"], state.get("ends")
        for i, s in enumerate(shards):
            problem = shard_problem(out / s["name"], s)
            if problem is None:
                continue
            _say(f"[yellow]shard {s['name']}: {problem}; rebuilding it and those after it[/yellow]")
            if not ends or i == 0:
                return None  # a state file of an older simscale: no resume points, start over
            return {"fingerprint": fingerprint, "shards": shards[:i], "next_item": ends[i - 1][0],
                    "skipped": state["skipped"][:ends[i - 1][1]], "ends": ends[:i]}
        return state
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def verify_shards(directory: str | Path) -> list[str]:
    """`prepare --verify DIR`: one line per shard that differs from manifest.json (empty: all good)."""
    directory = Path(directory)
    path = directory / MANIFEST if directory.is_dir() else directory
    try:
        data = json.loads(path.read_text())
        entries = data["shards"]
        assert isinstance(entries, list)
    except FileNotFoundError:
        raise DataError(f"'{path}' not found: pass a `simscale prepare` output directory") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"manifest '{path}' is unreadable: re-run `simscale prepare` to rewrite it") from None
    bad = []
    for entry in entries:
        try:
            problem = shard_problem(path.parent / entry["name"], entry)
        except (KeyError, TypeError, OSError) as exc:
            problem = f"manifest entry or file unreadable ({type(exc).__name__})"
        if problem:
            bad.append(f"{entry.get('name', '?') if isinstance(entry, dict) else '?'}: {problem}")
    return bad


def _save_state(out: Path, state: dict) -> None:
    tmp = out / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(out / STATE)


def _clean(out: Path, keep: set[str]) -> None:
    """Remove temp files and shards that are not part of the run being resumed."""
    for p in out.iterdir():
        if p.name.endswith(".tmp") or (p.name.startswith("shard-") and p.suffix == ".tar"
                                        and p.name not in keep):
            p.unlink()


def _progress(total: int, done: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TextColumn, TimeRemainingColumn)
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:7.1f} images/s")

    p = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), Speed(),
                 TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
    task = p.add_task("prepare", total=total, completed=done)
    return p, task


def prepare(sources: list[str], out: str | Path, opts: Options = Options(), workers: int = 0,
            progress: bool = True) -> dict:
    """Write shards, manifest.json and skipped.tsv into `out`; returns the summary."""
    out = Path(out)
    if opts.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if not 1 <= opts.quality <= 100:
        raise DataError(f"--quality must be in 1..100, got {opts.quality}")
    for flag, value, low in (("--workers", workers, 0), ("--shard-bytes", opts.shard_bytes, 0),
                             ("--max-side", opts.max_side, 0), ("--max-pixels", opts.max_pixels, 1)):
        if value < low:
            raise DataError(f"{flag} must be >= {low}, got {value}")
    listing = list_sources(sources)
    _check_out(out)
    items = list(listing.items)
    if opts.shuffle:
        random.Random(opts.seed).shuffle(items)
    fingerprint = _fingerprint(items, opts, listing.classes)
    state = _load_state(out, fingerprint) or {"fingerprint": fingerprint, "shards": [],
                                              "next_item": 0, "skipped": []}
    _clean(out, {s["name"] for s in state["shards"]})
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest means "complete"; rewritten at the end

    resumed = len(state["shards"])
    writer = ShardWriter(out, opts, index=len(state["shards"]),
                         first_key=sum(s["samples"] for s in state["shards"]))
    writer.shards = list(state["shards"])
    skipped = [tuple(s) for s in state["skipped"]]
    ends = list(state.get("ends") or [])
    pending_skips: list = []
    workers = workers or os.cpu_count() or 1
    start = state["next_item"]
    chunk = 16
    chunks = [items[i:i + chunk] for i in range(start, len(items), chunk)]
    t0 = time.time()
    bar, task = _progress(len(items), start) if progress else (None, None)

    def results():
        if workers == 1:
            for c in chunks:
                yield c, _process_chunk(c, opts)
            return
        # A bounded window of chunks in flight: memory stays flat however many items there are;
        # a crashed worker raises BrokenProcessPool instead of hanging.
        with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            window = collections.deque()
            it = iter(chunks)
            for c in it:
                window.append((c, pool.submit(_process_chunk, c, opts)))
                if len(window) >= 4 * workers:
                    c0, f = window.popleft()
                    yield c0, f.result()
            while window:
                c0, f = window.popleft()
                yield c0, f.result()

    done = start
    try:
        if bar:
            bar.start()
        for c, res in results():
            for item, r in zip(c, res):
                done += 1
                if r[0] == "skip":
                    pending_skips.append((item.source, r[1], r[2]))
                    continue
                if writer.add(r[1], item.label, r[2]):
                    skipped += pending_skips
                    pending_skips = []
                    # resume point after each closed shard: (next item, skips so far) for shard i
                    ends += [[done - 1 + after, len(skipped)] for after in writer.closed_at]
                    _save_state(out, {"fingerprint": fingerprint, "shards": writer.shards,
                                      "next_item": ends[-1][0], "skipped": skipped, "ends": ends})
            if bar:
                bar.update(task, completed=done)
        writer.close()
    finally:
        if bar:
            bar.stop()
    skipped += pending_skips
    skipped = list(listing.skipped) + skipped
    if not writer.shards:
        raise DataError(f"no readable images in {', '.join(sources)} ({len(skipped)} skipped, "
                        f"see {out / REPORT}): check the sources")
    with open(out / REPORT, "w") as f:
        f.write("source\treason\tdetail\n")
        for s in skipped:
            f.write("\t".join(str(x).replace("\t", " ").replace("\n", " ") for x in s) + "\n")
    reasons = dict(sorted(collections.Counter(s[1] for s in skipped).items()))
    write_manifest(out, writer.shards, listing.classes, options=asdict(opts))
    ends += [[len(items), len(skipped) - len(listing.skipped)]] * (len(writer.shards) - len(ends))
    _save_state(out, {"fingerprint": fingerprint, "shards": writer.shards,
                      "next_item": len(items), "skipped": skipped[len(listing.skipped):], "ends": ends})
    return {"written": sum(s["samples"] for s in writer.shards), "shards": len(writer.shards),
            "skipped": reasons, "resumed_shards": resumed, "seconds": time.time() - t0,
            "report": str(out / REPORT)}


def _index_main(args) -> int:
    from rich.console import Console

    from simscale.data.index import index

    if args.sources:
        raise DataError("--index reads existing tars and takes no SRC: drop the sources, or drop --index")
    r = index(args.index, args.manifest_out, workers=args.workers or 8)
    Console(stderr=True).print(f"[green]indexed[/green] {r['samples']} samples in {r['shards']} tars; "
                               f"manifest: {r['manifest']}")
    return 0


def cli_main(args) -> int:
    if getattr(args, "verify", None):
        bad = verify_shards(args.verify)
        for line in bad:
            print(f"bad shard {line}")
        if bad:
            print(f"{len(bad)} bad shard(s) in '{args.verify}': re-run `simscale prepare` with the same "
                  "sources and --out to rebuild them")
            return 2
        print(f"all shards in '{args.verify}' match manifest.json")
        return 0
    if getattr(args, "index", None):
        return _index_main(args)
    if not args.sources or not args.out:
        raise DataError("prepare needs SRC... and --out DIR_OR_URL (or --index DIR_OR_URL for existing tars)")
    from simscale.data import remote

    if remote.is_url(args.out):  # write locally, then upload (simscale/data/upload.py)
        from simscale.data.upload import default_stage, remove_stage, upload

        stage = Path(args.stage) if getattr(args, "stage", None) else default_stage(args.out)
        cli_main(argparse.Namespace(**dict(vars(args), out=str(stage))))
        r = upload(stage, args.out)
        from rich.console import Console

        Console(stderr=True).print(f"[green]uploaded[/green] {r['uploaded']} shards to {args.out} "
                                   f"({r['skipped']} already there) and manifest.json last")
        if not getattr(args, "stage", None):
            remove_stage(stage)
        return 0
    opts = Options(shard_size=args.shard_size, shard_bytes=args.shard_bytes, max_side=args.max_side,
                   quality=args.quality, shuffle=args.shuffle, seed=args.seed,
                   max_pixels=args.max_pixels)
    summary = prepare(args.sources, args.out, opts, workers=args.workers)
    from rich.console import Console
    con = Console(stderr=True)
    skipped = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
    con.print(f"[green]wrote[/green] {summary['written']} images in {summary['shards']} shards to "
              f"{args.out} ({summary['seconds']:.1f} s; {summary['resumed_shards']} shards resumed)")
    con.print(f"skipped {sum(summary['skipped'].values())} ({skipped}); list: {summary['report']}")
    return 0
