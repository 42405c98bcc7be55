"""Artifacts on disk: every stage turns folders into a folder plus a small JSON record.

The record (``edgetune.json`` in the output folder) says what made the artifact: the
stage, the content hashes of its inputs, its options, library versions, timings and
results. Its ``fingerprint`` (stage + input hashes + options + the code that makes the stage, see
``stage_code``) is what ``edgetune build`` compares to skip a stage whose inputs, options and code did not change.

Outputs are written to a temporary sibling folder and renamed into place only when the
stage succeeded, so an interrupted stage never leaves a folder that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from . import __version__
from .stage_code import source_hash

RECORD_NAME = "edgetune.json"
RECORD_FORMAT = 1
_CHUNK = 1 << 20
_hash_cache: dict[tuple[str, int, int], str] = {}

# Libraries whose versions matter for reproducing an artifact. Read from package
# metadata, never by importing them (importing torch on a device is not allowed).
TRACKED_PACKAGES = (
    "onnxruntime", "onnxruntime-genai", "onnx", "numpy", "tokenizers", "torch", "transformers",
    "peft", "neural-compressor", "bitsandbytes", "accelerate",
    "onnx-ir", "onnxscript", "gguf", "deepspeed",
)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _hash_cache:
        return _hash_cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _hash_cache[key] = digest
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_files(root: Path, *, exclude: tuple[str, ...] = (RECORD_NAME,)) -> Iterator[Path]:
    """Regular files below root in a stable order, skipping the record itself."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in exclude or p.is_symlink():
                continue
            yield p


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file, or of a folder (relative names + file hashes; record excluded)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(str(p))
    h = hashlib.sha256()
    for f in iter_files(p):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
        h.update(b"\n")
    return h.hexdigest()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {"edgetune": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """py-cpuinfo's report, computed once per process (it takes ~2 s: it runs CPUID in a subprocess)."""
    try:
        import cpuinfo  # py-cpuinfo, pure python

        return dict(cpuinfo.get_cpu_info())
    except Exception:  # pragma: no cover - best effort only
        return {}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    info["cpu"] = cpu_info().get("brand_raw") or platform.processor() or None
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        pass
    return info


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    return obj


@functools.lru_cache(maxsize=None)
def code_identity(stage: str) -> str:
    """The code behind ``stage``'s outputs in this process: its edgetune modules' source (``stage_code``) and the
    versions of the libraries that shape artifacts. Cached: the code does not change under a running process."""
    versions = ",".join(f"{k}={v}" for k, v in sorted(package_versions().items()))
    return sha256_bytes(f"{source_hash(stage)}|{versions}".encode())


def fingerprint(stage: str, input_hashes: Mapping[str, str], options: Mapping[str, Any]) -> str:
    """What must match for an output to count as made from these inputs and options by this stage: their hashes
    and the stage's code identity (its edgetune modules' source and the library versions)."""
    payload = json.dumps(
        {"stage": stage, "inputs": _canonical(input_hashes), "options": _canonical(options), "code": code_identity(stage)},
        sort_keys=True,
        default=str,
    )
    return sha256_bytes(payload.encode())


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(folder) / RECORD_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_canonical(data), indent=2, default=str) + "\n")
    os.replace(tmp, p)


# -- output folders: ownership, locking, atomic replacement ------------------------------------

# `--force` on a command sets this (edgetune.cli): replace an output folder edgetune did not write.
_REPLACE_FOREIGN: ContextVar[bool] = ContextVar("edgetune_replace_foreign", default=False)


@contextmanager
def replace_foreign(allowed: bool = True) -> Iterator[None]:
    """Within the block, output folders that edgetune did not write may be replaced (``--force``)."""
    token = _REPLACE_FOREIGN.set(allowed)
    try:
        yield
    finally:
        _REPLACE_FOREIGN.reset(token)


