"""Output conventions shared by every command.

* Results go to stdout: JSON with ``--json``, a short human summary otherwise.
* Logs and progress go to stderr, and ``--quiet`` silences them (errors still print).
* Libraries print on stdout (DeepSpeed's logger, the genai builder, calibrators): while a
  command runs, :func:`results_only_stdout` sends everything written to stdout to stderr
  and keeps the real stdout for :func:`emit`, so ``--json`` output always parses.
* Long work reports progress: a redrawn bar on a terminal, one line per step otherwise
  (so build logs stay readable).

Library code calls :func:`log`, :func:`step` and :func:`progress`; only the CLI sets the mode.

* Third-party output (builder progress bars, torch/torchao/pytree warnings, transformers
  logging, anything a library or native code writes to stderr) goes to a log file while a
  command runs (:func:`library_output_to_log`, file descriptor 2 redirected), so the console
  shows only edgetune's own lines (one or two per stage) and ``--quiet`` prints nothing but
  errors. The log is ``$EDGETUNE_LOG_DIR`` or ``<cache>/logs/<command>-<time>-<pid>.log``; on a
  failure that is not a user error its last lines are shown and its path is named.
  ``EDGETUNE_DEBUG=1`` or ``EDGETUNE_LIBRARY_LOGS=1`` leave library output on the console.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class _Mode:
    quiet: bool = False
    json: bool = False


MODE = _Mode()
_RESULTS: list[Any] = []  # stack of the streams results go to (set by results_only_stdout)
_CONSOLE: list[Any] = []  # the real stderr while library output goes to the log (library_output_to_log)
_STATE = {"emitted": 0, "log": None}  # results printed by emit() in this command; the current log file
LOG_TAIL_LINES = 20
KEEP_LOGS = 20


def err() -> Any:
    """The stream edgetune's own messages go to: the real stderr, even while libraries' go to the log."""
    return _CONSOLE[-1] if _CONSOLE else sys.stderr


def log_dir() -> Path:
    root = os.environ.get("EDGETUNE_LOG_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune") / "logs"


def current_log() -> Path | None:
    """The log file of the running (or last) command, if library output was captured."""
    return _STATE["log"]


@contextmanager
def library_output_to_log(name: str) -> Iterator[Path | None]:
    """While the block runs, everything written to file descriptor 2 (Python's sys.stderr, warnings,
    logging, tqdm, native code) goes to a log file; :func:`err` still reaches the terminal.

    Yields the log path (None when nothing is redirected: EDGETUNE_DEBUG/EDGETUNE_LIBRARY_LOGS set,
    or sys.stderr is not fd 2, e.g. under a test's capture). An empty log is removed at the end;
    only the newest ``KEEP_LOGS`` logs are kept.
    """
    try:
        fd_backed = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        fd_backed = False
    if not fd_backed or os.environ.get("EDGETUNE_DEBUG") or os.environ.get("EDGETUNE_LIBRARY_LOGS"):
        yield None
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = log_dir() / f"{name}-{stamp}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # no writable log folder: leave library output on the console
        yield None
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log_fd, 2)
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="replace")
    _CONSOLE.append(real)
    _STATE["log"] = path
    try:
        yield path
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        _CONSOLE.pop()
        real.close()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log_fd)
        try:
            if path.stat().st_size == 0:
                path.unlink()
                _STATE["log"] = None
            logs = sorted(path.parent.glob("*.log"), key=lambda p: p.stat().st_mtime)
            for old in logs[:-KEEP_LOGS]:
                old.unlink()
        except OSError:
            pass


def log_tail(lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the current log (progress-bar redraws collapsed), for a failure message."""
    path = current_log()
    if not path or not path.is_file():
        return ""
    try:
        data = path.read_bytes()[-65536:].decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [r.split("\r")[-1].rstrip() for r in data.split("\n")]
    rows = [r for r in rows if r.strip()][-lines:]
    return "\n".join(rows)


@contextmanager
def results_only_stdout() -> Iterator[None]:
    """While the block runs, stdout (Python's and file descriptor 1) goes to stderr; emit() still
    writes to the real stdout. Where sys.stdout is not fd 1 (a test's capture), only Python's is swapped."""
    real = sys.stdout
    try:
        fd_backed = real.fileno() == 1
    except (AttributeError, OSError, ValueError):
        fd_backed = False
    saved = None
    if fd_backed:
        real.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        out = os.fdopen(os.dup(saved), "w", encoding=getattr(real, "encoding", None) or "utf-8", closefd=True)
    else:
        out = real
    _RESULTS.append(out)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        _RESULTS.pop()
        sys.stdout = real
        if saved is not None:
            out.close()
            sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


def configure(*, quiet: bool = False, json_output: bool = False) -> None:
    MODE.quiet = quiet
    MODE.json = json_output
    _STATE["emitted"] = 0
    _STATE["log"] = None


def emitted() -> int:
    """How many results emit() printed since configure() (the CLI prints one JSON error only if none)."""
    return _STATE["emitted"]


def log(message: str) -> None:
    """One line on stderr, unless --quiet."""
    if not MODE.quiet:
        print(message, file=err(), flush=True)


def warn(message: str) -> None:
    """Warnings print even with --quiet: they are things a build script should see."""
    print(f"warning: {message}", file=err(), flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    """One progress line per stage: `[export] done in 12.3s` (or `failed after`).

    On a terminal a `[export] ...` line shows while it runs and is overwritten by the result;
    in a log (not a terminal) only the result line is written."""
    tty = not MODE.quiet and _isatty(err())
    if tty:
        print(f"[{name}] ...", end="\r", file=err(), flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        log(f"[{name}] failed after {time.perf_counter() - t0:.1f}s")
        raise
    log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


HEARTBEAT_S = 30.0  # not a terminal (CI logs, pipes): one progress line at most this often


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Iterate with progress on stderr: a bar on a terminal; otherwise a heartbeat line only for
    a long stage (at most one per :data:`HEARTBEAT_S`), so a log keeps one line per stage."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if MODE.quiet:
        yield from items
        return
    stream = err()
    tty = stream.isatty()
    t0 = last = time.perf_counter()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if not tty and (now - last < HEARTBEAT_S or n == total):
            continue
        last = now
        rate = n / (now - t0) if now > t0 else 0.0
        if total:
            eta = (total - n) / rate if rate > 0 else 0.0
            filled = int(24 * n / total)
            line = f"{desc} [{'#' * filled}{'.' * (24 - filled)}] {n}/{total} {rate:.1f}/s eta {eta:.0f}s"
        else:
            line = f"{desc} {n} {rate:.1f}/s"
        if tty:
            print("\r" + line, end="", file=stream, flush=True)
        else:
            print(line, file=stream, flush=True)
    if tty and n:
        print(file=stream, flush=True)


def _default(obj: Any) -> Any:
    from pathlib import Path

    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_default, sort_keys=False)


def out(text: str = "", end: str = "\n") -> None:
    """Write result text on the real stdout (e.g. tokens streamed by `edgetune run`)."""
    print(text, end=end, file=_RESULTS[-1] if _RESULTS else sys.stdout, flush=True)


def emit(result: Any, human: Callable[[Any], str] | str | None = None, *, summary: bool = True) -> None:
    """Print a command's result on stdout: JSON under --json, else the human text.

    ``summary``: the text only reports work done (export, build, ...), so ``--quiet`` hides it
    (a quiet successful command prints nothing); ``summary=False`` for results that are the
    answer itself (``run``, ``targets``, ``doctor``)."""
    _STATE["emitted"] += 1
    if MODE.json:
        out(to_json(result))
        return
    if MODE.quiet and summary:
        return
    if human is None:
        text = to_json(result)
    elif callable(human):
        text = human(result)
    else:
        text = human
    if text:
        out(text)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain fixed-width text table (no dependency)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[str(c) for c in columns]] + [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
