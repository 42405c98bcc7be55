"""Error types and the exit codes they map to (documented in README.md).

Every error a user can cause is an :class:`EdgetuneError` whose message is one line
that names the problem and the fix. The CLI prints it without a traceback and exits
with the error's code.
"""

from __future__ import annotations

OK = 0
BUDGET_FAILED = 1  # a validation check / budget / merge gate was missed
BAD_INPUT = 2  # bad usage or input: missing file, malformed data, unknown target, ...
MISSING_DEPENDENCY = 3  # a Python package or execution provider is not available here
INTERNAL = 4  # a bug in edgetune or a library it drives

EXIT_CODES = {
    OK: "success",
    BUDGET_FAILED: "a validation check, budget or merge gate failed",
    BAD_INPUT: "bad input or usage (missing file, malformed data, unknown target, unsupported model, corrupted bundle)",
    MISSING_DEPENDENCY: "a required package or execution provider is missing on this machine",
    INTERNAL: "internal error (please report it with the log)",
}


class EdgetuneError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code = INTERNAL

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint.rstrip('.')}"
        return text.replace("\n", " ") + "."


class BadInput(EdgetuneError):
    """The user gave us something we cannot use (exit 2)."""

    exit_code = BAD_INPUT


class CheckFailed(EdgetuneError):
    """A gate or budget was missed (exit 1). Carries the result for reporting."""

    exit_code = BUDGET_FAILED

    def __init__(self, message: str, *, hint: str | None = None, result: object = None):
        super().__init__(message, hint=hint)
        self.result = result


class MissingDependency(EdgetuneError):
    """A package or execution provider is missing (exit 3)."""

    exit_code = MISSING_DEPENDENCY


class UnloadableGraph(EdgetuneError):
    """A graph edgetune (or the builder it drives) wrote that onnxruntime refuses to load (exit 4: their bug, not a
    missed budget). A recipe search records it against the candidate and goes on."""


def not_a_file(path, what: str, *, hint: str = "check the path") -> BadInput:
    """BadInput for a ``what`` input that is not a regular file: "not found" only when nothing is there,
    else what is there instead (a FIFO, a folder, a device, a socket)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return BadInput(f"{what} not found: {path}", hint=hint)
    except OSError as exc:
        return BadInput(f"{what} cannot be read: {path} ({exc.strerror})", hint=hint)
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return BadInput(f"{what} {path} is not a regular file (it is {kind})",
                    hint="give a regular file (write a stream to a file first)")


def require(module: str, *, extra: str = "host", purpose: str = ""):
    """Import an optional module or raise MissingDependency with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised on device-only installs
        what = f" (needed for {purpose})" if purpose else ""
        from importlib import metadata

        dists = metadata.packages_distributions().get(module.split(".")[0]) or []
        if dists and getattr(exc, "name", None) != module.split(".")[0]:
            # the package is there but importing it failed (a broken install or a missing shared library)
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise MissingDependency(f"Python package '{module}' is installed but cannot be imported{what}: {reason}",
                                    hint=f"reinstall it (pip install --force-reinstall {dists[0]}) or fix what it needs") from exc
        raise MissingDependency(
            f"Python package '{module}' is not installed{what}",
            hint=f"install the host extra: pip install 'edgetune[{extra}]' ({exc})",
        ) from exc


# --------------------------------------------------------------------------------------------
# One place that turns OS and library failures into user errors (used by cli.main).
#
# Stage code raises BadInput/CheckFailed/MissingDependency where it knows the cause. What it
# does not catch (a full disk, a read-only folder, a truncated weights file inside a library,
# a file that is not UTF-8) reaches :func:`translate`, which maps it to a one-line error with
# a documented exit code. Anything it does not recognise stays an internal error (exit 4): a bug.

NO_SPACE = 5  # out of disk space or disk quota while writing an output
EXIT_CODES[NO_SPACE] = "no space left on the device (or disk quota exceeded) while writing an output; nothing partial was left"

import errno as _errno  # noqa: E402


class NoSpace(EdgetuneError):
    """The disk (or quota) ran out while writing (exit 5). Outputs are written to a temp folder
    first, so nothing partial is left behind."""

    exit_code = NO_SPACE


def _mount_of(path) -> tuple[str, str]:
    """(mount point, device/file-system name) that holds ``path`` (best effort, Linux /proc/mounts)."""
    import os

    p = os.path.abspath(str(path))
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    mount = p
    while not os.path.ismount(mount) and mount != os.path.dirname(mount):
        mount = os.path.dirname(mount)
    device = mount
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == mount:
                    device = f"{mount} ({parts[2]} {parts[0]})"
    except OSError:
        pass
    return mount, device


