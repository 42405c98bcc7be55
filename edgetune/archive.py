"""Reproducible ``.tar.gz`` archives of a folder, and safe extraction.

Packing: members sorted by path, regular files and folders only, mtime/uid/gid fixed,
uname/gname empty, modes normalized (0o755 for folders and executables, 0o644 otherwise),
and the gzip header written with mtime 0 and no file name. The same folder content gives
the same bytes, on any machine, at any time.

Extraction refuses (BadInput, nothing written outside the target folder) absolute paths,
``..`` components, symlinks and hard links (a bundle never needs them), device files and
FIFOs, members larger than ``max_member`` and archives larger than ``max_total`` in all, and,
for a bundle, any member not listed in its manifest or whose size is not the manifest's (an
archive that expands 1000x is refused before one byte is written). A destination without room
for the unpacked size, or a disk that fills while writing, is NoSpace (exit 5), not "corrupted".
Members are written into a temporary sibling folder that is renamed into place only when
every member was accepted, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

from .artifacts import atomic_dir
from .errors import BadInput

FIXED_MTIME = 0  # 1970-01-01; SOURCE_DATE_EPOCH overrides it
MAX_MEMBER = 8 << 30  # 8 GiB: larger than any model an edge device runs
MAX_TOTAL = 16 << 30
_BUF = 1 << 20


def _mtime() -> int:
    try:
        return int(os.environ.get("SOURCE_DATE_EPOCH", FIXED_MTIME))
    except ValueError:
        return FIXED_MTIME


def _members(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        for name in dirnames:
            out.append(d / name)
        for name in sorted(filenames):
            out.append(d / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def pack(folder: str | os.PathLike, archive: str | os.PathLike, *, prefix: str | None = None) -> Path:
    """Write ``folder`` to ``archive`` (.tar.gz), reproducibly; members live under ``prefix/``.

    ``prefix`` defaults to the folder's name. Symlinks and special files are refused.
    The archive is written to a temp file and renamed, so it is either complete or absent.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"not a folder: {root}", hint="give the bundle folder to archive")
    prefix = prefix if prefix is not None else root.name
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    from .cleanup import sweep_siblings

    sweep_siblings(archive)  # a partial archive of a killed run (dead pid) is removed
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    mtime = _mtime()
    try:
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

            def info(name: str, *, is_dir: bool, size: int = 0, executable: bool = False) -> tarfile.TarInfo:
                ti = tarfile.TarInfo(name)
                ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
                ti.mode = 0o755 if (is_dir or executable) else 0o644
                ti.mtime = mtime
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.size = size
                return ti

            if prefix:
                tar.addfile(info(prefix, is_dir=True))
            for p in _members(root):
                rel = p.relative_to(root).as_posix()
                name = f"{prefix}/{rel}" if prefix else rel
                st = p.lstat()
                if stat.S_ISDIR(st.st_mode):
                    tar.addfile(info(name, is_dir=True))
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        tar.addfile(info(name, is_dir=False, size=st.st_size, executable=bool(st.st_mode & 0o111)), f)
                else:
                    raise BadInput(f"{p}: only regular files and folders can be archived (found a link or special file)",
                                   hint="replace it with a copy of the file")
        os.replace(tmp, archive)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            from .artifacts import _tree_bytes
            from .errors import no_space

            raise no_space(archive, needed_bytes=_tree_bytes(root), cause=exc) from exc  # at most the folder's size
        raise
    return archive


SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.name.endswith(SUFFIXES)


def stem(path: str | os.PathLike) -> str:
    """The archive's name without its suffix (``cpu-x86.tar.gz`` -> ``cpu-x86``)."""
    name = Path(path).name
    return next((name[: -len(x)] for x in SUFFIXES if name.endswith(x)), name)


def _check_name(name: str, archive: Path) -> PurePosixPath:
    if not name or "\\" in name or "\0" in name:
        raise BadInput(f"{archive}: refused member name {name!r}", hint="the archive is not a valid bundle; rebuild it")
    pp = PurePosixPath(name)
    if pp.is_absolute() or name.startswith("/"):
        raise BadInput(f"{archive}: refused absolute member path '{name}'", hint="the archive is unsafe; do not use it")
    if ".." in pp.parts:
        raise BadInput(f"{archive}: refused member path '{name}' that escapes the folder (..)", hint="the archive is unsafe; do not use it")
    return pp


