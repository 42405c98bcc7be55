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


def require(module: str, *, extra: str = "host", purpose: str = ""):
    """Import an optional module or raise MissingDependency with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised on device-only installs
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependency(
            f"Python package '{module}' is not installed{what}",
            hint=f"install the host extra: pip install 'edgetune[{extra}]' ({exc})",
        ) from exc
