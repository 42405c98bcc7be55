"""The `edgetune` command line: a thin layer over the stage functions.

Commands are loaded lazily (only the one being run is imported), so `edgetune verify`
or `edgetune run` on a device never imports torch.

Conventions (every command): ``--json`` prints a machine-readable result on stdout,
``--quiet`` silences logs and progress on stderr, and errors print one line and exit
with a documented code (see :mod:`edgetune.errors`).

The ``--json`` contract: every exit path prints exactly one JSON object on stdout. A command
prints its result with ``console.emit``; when it fails before printing one (bad input, a
failed check, a missing dependency, an internal error, a usage error), :func:`main` prints
``{"ok": false, "exit_code": N, "error": "...", "hint": "..."}``.

OS and library failures (full disk, read-only folder, non-UTF-8 file, truncated weights) are
turned into user errors in one place, :func:`edgetune.errors.translate`; only what it does not
recognise is an internal error (exit 4).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable

import click

from . import __version__, console
from .errors import EXIT_CODES, INTERNAL, translate

# name -> "module:attribute"; each module owns its command and its options.
COMMANDS: dict[str, str] = {
    "targets": "edgetune.commands.targets:targets",
    "doctor": "edgetune.commands.doctor:doctor",
    "finetune": "edgetune.commands.finetune:finetune",
    "merge": "edgetune.commands.merge:merge",
    "export": "edgetune.commands.export:export",
    "quantize": "edgetune.commands.quantize:quantize",
    "validate": "edgetune.commands.validate:validate",
    "profile": "edgetune.commands.profile:profile",
    "bundle": "edgetune.commands.bundle:bundle",
    "verify": "edgetune.commands.bundle:verify",
    "keygen": "edgetune.commands.bundle:keygen",
    "run": "edgetune.commands.run:run",
    "build": "edgetune.commands.build:build",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name in COMMANDS if self._spec_exists(name)]
        return lazy + sorted(set(self.commands) - set(lazy))

    @staticmethod
    def _spec_exists(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in COMMANDS or not self._spec_exists(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --json/--quiet to a command and configure the console before it runs.

    While the command runs, library output goes to its log file (console.library_output_to_log);
    on a failure that is not a user error the log's last lines are shown on stderr.
    """

    @click.option("--json", "json_output", is_flag=True, help="Print a machine-readable JSON result on stdout (also on errors).")
    @click.option("--quiet", "-q", is_flag=True, help="No logs or progress on stderr (errors still print).")
    @functools.wraps(func)
    def wrapper(*args: Any, json_output: bool, quiet: bool, **kwargs: Any) -> Any:
        console.configure(quiet=quiet, json_output=json_output)
        name = click.get_current_context().command_path.replace("edgetune", "").strip().replace(" ", "-") or "edgetune"
        with console.library_output_to_log(name):
            try:
                with console.results_only_stdout():
                    return func(*args, **kwargs)
            except Exception as exc:
                user = translate(exc)
                if user is None or user.exit_code == INTERNAL:
                    tail = console.log_tail()
                    if tail:
                        print(f"--- last lines of the log ({console.current_log()}) ---\n{tail}\n---", file=console.err(), flush=True)
                raise

    return wrapper


def force_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --force: replace an output folder that edgetune did not write (otherwise refused, exit 2)."""

    @click.option("--force", "force_replace", is_flag=True,
                  help="Replace the output folder even if edgetune did not write it (its files are deleted).")
    @functools.wraps(func)
    def wrapper(*args: Any, force_replace: bool, **kwargs: Any) -> Any:
        from .artifacts import replace_foreign

        with replace_foreign(force_replace):
            return func(*args, **kwargs)

    return wrapper


_EPILOG = "Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())


@click.group(cls=LazyGroup, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetune")
def cli() -> None:
    """edgetune: fine-tune, merge, export, quantize, validate and bundle small models for edge devices."""


def _json_error(argv: list[str], code: int, message: str, hint: str | None) -> None:
    """--json: one JSON object on stdout for a failed command, unless it already printed its result."""
    if not (console.MODE.json or "--json" in argv) or console.emitted():
        return
    import json

    print(json.dumps({"ok": False, "exit_code": code, "error": message, "hint": hint}), file=sys.stdout, flush=True)


def _fail(argv: list[str], code: int, message: str, hint: str | None = None, line: str | None = None) -> None:
    print(f"error: {line or message}", file=sys.stderr, flush=True)
    _json_error(argv, code, message, hint)
    sys.exit(code)


_INTERRUPTED = "{}; the output being written was discarded and its temp files removed, re-run to resume"


def main(argv: list[str] | None = None) -> None:
    """Entry point: turn errors into one line and their exit code, no traceback (see the module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    console.MODE.json = False
    console._STATE["emitted"] = 0
    from .cleanup import Terminated, install_signal_handlers, sweep_stale

    install_signal_handlers()  # SIGTERM unwinds like Ctrl-C: the temp files of the interrupted write are removed
    from .artifacts import sweep_locks

    sweep_stale(sweep_locks)  # temp folders and lock files that killed edgetune processes left
    try:
        cli.main(args=args, prog_name="edgetune", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        _json_error(args, exc.exit_code, exc.format_message(), "see --help")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort
        if isinstance(exc.__context__, KeyboardInterrupt):
            _fail(args, 130, _INTERRUPTED.format("interrupted (SIGINT)"))
        _fail(args, 130, "aborted")
    except KeyboardInterrupt:
        _fail(args, 130, _INTERRUPTED.format("interrupted (SIGINT)"))
    except Terminated:
        _fail(args, Terminated.exit_code, _INTERRUPTED.format("terminated (SIGTERM)"))
    except Exception as exc:
        user = translate(exc)
        if user is not None:
            if os.environ.get("EDGETUNE_DEBUG") and user is not exc:
                traceback.print_exc()
            _fail(args, user.exit_code, user.message, user.hint, line=user.one_line())
        # a bug: short line, trace only on request
        if os.environ.get("EDGETUNE_DEBUG"):
            traceback.print_exc()
        log = console.current_log()
        where = f"; full log: {log}" if log and log.is_file() else ""
        _fail(args, INTERNAL, f"internal error: {type(exc).__name__}: {exc}",
              "set EDGETUNE_DEBUG=1 for the traceback and report it",
              line=f"internal error: {type(exc).__name__}: {exc} (set EDGETUNE_DEBUG=1 for the traceback{where})")
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