def is_edgetune_output(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is something edgetune wrote: a stage record (edgetune.json with a stage),
    a bundle manifest, or a build output (build-summary.json / .work with stage states)."""
    p = Path(folder)
    rec = read_record(p)
    if isinstance(rec, dict) and rec.get("stage") and "fingerprint" in rec:
        return True
    try:
        manifest = json.loads((p / "manifest.json").read_text())
        if isinstance(manifest, dict) and manifest.get("format") == "edgetune-bundle":
            return True
    except (OSError, ValueError):
        pass
    return (p / "build-summary.json").is_file() or (p / ".work" / "state").is_dir()


def _input_paths(inputs: Iterable[Any]) -> list[Path]:
    """The inputs that are paths on disk (aliases, options and None are skipped)."""
    return [Path(v) for v in inputs if isinstance(v, (str, os.PathLike)) and str(v) and Path(v).exists()]


def check_not_input(out: str | os.PathLike, inputs: Iterable[Any], *, what: str = "output folder") -> None:
    """Refuse (exit 2, even with ``--force``) an output that is, or contains, one of the command's inputs.

    Replacing ``out`` deletes it: ``bundle w/x -o w --force`` would delete ``w/x`` and every
    file beside it. Compared by real path, so symlinks and ``..`` do not slip through.
    """
    from .errors import BadInput

    real_out = Path(os.path.realpath(out))
    for src in _input_paths(inputs):
        real_in = Path(os.path.realpath(src))
        if real_in == real_out or real_out in real_in.parents:
            rel = "is" if real_in == real_out else "contains"
            raise BadInput(f"{what} {out} {rel} the input {src}; replacing it would delete the input",
                           hint="give an output folder outside the input (e.g. a new sibling folder)")


def check_replaceable(out: str | os.PathLike, *, what: str = "output folder", inputs: Iterable[Any] = ()) -> None:
    """Refuse (exit 2) to replace ``out`` unless it is absent, empty, or an edgetune artifact.

    Never deleting what edgetune did not write: ``-o ~/Documents`` must not wipe the folder.
    ``--force`` (``replace_foreign``) overrides for folders; a file is never replaced. An output
    that is or contains one of ``inputs`` is refused whatever ``--force`` says (``check_not_input``).
    """
    from .errors import BadInput

    check_not_input(out, inputs, what=what)
    p = Path(out)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir():
        raise BadInput(f"{what} {p} exists and is not a folder", hint="give a new folder name")
    if _REPLACE_FOREIGN.get() or is_edgetune_output(p):
        return
    try:
        entries = sorted(x.name for x in p.iterdir())
    except OSError:
        entries = ["?"]
    if not entries:
        return
    shown = ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" if len(entries) > 3 else "")
    raise BadInput(f"{what} {p} is not empty and was not written by edgetune ({shown}); refusing to replace it",
                   hint="give a new or empty folder, or add --force to replace it")


def lock_dir() -> Path:
    """Where output locks live: $EDGETUNE_LOCK_DIR, else <cache>/locks ($EDGETUNE_CACHE or ~/.cache/edgetune).

    Not next to the output: a lock file must outlive its release (unlinking a locked file splits
    waiters across inodes), and edgetune must not leave files in folders the user owns.
    """
    root = os.environ.get("EDGETUNE_LOCK_DIR") or Path(os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune") / "locks"
    return Path(root)


def _lock_file(out: Path) -> Path:
    real = os.path.realpath(out)
    return lock_dir() / f"{Path(real).name[:40]}-{sha256_bytes(real.encode())[:16]}.lock"


@contextmanager
def output_lock(out: str | os.PathLike, *, what: str = "output folder") -> Iterator[None]:
    """Hold an advisory lock on ``out`` while a stage or build writes it; a second writer fails fast (exit 2).

    Uses the ``filelock`` package (an flock on ``<lock_dir>/<name>-<hash of the real path>.lock``; a base
    dependency, pure Python), so it excludes writers on this machine (not across NFS clients). It fails
    fast instead of waiting: a second build into the same folder is almost always a mistake (two
    precisions into one output), and a waiting process would then silently overwrite the first one's
    result. The holder (pid, command, start time) is written to ``<lock file>.json`` and named in
    the error. The lock is re-entrant within a process (a build holding its output folder may run
    stages that lock their own folders, and nested calls on the same folder are fine).
    """
    from filelock import FileLock, Timeout

    from .errors import BadInput

    out = Path(out).absolute()
    key = os.path.realpath(out)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock_path = _lock_file(out)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError:  # a read-only cache: locks in the temp folder instead
        import tempfile

        lock_path = Path(tempfile.gettempdir()) / f"edgetune-locks-{os.getuid()}" / lock_path.name
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    info_path = lock_path.with_name(lock_path.name + ".json")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(info_path)
        raise BadInput(f"{what} {out} is being written by another edgetune process ({holder})",
                       hint="wait for it to finish, or give another output folder") from None
    _HELD[key] = 1
    try:
        try:
            import sys

            info_path.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:300],
                                             "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}))
        except OSError:
            pass
        yield
    finally:
        _HELD.pop(key, None)
        try:
            info_path.unlink()
        except OSError:
            pass
        lock.release()


_HELD: dict[str, int] = {}
LOCK_MIN_AGE_S = 600  # a lock file not touched for this long and not held is stale


def sweep_locks(folder: str | os.PathLike | None = None, *, min_age_s: float = LOCK_MIN_AGE_S) -> list[Path]:
    """Remove lock files (``*.lock`` + ``*.lock.json``) under the lock folder that nobody holds and nobody
    touched for ``min_age_s``. Each is unlinked while this process holds its lock (filelock re-checks the
    inode after locking, so a waiter on the old inode retries on a new file)."""
    from filelock import FileLock, Timeout

    folder = Path(folder or lock_dir())
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.endswith(".lock") and e.is_file(follow_symlinks=False)]
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        p = Path(e.path)
        info = p.with_name(p.name + ".json")
        try:
            if now - max(p.stat().st_mtime, info.stat().st_mtime if info.exists() else 0) < min_age_s:
                continue
        except OSError:
            continue
        if _HELD:  # this process holds an output lock: never touch lock files while it does
            break
        lock = FileLock(str(p), timeout=0)
        try:
            lock.acquire()
        except (Timeout, OSError):
            continue  # held by a live process (or not ours to lock)
        try:
            info.unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            pass
        finally:
            lock.release()
    return removed


def _read_holder(info_path: Path) -> str:
    try:
        h = json.loads(info_path.read_text())
        return f"pid {h.get('pid')}, since {h.get('since')}: {h.get('command')}"
    except (OSError, ValueError):
        return "holder unknown"


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


@contextmanager
def atomic_dir(out: str | os.PathLike, *, needed_bytes: int | None = None, inputs: Iterable[Any] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` atomically.

    ``out`` is locked for the whole write (``output_lock``) and must be replaceable
    (``check_replaceable``; an ``out`` that is or contains one of ``inputs`` never is). On any
    exception the temporary folder is removed and ``out`` is left untouched; a full disk becomes :class:`edgetune.errors.NoSpace` (exit 5) naming the device and
    roughly how much was needed (what had been written when it ran out, or ``needed_bytes``).
    """
    from .errors import no_space

    out = Path(out)
    with output_lock(out):
        check_replaceable(out, inputs=inputs)
        from .cleanup import sweep_siblings

        sweep_siblings(out)  # what a killed writer of this output left (its pid is dead; we hold the lock)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(out, needed_bytes=needed_bytes, cause=exc) from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                from .errors import BadInput

                what = "is on a read-only file system" if exc.errno == errno.EROFS else "is not writable (permission denied)"
                raise BadInput(f"cannot write {out}: {out.parent} {what}", hint="give an output folder you can write to") from exc
            raise
        try:
            yield tmp
        except BaseException as exc:
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            written = _tree_bytes(tmp) if full else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise no_space(out, needed_bytes=max(written, needed_bytes or 0) or None, cause=exc) from exc
            raise
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)


