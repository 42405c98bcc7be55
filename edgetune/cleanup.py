"""Temp files edgetune leaves when it is killed: signals, and sweeping the leftovers of dead processes.

Every temp file or folder edgetune creates carries the creating process's pid in its name:

* ``.<output>.tmp-<pid>-<n>`` / ``.<output>.old-<pid>-<n>`` folders next to an output
  (``artifacts.atomic_dir``), ``.<file>.tmp-<pid>`` files next to an archive or JSON file
  (``archive.pack``, ``artifacts.write_json``);
* ``$TMPDIR/edgetune-<kind>-<pid>-<random>`` scratch folders (:func:`temp_dir`);
* lock files ``<lock_dir>/<name>-<hash>.lock`` (+ ``.json`` naming the holder's pid), swept by
  ``artifacts.sweep_locks`` (the output locks' module; this one imports no other edgetune module).

SIGTERM and SIGINT (:func:`install_signal_handlers`, called by ``cli.main``) raise an exception in
the main thread, so the ``with`` blocks that own these files remove them on the way out; the CLI
then prints one line and exits 143 / 130. SIGKILL cannot be handled: the next edgetune run sweeps
what a dead process left (:func:`sweep_siblings` before an output is written, :func:`sweep_stale`
at start). A leftover is removed only when its name matches one of edgetune's own patterns exactly
AND the pid in it is not a live process, so nothing edgetune did not write is ever deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

TEMP_PREFIX = "edgetune-"
_TMP_DIR = re.compile(r"^edgetune-([a-z0-9]+)-(\d+)-[A-Za-z0-9_]{6,}$")


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: ``except Exception`` does not swallow it)."""

    exit_code = 143


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (one of another user counts as live)."""
    if pid <= 0:
        return True  # never treat pid 0 / negative (process groups) as dead
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """``tempfile.TemporaryDirectory`` named ``edgetune-<kind>-<pid>-*``, so a later run can sweep it
    if this process is killed before it removes it."""
    assert re.fullmatch(r"[a-z0-9]+", kind), kind
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{kind}-{os.getpid()}-")


def _remove(p: Path) -> bool:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        return True
    except OSError:
        return False


def sweep_siblings(out: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>[-<n>]`` and ``.<name>.old-<pid>-<n>`` next to ``out`` whose pid is dead."""
    out = Path(out)
    return _sweep(out.parent, re.escape(out.name))


def sweep_work(folder: str | os.PathLike) -> list[Path]:
    """The same for every output inside ``folder``, a folder edgetune owns (a build's ``.work``)."""
    return _sweep(Path(folder), r".+")


def _sweep(folder: Path, name: str) -> list[Path]:
    pat = re.compile(r"^\." + name + r"\.(?:tmp-(\d+)(?:-\d+)?|old-(\d+)-\d+)$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if m and not pid_alive(int(m.group(1) or m.group(2))):
            if _remove(Path(e.path)):
                removed.append(Path(e.path))
    return removed


def sweep_temp(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove ``$TMPDIR/edgetune-<kind>-<pid>-*`` folders of dead pids that this user owns."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        m = _TMP_DIR.match(e.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        import stat as _stat

        if _stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and _remove(Path(e.path)):
            removed.append(Path(e.path))
    return removed


def sweep_stale(*more) -> None:
    """What a killed edgetune left in the temp folder, and whatever the ``more`` sweepers remove (the CLI passes
    ``artifacts.sweep_locks``: lock files belong to the output locks); best effort, never fails."""
    for sweep in (sweep_temp, *more):
        try:
            sweep()
        except Exception:  # noqa: BLE001 - cleanup must never turn a command into an error
            pass


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated` (SIGINT already raises KeyboardInterrupt) in the main thread."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


__all__ = ["Terminated", "install_signal_handlers", "pid_alive", "sweep_siblings", "sweep_stale",
           "sweep_temp", "sweep_work", "temp_dir"]
