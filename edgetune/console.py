"""Output conventions shared by every command.

* Results go to stdout: JSON with ``--json``, a short human summary otherwise.
* Logs and progress go to stderr, and ``--quiet`` silences them (errors still print).
* Libraries print on stdout (DeepSpeed's logger, the genai builder, calibrators): while a
  command runs, :func:`results_only_stdout` sends everything written to stdout to stderr
  and keeps the real stdout for :func:`emit`, so ``--json`` output always parses.
* Long work reports progress: a redrawn bar on a terminal, one line per step otherwise
  (so build logs stay readable).

Library code calls :func:`log`, :func:`step` and :func:`progress`; only the CLI sets the mode.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class _Mode:
    quiet: bool = False
    json: bool = False


MODE = _Mode()
_RESULTS: list[Any] = []  # stack of the streams results go to (set by results_only_stdout)


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


def log(message: str) -> None:
    """One line on stderr, unless --quiet."""
    if not MODE.quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Warnings print even with --quiet: they are things a build script should see."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log the start and duration of a stage: `[export] ... done in 12.3s`."""
    log(f"[{name}] started")
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        log(f"[{name}] failed after {time.perf_counter() - t0:.1f}s")
        raise
    log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Iterate with progress on stderr: a bar on a terminal, ~10 lines otherwise."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if MODE.quiet:
        yield from items
        return
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    every = max(1, (total or 10) // 10)
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        if tty or n % every == 0 or n == total:
            elapsed = time.perf_counter() - t0
            rate = n / elapsed if elapsed > 0 else 0.0
            if total:
                eta = (total - n) / rate if rate > 0 else 0.0
                filled = int(24 * n / total)
                line = f"{desc} [{'#' * filled}{'.' * (24 - filled)}] {n}/{total} {rate:.1f}/s eta {eta:.0f}s"
            else:
                line = f"{desc} {n} {rate:.1f}/s"
            if tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
    if tty and n:
        print(file=sys.stderr, flush=True)


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


def emit(result: Any, human: Callable[[Any], str] | str | None = None) -> None:
    """Print a command's result on stdout: JSON under --json, else the human text."""
    if MODE.json:
        out(to_json(result))
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
