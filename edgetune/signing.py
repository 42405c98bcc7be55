"""Signed bundles: Ed25519 keys (``edgetune keygen``), the bundle signature, and its check.

A signed bundle holds ``signature.json`` next to ``manifest.json``. It is not listed in the
manifest (it is written after it) and holds::

    format, format_version, algorithm ("ed25519")
    public_key        the signer's raw public key (base64), key_fingerprint = sha256 of it
    payload           what is signed (below)
    signature         Ed25519 over DOMAIN + the payload's canonical JSON (base64)

The payload binds the exact manifest bytes (``manifest_sha256``; the manifest lists every
file's size and SHA-256: model files, target.toml, validation report, reference pack) and
repeats explicitly what a reader must not be able to mix and match: the target (name,
provider, target.toml's SHA-256), the build config's SHA-256 (bundles made by
``edgetune build``), and the validation report's SHA-256 and verdict. So a figure shown with
a bundle (task accuracy, perplexity, latency) verifies only next to the files it was
measured on: swap the model and regenerate the manifest, and the signature no longer
matches (``verify --key`` exit 2).

Verification with a trusted public key (``verify --key``, ``run --key``) refuses an unsigned
bundle, one signed by another key and one whose signature does not match its content. Without
``--key`` a signature is still checked against the key it names (it catches damage and a
manifest changed after signing) and reported, but proves nothing about who signed.

``cryptography`` (Ed25519, OpenSSL underneath) is imported only here and only when a key or
a signature is at hand; it is part of the base install so devices can verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import BadInput, import_or_explain

SIGNATURE = "signature.json"
FORMAT = "edgetune-bundle-signature"
FORMAT_VERSION = 1
ALGORITHM = "ed25519"
# domain separation: these bytes can never be mistaken for another edgetune (or foreign) signed message
DOMAIN = b"edgetune-bundle-signature-v1\n"
PRIVATE_NAME = "edgetune-signing.key"
PUBLIC_NAME = "edgetune-signing.pub"
MAX_KEY_BYTES = 64 << 10
MAX_SIGNATURE_BYTES = 1 << 20
_KEYGEN_HINT = "create a key pair with `edgetune keygen -o DIR`"


def _crypto():
    """(ed25519, serialization, InvalidSignature) from ``cryptography``, or MissingDependency (exit 3)."""
    hint = "pip install -c constraints.txt cryptography (part of the base install)"
    ed = import_or_explain("cryptography.hazmat.primitives.asymmetric.ed25519", dist="cryptography", hint=hint)
    ser = import_or_explain("cryptography.hazmat.primitives.serialization", dist="cryptography", hint=hint)
    exc = import_or_explain("cryptography.exceptions", dist="cryptography", hint=hint)
    return ed, ser, exc.InvalidSignature


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _raw_public(public_key) -> bytes:
    _, ser, _ = _crypto()
    return public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def fingerprint(public_key) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key (what verify reports and --key is matched by)."""
    return "sha256:" + hashlib.sha256(_raw_public(public_key)).hexdigest()


def short(fp: str) -> str:
    return fp[:23]  # "sha256:" + 16 hex digits


# -- keys ----------------------------------------------------------------------------------------

