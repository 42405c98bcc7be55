"""`edgetune bundle` (make a deployable bundle) and `edgetune verify` (check one against its manifest)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import console
from ..cli import common_options, force_option


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Bundle folder to write (replaced atomically).")
@click.option("--target", "-t", required=True, help="Target profile name or .toml path the model was exported for.")
@click.option("--report", "-r", type=click.Path(path_type=Path), default=None,
              help="Validation report folder (from `edgetune validate --out`): report + golden I/O go in the bundle.")
@click.option("--archive/--no-archive", default=False, show_default=True, help="Also write a reproducible OUT.tar.gz.")
@force_option
@common_options
def bundle(model: Path, out: Path, target: str, report: Path | None, archive: bool) -> None:
    """Bundle the export folder MODEL for TARGET with its manifest (sizes + SHA-256 of every file)."""
    from ..artifacts import check_replaceable
    from ..bundle import archive_path, make_bundle

    check_replaceable(out, what="bundle folder")

    with console.step(f"bundle {out}"):
        manifest = make_bundle(model, out, target=target, report=report, archive=archive)
    result = {"bundle": str(out), "archive": str(archive_path(out)) if archive else None,
              "files": len(manifest["files"]), "size_bytes": sum(f["size"] for f in manifest["files"]),
              "kind": manifest["kind"], "target": manifest["target"]["name"], "precision": manifest.get("precision"),
              "passed": manifest.get("figures", {}).get("passed")}
    console.emit(result, lambda r: f"bundle {r['bundle']}: {r['files']} files, {r['size_bytes'] / 2**20:.1f} MiB, "
                 f"{r['kind']} {r['precision']} for {r['target']}" + (f"\narchive {r['archive']}" if r["archive"] else ""))


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@common_options
def verify(path: Path) -> None:
    """Check the bundle folder or .tar.gz PATH against its manifest; exit 2 naming each problem."""
    from ..bundle import problem_line, verify as verify_bundle
    from ..errors import BadInput

    res = verify_bundle(path)

    def human(r: dict) -> str:
        if r["ok"]:
            return f"ok: {r['bundle']} ({r['files_checked']} files match the manifest; {r['kind']} {r['precision']} for {r['target']})"
        return "\n".join(f"{p['problem']:<9} {p['path']}  {p.get('detail', '')}" for p in r["problems"])

    console.emit(res, human)
    if not res["ok"]:
        raise BadInput(problem_line(res), hint="the bundle is corrupted or was modified; rebuild it or copy it again")
