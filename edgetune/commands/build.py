"""`edgetune build CONFIG.toml`: the whole pipeline, one bundle per target, incremental."""

from __future__ import annotations

from pathlib import Path

import click

from .. import console
from ..cli import common_options


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Output folder (overrides `output` in CONFIG): bundles land in OUTPUT/<target>/, work in OUTPUT/.work/.")
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs and options did not change "
              "(and replace output folders edgetune did not write).")
@click.option("--require-device", is_flag=True,
              help="A target whose execution provider this machine lacks is fatal (exit 3) instead of a cross-build (accuracy on CPU, latency not measured).")
@common_options
def build(config: Path, output: Path | None, force: bool, require_device: bool | None) -> None:
    """Run materialize -> finetune -> merge -> export -> validate -> bundle from CONFIG.

    Stages whose inputs (content hashes) and options did not change are skipped; an
    interrupted build resumes. Prints a summary per target; exit 1 when a target missed
    its budgets (its bundle then goes to OUTPUT/rejected/, never OUTPUT/<target>/).
    """
    from ..build import build as run_build, summary_text
    from ..errors import CheckFailed

    from ..artifacts import replace_foreign

    try:
        with replace_foreign(force):
            result = run_build(config, force=force, output=output, require_device=require_device or None)
    except CheckFailed as exc:
        if isinstance(exc.result, dict) and "targets" in exc.result:
            console.emit(exc.result, summary_text)
        raise
    console.emit(result, summary_text)
