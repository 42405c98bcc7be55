"""A bundle as a command's input (`run`, `validate`, `profile`): its archive unpacked, its files checked against the
manifest, and what it carries (target profile, reference pack) as the defaults of options left out."""

from __future__ import annotations

from pathlib import Path

from .. import console
from ..cleanup import temp_dir
from ..errors import BadInput


def unpack(path: Path, stack) -> Path:
    """The bundle folder of ``path``: an archive is unpacked into a temporary folder that ``stack`` removes."""
    from ..archive import extract, is_archive, single_root

    if is_archive(path):
        tmp = stack.enter_context(temp_dir("run"))
        return single_root(extract(path, Path(tmp) / "bundle"))
    return path


def check(folder: Path, key=None) -> None:
    """Verify ``folder`` against its manifest (and signature, with ``key``); exit 2 on a mismatch, one line when ok."""
    from ..bundle import verify_or_raise
    from ..signing import describe

    res = verify_or_raise(folder, key)
    console.log(f"[verify] ok: {res['files_checked']} files match the manifest; {describe(res.get('signature'))}")


def open_bundle(model, stack) -> tuple[str, Path | None]:
    """``(folder, default report folder)``: a bundle archive (.tar.gz) is unpacked and checked first, as `run` does, and
    its report goes next to the archive. Anything else is taken as it is (no default)."""
    from ..archive import is_archive, stem

    if not is_archive(model):
        return model, None
    folder = unpack(Path(model), stack)
    check(folder)
    return str(folder), Path(model).resolve().parent / f"{stem(model)}.validation"


def bundle_defaults(model, target, reference, pack_ok: bool, command: str):
    """--target and --reference of a bundle that was given none: what it carries (its target.toml, its reference pack;
    the pack only when no other data was asked for), said on the console. An export needs --target."""
    from ..bundle import carried

    own = carried(model)
    if target is None:
        if "target" not in own:
            raise BadInput(f"{command} needs --target: {model} is not a bundle that carries one",
                           hint="give -t TARGET (edgetune targets lists them), e.g. -t cpu-x86")
        target = str(own["target"])
        console.log(f"[{command}] target: the bundle's own ({own['target'].name})")
    if reference is None and pack_ok and "reference" in own:
        reference = str(own["reference"])
        console.log(f"[{command}] reference: the bundle's reference pack ({own['reference']})")
    return target, reference