def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never readable by others first)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits of a public key's 0644
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keygen(out: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Write a new Ed25519 key pair into the folder ``out``: the private key (PEM, mode 0600) and
    the public key (PEM). Refuses to replace either unless ``force``. Returns paths + fingerprint."""
    ed, ser, _ = _crypto()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", hint="give a folder for the key pair (created if missing)")
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    existing = [p for p in (priv_path, pub_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise BadInput(f"{existing[0]} already exists",
                       hint="pass --force to replace the key pair (bundles signed with the old key then verify only with the old public key)")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed.Ed25519PrivateKey.generate()
    priv = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    _write_private(pub_path, pub, 0o644)
    try:
        _write_private(priv_path, priv, 0o600)
    except BaseException:  # never leave a public key without its private key
        pub_path.unlink(missing_ok=True)
        raise
    return {"private_key": str(priv_path), "public_key": str(pub_path), "key_fingerprint": fingerprint(key.public_key()),
            "algorithm": ALGORITHM}


def _read_key_file(path: Path, what: str, hint: str) -> bytes:
    if not path.exists():
        raise BadInput(f"{what} not found: {path}", hint=hint)
    if not path.is_file():
        raise BadInput(f"{what} {path} is not a file", hint=hint)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"{what} {path} is not readable ({exc.strerror or exc})",
                       hint="check the file's permissions (the key must be readable by this user)") from exc
    if len(data) > MAX_KEY_BYTES:
        raise BadInput(f"{what} {path} is over {MAX_KEY_BYTES} bytes, not a PEM key", hint=hint)
    return data


def load_private_key(path: str | os.PathLike):
    """The Ed25519 private key in the PEM file ``path`` (unencrypted PKCS#8, as keygen writes), or BadInput."""
    ed, ser, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path, "signing key", _KEYGEN_HINT)
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise BadInput(f"signing key {path} is a public key",
                       hint=f"sign with the private key ({PRIVATE_NAME}); the public key is for `verify --key`")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted with a passphrase
        raise BadInput(f"signing key {path} is encrypted with a passphrase, which edgetune does not read",
                       hint="keep the key unencrypted in a protected place (CI secret, mode 0600), or " + _KEYGEN_HINT) from exc
    except Exception as exc:  # ValueError, UnsupportedAlgorithm: not a PEM private key
        raise BadInput(f"signing key {path} is not a PEM private key ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                       hint=_KEYGEN_HINT) from exc
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise BadInput(f"signing key {path} is a {type(key).__name__.replace('_', '')} key, edgetune signs with Ed25519",
                       hint=_KEYGEN_HINT)
    return key


def load_public_key(path: str | os.PathLike):
    """The Ed25519 public key in the PEM file ``path``, or BadInput (a private key is refused)."""
    ed, ser, _ = _crypto()
    path = Path(path)
    hint = f"give the signer's public key ({PUBLIC_NAME}, from `edgetune keygen`)"
    data = _read_key_file(path, "public key", hint)
    if b"PRIVATE KEY" in data:
        raise BadInput(f"{path} is a private key, not a public key",
                       hint=f"give the public key ({PUBLIC_NAME}); a device never needs the private key")
    try:
        key = ser.load_pem_public_key(data)
    except Exception as exc:
        raise BadInput(f"public key {path} is not a PEM public key ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                       hint=hint) from exc
    if not isinstance(key, ed.Ed25519PublicKey):
        raise BadInput(f"public key {path} is not an Ed25519 key", hint=hint)
    return key


def as_private_key(key):
    """A loaded private key, or the one in the file ``key`` names."""
    return load_private_key(key) if isinstance(key, (str, os.PathLike)) else key


def as_public_key(key):
    return load_public_key(key) if isinstance(key, (str, os.PathLike)) else key


# -- signing -------------------------------------------------------------------------------------

def _file_sha(manifest: dict[str, Any], rel: str | None) -> str | None:
    for f in manifest.get("files") or []:
        if isinstance(f, dict) and f.get("path") == rel:
            return f.get("sha256")
    return None


def payload(folder: Path, manifest_raw: bytes, manifest: dict[str, Any], *, build_config_sha256: str | None) -> dict[str, Any]:
    """What a signature covers: the manifest's exact bytes, and explicitly the target, the build
    config and the validation report's hash and verdict."""
    target = manifest.get("target") or {}
    val = manifest.get("validation") or {}
    validation = None
    if val.get("report"):
        rel = val["report"]
        sha = _file_sha(manifest, rel)  # read only a file the manifest lists (never a path it merely names)
        safe = isinstance(rel, str) and sha is not None and not Path(rel).is_absolute() and ".." not in Path(rel).parts
        report = json.loads((folder / rel).read_bytes()) if safe else {}
        passed = isinstance(report, dict) and report.get("passed") is True
        vs_float = (manifest.get("figures") or {}).get("vs_float_finetune")
        if isinstance(vs_float, dict):  # a quant-aware bundle passes only against the float fine-tune too
            passed = passed and vs_float.get("passed") is True
        validation = {"report": rel, "report_sha256": sha, "passed": passed}
    return {
        "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
        "bundle": manifest.get("name"),
        "kind": manifest.get("kind"),
        "precision": manifest.get("precision"),
        "target": {"name": target.get("name"), "execution_provider": target.get("execution_provider"),
                   "file": target.get("file"), "sha256": _file_sha(manifest, target.get("file"))},
        "build_config_sha256": build_config_sha256,
        "validation": validation,
    }


def sign_folder(folder: str | os.PathLike, key, *, manifest_name: str = "manifest.json",
                build_config_sha256: str | None = None) -> dict[str, Any]:
    """Sign the bundle ``folder`` (its manifest is already written) with the private ``key``;
    writes ``signature.json`` and returns it."""
    folder = Path(folder)
    key = as_private_key(key)
    raw = (folder / manifest_name).read_bytes()
    body = payload(folder, raw, json.loads(raw), build_config_sha256=build_config_sha256)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
        "key_fingerprint": fingerprint(key.public_key()),
        "payload": body,
        "signature": base64.b64encode(key.sign(DOMAIN + canonical(body))).decode(),
    }
    (folder / SIGNATURE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


# -- checking ------------------------------------------------------------------------------------

def _problem(kind: str, detail: str) -> dict[str, str]:
    return {"path": SIGNATURE, "problem": kind, "detail": detail}


def _read_signature(path: Path) -> dict[str, Any]:
    """signature.json parsed and shape-checked; ValueError naming what is wrong."""
    if path.is_symlink() or not path.is_file():
        raise ValueError("not a regular file")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise ValueError(f"over {MAX_SIGNATURE_BYTES} bytes")
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not an edgetune bundle signature")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"signature format version {doc.get('format_version')!r} is not supported (this edgetune reads {FORMAT_VERSION})")
    if doc.get("algorithm") != ALGORITHM:
        raise ValueError(f"algorithm {doc.get('algorithm')!r} is not supported (only {ALGORITHM})")
    for field, kind in (("public_key", str), ("key_fingerprint", str), ("signature", str), ("payload", dict)):
        if not isinstance(doc.get(field), kind):
            raise ValueError(f"field '{field}' missing or not a {kind.__name__}")
    return doc


def check(folder: Path, manifest_raw: bytes, manifest: dict[str, Any], key=None) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """Check the signature of the bundle ``folder`` whose manifest is ``manifest_raw``.

    Returns (signature info for the result or None when unsigned, problems). With the public
    ``key`` (trusted, from the user) an unsigned bundle or one signed by another key is a
    problem; without it the signature is checked against the key it names.
    """
    path = folder / SIGNATURE
    if not (path.exists() or path.is_symlink()):
        if key is None:
            return None, []
        return None, [_problem("unsigned", "the bundle has no signature.json, and --key accepts only a bundle signed with that key")]
    ed, _, invalid = _crypto()
    trusted = as_public_key(key) if key is not None else None
    try:
        doc = _read_signature(path)
        embedded = ed.Ed25519PublicKey.from_public_bytes(base64.b64decode(doc["public_key"], validate=True))
        sig = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        return {"signed": True}, [_problem("corrupted", f"signature.json: {exc}")]
    fp = fingerprint(embedded)
    info: dict[str, Any] = {"signed": True, "key_fingerprint": fp, "algorithm": ALGORITHM,
                            "trusted_key": trusted is not None, "payload": doc["payload"]}
    if doc["key_fingerprint"] != fp:
        return info, [_problem("corrupted", "signature.json: key_fingerprint does not match its public_key")]
    if trusted is not None and fingerprint(trusted) != fp:
        return info, [_problem("wrong-key", f"signed by key {short(fp)}, not by the given key {short(fingerprint(trusted))}")]
    try:
        (trusted or embedded).verify(sig, DOMAIN + canonical(doc["payload"]))
    except invalid:
        return info, [_problem("bad-signature", "the signature does not match its payload (signature.json was edited or damaged)")]
    # the signature is good: now every claim it makes must be this bundle's
    body = doc["payload"]
    want = payload_claims(folder, manifest_raw, manifest)
    problems = []
    if body.get("manifest_sha256") != want["manifest_sha256"]:
        problems.append(_problem("not-signed-content", "manifest.json is not the one that was signed (changed after signing)"))
    else:
        for field in ("bundle", "kind", "precision", "target", "validation"):
            if body.get(field) != want[field]:
                problems.append(_problem("not-signed-content", f"the signed {field} differs from the bundle's"))
    info["valid"] = not problems
    return info, problems


def payload_claims(folder: Path, manifest_raw: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """The payload this bundle would be signed with (build config aside), for the comparison."""
    try:
        return payload(folder, manifest_raw, manifest, build_config_sha256=None)
    except (OSError, ValueError, TypeError, AttributeError):  # a missing or broken report: verify lists it
        return {"manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(), "bundle": None, "kind": None,
                "precision": None, "target": None, "validation": None}


def describe(info: dict[str, Any] | None) -> str:
    """One phrase for verify's ok line."""
    if not info:
        return "not signed"
    fp = short(info.get("key_fingerprint") or "?")
    val = (info.get("payload") or {}).get("validation")
    verdict = "" if not val else (", validation passed" if val.get("passed") else ", validation FAILED")
    if info.get("trusted_key"):
        return f"signed by the given key {fp}{verdict}"
    return f"signed by key {fp}{verdict} (not checked against a trusted key: pass --key PUB)"


def message(bundle: str, problem: dict[str, str]) -> str:
    """The one line for a signature problem of ``bundle``."""
    kind = problem["problem"]
    if kind == "unsigned":
        return f"bundle {bundle} is not signed (no {SIGNATURE}) and --key accepts only a bundle signed with that key"
    if kind == "wrong-key":
        return f"bundle {bundle} is {problem['detail']}"
    return f"bundle {bundle} failed its signature check: {problem['detail']}"


def hint(problem: dict[str, str]) -> str:
    """The fix for a signature problem."""
    return {
        "unsigned": "sign it (`edgetune bundle --sign KEY`, or [bundle] sign = \"KEY\" in the build config), or verify without --key",
        "wrong-key": "get the bundle from the publisher whose public key you hold, or pass that publisher's public key",
    }.get(problem["problem"], "the bundle was modified after it was signed: do not use it; rebuild it or copy it again from its publisher")


def file_mode_warning(path: str | os.PathLike) -> str | None:
    """A warning when a private key file is readable by others (None otherwise)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"signing key {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
    return None


__all__ = ["SIGNATURE", "keygen", "load_private_key", "load_public_key", "sign_folder", "check", "fingerprint",
           "describe", "hint", "PRIVATE_NAME", "PUBLIC_NAME"]
