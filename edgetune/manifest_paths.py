"""Every path a bundle manifest names is checked like its ``files[]`` entries (device side, stdlib only).

A manifest names paths outside ``files[]`` too: ``model_dir``, ``target.file``,
``validation.report`` and ``validation.reference``. ``run`` and ``validate`` open them, so a
manifest that points one of them at ``/etc/...`` or ``../elsewhere`` (and is rehashed) must
not make edgetune load a file from outside the bundle. Each named path must be relative,
without ``..``, stay inside the bundle folder after symlinks are resolved, and be listed:
a file among ``files[]``, a folder as the parent of at least one listed file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BadInput

# (key in the manifest, dotted name shown to the user, file or folder)
NAMED = (
    (("model_dir",), "model_dir", "folder"),
    (("target", "file"), "target.file", "file"),
    (("validation", "report"), "validation.report", "file"),
    (("validation", "reference"), "validation.reference", "folder"),
)


def unsafe_reason(rel: Any) -> str | None:
    """Why ``rel`` (a path a manifest names) cannot be a path inside a bundle, or None."""
    if not isinstance(rel, str) or not rel:
        return "is not a path"
    if "\\" in rel or "\0" in rel:
        return "holds a backslash or NUL"
    pp = PurePosixPath(rel)
    if pp.is_absolute() or rel.startswith("/"):
        return "is an absolute path"
    if ".." in pp.parts:
        return "escapes the bundle (..)"
    return None


def _inside(folder: Path, rel: str) -> bool:
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, rel))
    return real == root or real.startswith(root + os.sep)


def named_paths(manifest: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(dotted name, value, file|folder) of every path the manifest names outside ``files[]``."""
    out = []
    for keys, name, kind in NAMED:
        node: Any = manifest
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            out.append((name, node, kind))
    return out


def problems(folder: Path, manifest: dict[str, Any], listed: set[str]) -> list[dict[str, str]]:
    """Verify problems (``unsafe``/``missing``) of the paths the manifest names; ``listed``: its files[] paths."""
    out = []
    for name, rel, kind in named_paths(manifest):
        why = unsafe_reason(rel)
        if why is None and not _inside(folder, rel):
            why = "resolves outside the bundle (a symbolic link)"
        if why is not None:
            out.append({"path": str(rel), "problem": "unsafe", "detail": f"manifest {name} {why}"})
            continue
        norm = PurePosixPath(rel).as_posix()
        ok = norm in listed if kind == "file" else any(p.startswith(norm + "/") for p in listed)
        if not ok:
            out.append({"path": norm, "problem": "missing", "detail": f"manifest {name} names a {kind} that files[] does not list"})
    return out


def resolve(folder: Path, manifest: dict[str, Any], name: str, default: str) -> Path:
    """``folder / <the path the manifest names as name>`` (default when it names none); BadInput when unsafe.

    For callers that open a named path without a full verify (``run --no-verify``).
    """
    value = dict((n, v) for n, v, _ in named_paths(manifest)).get(name, default)
    why = unsafe_reason(value)
    if why is None and not _inside(folder, value):
        why = "resolves outside the bundle (a symbolic link)"
    if why is not None:
        raise BadInput(f"{folder}: manifest {name} {value!r} is refused: it {why}",
                       hint="the bundle was modified; rebuild it or copy it again")
    return folder / value


__all__ = ["named_paths", "problems", "resolve", "unsafe_reason"]