def no_space(path, *, needed_bytes: int | None = None, cause: BaseException | None = None) -> NoSpace:
    """A NoSpace error naming the device that holds ``path``, its free space and what was needed."""
    import shutil

    mount, device = _mount_of(path)
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        free = None
    def mb(n: float) -> str:
        return f"{n / 2**20:.1f}" if n < 10 * 2**20 else f"{n / 2**20:.0f}"

    need = f" (needed ~{mb(needed_bytes)} MB" if needed_bytes else " (needed more"
    need += f", {mb(free)} MB free)" if free is not None else ")"
    quota = " or disk quota exceeded" if getattr(cause, "errno", None) == _errno.EDQUOT else ""
    return NoSpace(f"no space left on {device}{quota} while writing {path}{need}; nothing partial was kept",
                   hint="free some space or give an output folder on another disk, then re-run")


_DISK_FULL = {_errno.ENOSPC, _errno.EDQUOT}
_NOT_WRITABLE = {_errno.EACCES, _errno.EPERM, _errno.EROFS}


def _library_kind(exc: BaseException) -> str | None:
    """Which file format's reader raised ``exc`` (by the exception's type and module), if any."""
    names = [f"{c.__module__}.{c.__name__}" for c in type(exc).__mro__]
    text = str(exc)
    if any("safetensors" in n for n in names) or "safetensors" in text.lower() and "deserializ" in text.lower():
        return "safetensors"
    if any(n.startswith("google.protobuf") for n in names) or any("onnx.onnx_cpp2py_export" in n for n in names):
        return "ONNX"
    if any(n.startswith("onnxruntime") for n in names) and any(k in text for k in ("Protobuf parsing failed", "INVALID_PROTOBUF", "model_path", "Load model")):
        return "ONNX"
    return None


def translate(exc: BaseException) -> EdgetuneError | None:
    """The user error an OS/library exception stands for, or None (a real bug: exit 4)."""
    if isinstance(exc, EdgetuneError):
        return exc
    if isinstance(exc, UnicodeDecodeError):
        where = getattr(exc, "edgetune_path", None)
        return BadInput(f"{where + ': ' if where else ''}not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}: {exc.reason})",
                        hint="save the file as UTF-8")
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        path = getattr(exc, "edgetune_path", None) or exc.filename or "."
        return no_space(path, needed_bytes=getattr(exc, "edgetune_needed", None), cause=exc)
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
        what = "read-only file system" if exc.errno == _errno.EROFS else "permission denied"
        path = exc.filename or getattr(exc, "edgetune_path", None) or "a file"
        return BadInput(f"{what}: {path}", hint="choose a folder you can write to (or fix its permissions)")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and exc.filename:
        return BadInput(f"{exc.strerror or 'not found'}: {exc.filename}", hint="check the path")
    peft_no_match = type(exc).__name__ == "NoMatchingPeftModuleError" or (
        isinstance(exc, ValueError) and "not found in the base model" in str(exc) and "Target modules" in str(exc))
    if peft_no_match:
        return BadInput(f"peft: {str(exc).splitlines()[0]}", hint="give --target-modules names of the model's linear layers, or all-linear")
    if any(c.__module__.startswith("jinja2") for c in type(exc).__mro__):  # a chat template rendered by transformers
        return BadInput(f"the model's chat template fails in the Jinja sandbox ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                        hint="fix or remove the model's chat template (chat_template.jinja / tokenizer_config.json)")
    kind = _library_kind(exc)
    if kind:
        return BadInput(f"{kind} file truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                        hint="re-create or copy the file again")
    return None


class reading:
    """Context manager: any failure of a file reader inside becomes BadInput naming the file.

    Used around library readers that raise generic errors (IndexError, struct.error, ValueError)
    on truncated or corrupt files, e.g. ``gguf.GGUFReader``::

        with reading(path, "GGUF"):
            reader = gguf.GGUFReader(path)
    """

    def __init__(self, path, kind: str):
        self.path, self.kind = path, kind

    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        if exc is None or isinstance(exc, (EdgetuneError, KeyboardInterrupt, MemoryError, SystemExit)):
            return False
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL | _NOT_WRITABLE:
            return False
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise BadInput(f"{self.path}: {self.kind} file truncated or corrupt ({type(exc).__name__}{': ' + detail if detail else ''})",
                       hint=f"the file is damaged or not a {self.kind} file; download or copy it again") from exc


def import_or_explain(module: str, *, dist: str, hint: str):
    """Import ``module``; if it fails, say whether the package is missing or installed but broken."""
    import importlib
    from importlib import metadata

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, OSError from a shared library, ...
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise MissingDependency(f"{dist} is not installed", hint=hint) from exc
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise MissingDependency(f"{dist} {version} is installed but cannot be imported: {reason}",
                                hint=f"reinstall it (pip install --force-reinstall {dist}=={version}) or fix the library it needs") from exc
