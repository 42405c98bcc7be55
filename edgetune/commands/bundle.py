"""`edgetune bundle` (make a deployable bundle, optionally signed), `edgetune verify` (check one against
its manifest and signature) and `edgetune keygen` (an Ed25519 key pair for signing)."""

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
@click.option("--sign", "sign", type=click.Path(path_type=Path), default=None,
              help="Sign the bundle with this Ed25519 private key (from `edgetune keygen`): adds signature.json.")
@force_option
@common_options
def bundle(model: Path, out: Path, target: str, report: Path | None, archive: bool, sign: Path | None) -> None:
    """Bundle the export folder MODEL for TARGET with its manifest (sizes + SHA-256 of every file)."""
    from ..artifacts import check_replaceable
    from ..bundle import archive_path, make_bundle

    key = None
    if sign is not None:  # before any work: a missing or unreadable key fails at once
        from ..signing import file_mode_warning, load_private_key

        key = load_private_key(sign)
        if (warning := file_mode_warning(sign)):
            console.log(f"warning: {warning}")
    check_replaceable(out, what="bundle folder", inputs=(model, report))

    with console.step(f"bundle {out}"):
        manifest = make_bundle(model, out, target=target, report=report, archive=archive, sign=key)
    result = {"bundle": str(out), "archive": str(archive_path(out)) if archive else None,
              "files": len(manifest["files"]), "size_bytes": sum(f["size"] for f in manifest["files"]),
              "kind": manifest["kind"], "target": manifest["target"]["name"], "precision": manifest.get("precision"),
              "passed": manifest.get("figures", {}).get("passed"), "signed_by": None}
    if key is not None:
        from ..signing import fingerprint

        result["signed_by"] = fingerprint(key.public_key())
    console.emit(result, lambda r: f"bundle {r['bundle']}: {r['files']} files, {r['size_bytes'] / 2**20:.1f} MiB, "
                 f"{r['kind']} {r['precision']} for {r['target']}" + (f", signed by {r['signed_by'][:23]}" if r["signed_by"] else "")
                 + (f"\narchive {r['archive']}" if r["archive"] else ""))


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--key", "key", type=click.Path(path_type=Path), default=None,
              help="Trusted Ed25519 public key: the bundle must be signed with it (unsigned or another key: exit 2).")
@common_options
def verify(path: Path, key: Path | None) -> None:
    """Check the bundle folder or .tar.gz PATH against its manifest (and signature); exit 2 naming each problem."""
    from ..bundle import failure, verify as verify_bundle
    from ..signing import describe

    res = verify_bundle(path, key=key)

    def human(r: dict) -> str:
        if r["ok"]:
            return (f"ok: {r['bundle']} ({r['files_checked']} files match the manifest; {r['kind']} {r['precision']} for {r['target']}; "
                    f"{describe(r.get('signature'))})")
        return "\n".join(f"{p['problem']:<9} {p['path']}  {p.get('detail', '')}" for p in r["problems"])

    console.emit(res, human)
    if not res["ok"]:
        raise failure(res)


@click.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the key pair (created if missing): edgetune-signing.key (private, mode 0600) and edgetune-signing.pub.")
@click.option("--force", is_flag=True, help="Replace an existing key pair there (bundles signed with the old key stay verifiable only with the old public key).")
@common_options
def keygen(out: Path, force: bool) -> None:
    """Create an Ed25519 key pair for signing bundles (`bundle --sign`, `[bundle] sign`); keep the private key offline."""
    from ..signing import keygen as make_keys

    res = make_keys(out, force=force)
    console.emit(res, lambda r: f"private key {r['private_key']} (mode 0600: keep it offline or as a CI secret)\n"
                                f"public key  {r['public_key']} (copy this one to devices: verify/run --key)\n"
                                f"fingerprint {r['key_fingerprint']}")
