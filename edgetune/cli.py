"""The `edgetune` command line: a thin layer over the stage functions.

Commands are loaded lazily (only the one being run is imported), so `edgetune verify`
or `edgetune run` on a device never imports torch.

Conventions (every command): ``--json`` prints a machine-readable result on stdout,
``--quiet`` silences logs and progress on stderr, and errors print one line and exit
with a documented code (see :mod:`edgetune.errors`).
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
from .errors import EXIT_CODES, INTERNAL, EdgetuneError

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
    """Add --json/--quiet to a command and configure the console before it runs."""

    @click.option("--json", "json_output", is_flag=True, help="Print a machine-readable JSON result on stdout.")
    @click.option("--quiet", "-q", is_flag=True, help="No logs or progress on stderr (errors still print).")
    @functools.wraps(func)
    def wrapper(*args: Any, json_output: bool, quiet: bool, **kwargs: Any) -> Any:
        console.configure(quiet=quiet, json_output=json_output)
        with console.results_only_stdout():
            return func(*args, **kwargs)

    return wrapper


_EPILOG = "Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())


@click.group(cls=LazyGroup, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetune")
def cli() -> None:
    """edgetune: fine-tune, merge, export, quantize, validate and bundle small models for edge devices."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: turn EdgetuneError into one line and its exit code, no traceback."""
    try:
        cli.main(args=argv, prog_name="edgetune", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except EdgetuneError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; outputs being written were discarded, re-run to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug: short line, trace only on request
        if os.environ.get("EDGETUNE_DEBUG"):
            traceback.print_exc()
        print(
            f"error: internal error: {type(exc).__name__}: {exc} (set EDGETUNE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(INTERNAL)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
