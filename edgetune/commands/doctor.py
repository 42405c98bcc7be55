"""`edgetune doctor`."""

from __future__ import annotations

import click

from .. import console
from ..cli import common_options
from ..doctor import human, report


@click.command()
@common_options
def doctor() -> None:
    """Versions, execution providers, CPU features, and which targets can be validated here."""
    console.emit(report(), human, summary=False)
