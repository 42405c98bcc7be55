"""`edgetune targets list|show`."""

from __future__ import annotations

import click

from .. import console
from ..cli import common_options
from ..targets import available, list_targets, load_target


@click.group()
def targets() -> None:
    """List and show deployment target profiles (targets/*.toml)."""


@targets.command("list")
@common_options
def list_cmd() -> None:
    """List every profile found on the search path."""
    items = [
        {
            "name": t.name,
            "kind": t.kind,
            "execution_provider": t.runtime.execution_provider,
            "llm": t.precision.llm,
            "encoder": t.precision.encoder,
            "description": t.description,
            "source": t.source,
        }
        for t in list_targets()
    ]
    console.emit(items, lambda rows: console.table(rows, ["name", "kind", "execution_provider", "llm", "encoder", "description"]), summary=False)


@targets.command("show")
@click.argument("name")
@common_options
def show_cmd(name: str) -> None:
    """Print the resolved profile NAME (a name from `targets list` or a .toml path)."""
    target = load_target(name)
    console.emit(target.model_dump(mode="json"), lambda d: _toml(d), summary=False)


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _toml(data: dict) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(data))


__all__ = ["targets", "available"]