@dataclass
class StageRun:
    """Handle given to a stage body: write files into ``dir``, put figures into ``results``."""

    stage: str
    out: Path
    dir: Path
    record: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)


def input_hashes(inputs: Mapping[str, Any]) -> dict[str, str]:
    """Hash each input: paths by content, anything else by its JSON form. None is skipped."""
    hashes: dict[str, str] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            hashes[name] = hash_path(value)
        else:
            hashes[name] = sha256_bytes(json.dumps(_canonical(value), sort_keys=True, default=str).encode())
    return hashes


def up_to_date(out: str | os.PathLike, stage: str, inputs: Mapping[str, Any], options: Mapping[str, Any]) -> dict | None:
    """The existing record of ``out`` if it was made by this stage from the same inputs and options."""
    record = read_record(out)
    if not record or record.get("stage") != stage:
        return None
    if record.get("fingerprint") != fingerprint(stage, input_hashes(inputs), options):
        return None
    return record


@contextmanager
def stage_output(
    out: str | os.PathLike,
    stage: str,
    *,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> Iterator[StageRun]:
    """Run a stage body into a temp folder, then write its record and rename into place.

    ``inputs`` maps names to paths (hashed by content) or plain values; ``options`` is
    any JSON-able mapping. The record lands in ``<out>/edgetune.json``.
    """
    out = Path(out)
    hashes = input_hashes(inputs)
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {
            name: {"path": str(v) if isinstance(v, (str, os.PathLike)) else None, "sha256": hashes[name]}
            for name, v in inputs.items()
            if name in hashes
        },
        "options": _canonical(options),
        "fingerprint": fingerprint(stage, hashes, options),
        "code": code_identity(stage),
        "versions": package_versions(),
        "machine": machine_info(),
    }
    t0 = time.perf_counter()
    # what a full disk message says was needed, when less had been written: the inputs' size
    # (an fp32 export or a merge is about its input; quantized outputs are smaller)
    estimate = sum(_tree_bytes(Path(v)) if Path(v).is_dir() else Path(v).stat().st_size
                   for v in inputs.values() if isinstance(v, (str, os.PathLike)) and Path(v).exists())
    with atomic_dir(out, needed_bytes=estimate or None, inputs=inputs.values()) as tmp:
        run = StageRun(stage=stage, out=out, dir=tmp, record=record)
        yield run
        record["timings"] = {"total_s": round(time.perf_counter() - t0, 3), **record.get("timings", {})}
        record["results"] = _canonical(run.results)
        write_json(tmp / RECORD_NAME, record)