def extract(archive: str | os.PathLike, dest: str | os.PathLike, *, max_member: int = MAX_MEMBER,
            max_total: int = MAX_TOTAL) -> Path:
    """Safely unpack ``archive`` into the new folder ``dest``; returns ``dest``.

    Every member is checked before anything is written; refused archives raise BadInput and
    leave ``dest`` untouched (the work happens in a temporary sibling folder).
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise BadInput(f"archive not found: {archive}", hint="check the path")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadInput(f"{archive}: not a readable tar archive ({exc})", hint="the file is corrupted or truncated; copy it again") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib_error()) as exc:
            raise BadInput(f"{archive}: corrupted or truncated archive ({exc})", hint="copy it again") from exc
        total = 0
        for m in members:
            _check_name(m.name, archive)
            if m.issym() or m.islnk():
                raise BadInput(f"{archive}: refused link member '{m.name}' -> '{m.linkname}'", hint="bundles contain only regular files")
            if not (m.isfile() or m.isdir()):
                raise BadInput(f"{archive}: refused special member '{m.name}' (device, FIFO or other)", hint="bundles contain only regular files")
            if m.size > max_member:
                raise BadInput(f"{archive}: member '{m.name}' is {m.size} bytes, over the {max_member}-byte limit", hint="the archive is unsafe or not a bundle")
            total += m.size
            if total > max_total:
                raise BadInput(f"{archive}: unpacked size over the {max_total}-byte limit", hint="the archive is unsafe or not a bundle")
        _check_against_manifest(tar, members, archive)
        _check_free_space(dest, total)
        with atomic_dir(dest, inputs=(archive,), needed_bytes=total) as tmp:
            root = tmp.resolve()
            for m in members:
                target = (tmp / m.name).resolve()
                if target != root and root not in target.parents:  # belt and braces
                    raise BadInput(f"{archive}: member '{m.name}' resolves outside the folder", hint="the archive is unsafe")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise BadInput(f"{archive}: cannot read member '{m.name}'", hint="the archive is corrupted")
                written = 0
                try:
                    with src, open(target, "xb") as f:
                        while chunk := src.read(_BUF):
                            written += len(chunk)
                            if written > m.size:
                                raise BadInput(f"{archive}: member '{m.name}' longer than its header says", hint="the archive is corrupted")
                            f.write(chunk)
                except FileExistsError as exc:
                    raise BadInput(f"{archive}: duplicate member '{m.name}'", hint="the archive is not a valid bundle") from exc
                except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
                    if isinstance(exc, BadInput) or _disk_full(exc):
                        raise  # a full disk is exit 5 (atomic_dir), not a corrupted archive
                    raise BadInput(f"{archive}: corrupted or truncated member '{m.name}' ({exc})", hint="copy the archive again") from exc
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
    return dest


MAX_MANIFEST = 64 << 20


def _disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _check_free_space(dest: Path, total: int) -> None:
    """NoSpace (exit 5) before writing anything when the unpacked size does not fit where it goes."""
    import shutil

    from .errors import no_space

    probe = dest.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if total > free:
        raise no_space(dest, needed_bytes=total)


def _check_against_manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: Path) -> None:
    """A bundle archive's members must have the sizes its manifest lists, checked before anything is written.

    Without a readable manifest nothing is checked here (verify then reports the bundle as corrupted).
    """
    import json

    from .signing import MAX_SIGNATURE_BYTES, SIGNATURE

    cands = [m for m in members if m.isfile() and PurePosixPath(m.name).name == "manifest.json" and len(PurePosixPath(m.name).parts) <= 2]
    if len(cands) != 1 or cands[0].size > MAX_MANIFEST:
        return
    man = cands[0]
    try:
        f = tar.extractfile(man)
        data = json.loads(f.read()) if f is not None else None
    except (ValueError, RecursionError, tarfile.TarError, OSError, EOFError, zlib_error()):
        return
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return
    sizes = {str(e.get("path")): e.get("size") for e in files if isinstance(e, dict)}
    prefix = PurePosixPath(man.name).parent
    for m in members:
        if not m.isfile() or m is man:
            continue
        parts = PurePosixPath(m.name).parts
        # a bundle packed under a prefix (edgetune's own archives), or with its manifest at the root
        rel = "/".join(parts[len(prefix.parts):]) if parts[: len(prefix.parts)] == prefix.parts else None
        listed = sizes.get(rel) if rel is not None else None
        if listed is None and rel == SIGNATURE:  # signed after the manifest, so never listed in it
            if m.size > MAX_SIGNATURE_BYTES:
                raise BadInput(f"{archive}: member '{m.name}' is {m.size} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit "
                               "of a bundle signature", hint="the archive was modified; rebuild the bundle or copy it again")
            continue
        if listed is None:
            raise BadInput(f"{archive}: member '{m.name}' ({m.size} bytes) is not listed in the bundle's manifest",
                           hint="the archive was modified; rebuild the bundle or copy it again")
        if m.size != listed:
            raise BadInput(f"{archive}: member '{m.name}' is {m.size} bytes, the manifest says {listed}",
                           hint="the archive was modified or is not this bundle's; rebuild it or copy it again")


def zlib_error() -> type[BaseException]:
    import zlib

    return zlib.error


def single_root(folder: Path) -> Path:
    """The one top-level folder of an unpacked archive (bundles are packed under a prefix)."""
    entries = [p for p in folder.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


__all__ = ["pack", "extract", "is_archive", "single_root", "MAX_MEMBER", "MAX_TOTAL"]
