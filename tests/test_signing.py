"""Signed bundles: keygen, bundle --sign / [bundle] sign, verify --key and run --key (issue 31).

The attack the signature exists for: swap the model in a bundle and regenerate its manifest by
hand. The manifest checksums then agree with the files, so plain `verify` cannot notice; only a
signature made with a key the attacker does not hold can (`verify --key` exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from edgetune import bundle as bundle_mod
from edgetune.archive import pack
from edgetune.bundle import archive_path, verify
from edgetune.cli import main
from test_bundle import fake_export
from test_device_env import device  # noqa: F401  (the device-venv fixture)

KEY, PUB = "edgetune-signing.key", "edgetune-signing.pub"


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def keys(module_tmp):
    """Two key pairs: the publisher's (a) and someone else's (b)."""
    from edgetune.signing import keygen

    root = module_tmp("keys")
    return {"a": keygen(root / "a"), "b": keygen(root / "b")}


@pytest.fixture(scope="module")
def export_dir(module_tmp):
    return fake_export(module_tmp("sign-src") / "work")


@pytest.fixture()
def signed(tmp_path, export_dir, keys, capsys):
    """A bundle (+ .tar.gz) signed through the CLI with key a."""
    out = tmp_path / "signed"
    code, stdout, err = run_cli(["bundle", export_dir, "-o", out, "-t", "cpu-x86", "-r", export_dir.parent / "report",
                                 "--archive", "--sign", keys["a"]["private_key"], "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["signed_by"] == keys["a"]["key_fingerprint"]
    return out


@pytest.fixture()
def unsigned(tmp_path, export_dir):
    from edgetune.bundle import make_bundle

    make_bundle(export_dir, tmp_path / "unsigned", target="cpu-x86", report=export_dir.parent / "report", archive=True)
    return tmp_path / "unsigned"


def regenerate_manifest(b: Path) -> None:
    """What an attacker who can write the bundle does after swapping a file: recompute every
    size and SHA-256 and the manifest's own checksum, exactly as the bundler writes them."""
    m = json.loads((b / "manifest.json").read_text())
    for f in m["files"]:
        data = (b / f["path"]).read_bytes()
        f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    m.pop("manifest_sha256")
    m["manifest_sha256"] = bundle_mod._self_hash(m)
    (b / "manifest.json").write_bytes(bundle_mod._canonical_bytes(m))


# ------------------------------------------------------------------------------- keygen

def test_keygen_writes_a_0600_private_key_and_refuses_to_overwrite(tmp_path, capsys):
    d = tmp_path / "keys"
    code, out, err = run_cli(["keygen", "-o", d, "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    priv, pub = Path(r["private_key"]), Path(r["public_key"])
    assert (priv, pub) == (d / KEY, d / PUB)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    assert r["key_fingerprint"].startswith("sha256:") and len(r["key_fingerprint"]) == 7 + 64
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left
    before = priv.read_bytes()
    code, out, err = run_cli(["keygen", "-o", d], capsys)
    assert code == 2 and "already exists" in one_error_line(err) and "--force" in err
    assert priv.read_bytes() == before  # never overwritten without --force
    code, out, err = run_cli(["keygen", "-o", d, "--force", "--json"], capsys)
    assert code == 0 and priv.read_bytes() != before and json.loads(out)["key_fingerprint"] != r["key_fingerprint"]
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------- sign + verify

def test_signed_bundle_verifies_with_its_key_folder_and_archive(signed, keys, capsys):
    fp = keys["a"]["key_fingerprint"]
    m = json.loads((signed / "manifest.json").read_text())
    assert (signed / "signature.json").is_file()
    assert "signature.json" not in {f["path"] for f in m["files"]}  # the signature is not in its own manifest
    for path in (signed, archive_path(signed)):
        code, out, err = run_cli(["verify", path, "--key", keys["a"]["public_key"], "--json"], capsys)
        assert code == 0, err
        r = json.loads(out)
        assert r["ok"] and r["problems"] == [] and r["signature"]["key_fingerprint"] == fp and r["signature"]["trusted_key"]
        payload = r["signature"]["payload"]
        assert payload["manifest_sha256"] == hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
        assert payload["target"]["name"] == "cpu-x86"
        assert payload["target"]["sha256"] == hashlib.sha256((signed / "target.toml").read_bytes()).hexdigest()
        assert payload["validation"] == {"report": "validation/report.json", "passed": True,
                                         "report_sha256": hashlib.sha256((signed / "validation/report.json").read_bytes()).hexdigest()}
    code, out, err = run_cli(["verify", signed, "--key", keys["a"]["public_key"]], capsys)
    assert code == 0 and out.startswith("ok: ") and f"signed by the given key {fp[:23]}" in out and "validation passed" in out


def test_plain_verify_accepts_signed_and_unsigned_bundles_and_names_the_signer(signed, unsigned, keys, capsys):
    code, out, err = run_cli(["verify", signed], capsys)
    assert code == 0, err
    assert f"signed by key {keys['a']['key_fingerprint'][:23]}" in out and "pass --key" in out
    assert verify(archive_path(signed))["signature"]["key_fingerprint"] == keys["a"]["key_fingerprint"]
    code, out, err = run_cli(["verify", unsigned], capsys)
    assert code == 0 and "not signed" in out, err
    r = verify(archive_path(unsigned))
    assert r["ok"] and r["signature"] is None


def test_signed_bundles_are_reproducible(tmp_path, export_dir, keys):
    """Ed25519 is deterministic: the same inputs and key give byte-identical bundles and archives."""
    from edgetune.bundle import make_bundle

    for name in ("x", "y"):
        make_bundle(export_dir, tmp_path / name / "b", target="cpu-x86", report=export_dir.parent / "report", archive=True,
                    sign=keys["a"]["private_key"])
    assert (tmp_path / "x/b/signature.json").read_bytes() == (tmp_path / "y/b/signature.json").read_bytes()
    assert (tmp_path / "x/b.tar.gz").read_bytes() == (tmp_path / "y/b.tar.gz").read_bytes()


# ------------------------------------------------------------------------------- attacks

def test_swapped_model_with_regenerated_manifest_fails_verify_key(signed, keys, tmp_path, capsys):
    b = tmp_path / "swapped"
    shutil.copytree(signed, b)
    (b / "model" / "model.onnx.data").write_bytes(os.urandom(20000))  # another model's weights
    regenerate_manifest(b)
    # the checksums agree again: without the signature nothing would notice (the old `verify`)
    (b / "signature.json").rename(tmp_path / "sig.json")
    assert verify(b)["ok"]
    (tmp_path / "sig.json").rename(b / "signature.json")
    code, out, err = run_cli(["verify", b, "--key", keys["a"]["public_key"]], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "manifest.json is not the one that was signed" in line and "do not use it" in line
    # plain verify catches the stale signature too (it no longer matches the manifest)
    code, _, err = run_cli(["verify", b], capsys)
    assert code == 2 and "not the one that was signed" in err
    # ... and shipped as an archive
    arc = pack(b, tmp_path / "swapped.tar.gz")
    code, out, err = run_cli(["verify", arc, "--key", keys["a"]["public_key"], "--json"], capsys)
    assert code == 2 and json.loads(out)["ok"] is False
    assert [p["problem"] for p in json.loads(out)["problems"]] == ["not-signed-content"]


def test_dropping_the_signature_or_resigning_with_another_key_fails_verify_key(signed, keys, tmp_path, capsys):
    from edgetune.signing import sign_folder

    b = tmp_path / "resigned"
    shutil.copytree(signed, b)
    (b / "model" / "model.onnx.data").write_bytes(os.urandom(20000))
    regenerate_manifest(b)
    (b / "signature.json").unlink()
    code, _, err = run_cli(["verify", b, "--key", keys["a"]["public_key"]], capsys)
    assert code == 2 and "is not signed" in one_error_line(err) and "--sign" in err
    sign_folder(b, keys["b"]["private_key"])  # the attacker's own key
    assert verify(b)["ok"]  # self-consistent, but...
    code, _, err = run_cli(["verify", b, "--key", keys["a"]["public_key"]], capsys)
    line = one_error_line(err)
    assert code == 2 and f"signed by key {keys['b']['key_fingerprint'][:23]}" in line
    assert f"not by the given key {keys['a']['key_fingerprint'][:23]}" in line


def test_edited_claims_in_the_signature_fail(signed, keys, tmp_path, capsys):
    """Rewriting a signed claim (the verdict) breaks the signature, with or without --key."""
    b = tmp_path / "claims"
    shutil.copytree(signed, b)
    doc = json.loads((b / "signature.json").read_text())
    doc["payload"]["validation"]["passed"] = False
    (b / "signature.json").write_text(json.dumps(doc))
    for extra in ([], ["--key", keys["a"]["public_key"]]):
        code, _, err = run_cli(["verify", b, *extra], capsys)
        assert code == 2 and "signature does not match its payload" in one_error_line(err)
    (b / "signature.json").write_text("{not json")
    code, _, err = run_cli(["verify", b, "--key", keys["a"]["public_key"]], capsys)
    assert code == 2 and "signature.json: not valid JSON" in one_error_line(err)


def test_unsigned_bundle_fails_verify_key_folder_and_archive(unsigned, keys, capsys):
    for path in (unsigned, archive_path(unsigned)):
        code, out, err = run_cli(["verify", path, "--key", keys["a"]["public_key"], "--json"], capsys)
        assert code == 2
        r = json.loads(out)
        assert r["ok"] is False and [p["problem"] for p in r["problems"]] == ["unsigned"]
        assert "is not signed" in one_error_line(err)


def test_wrong_key_fails_verify_key(signed, keys, capsys):
    for path in (signed, archive_path(signed)):
        code, out, err = run_cli(["verify", path, "--key", keys["b"]["public_key"]], capsys)
        assert code == 2 and "wrong-key" in out
        assert f"not by the given key {keys['b']['key_fingerprint'][:23]}" in one_error_line(err)


def test_run_key_refuses_unsigned_and_wrongly_signed_bundles(signed, unsigned, keys, capsys):
    for path, words in ((unsigned, "is not signed"), (archive_path(unsigned), "is not signed"),
                        (signed, "not by the given key"), (archive_path(signed), "not by the given key")):
        want = keys["b"]["public_key"] if path in (signed, archive_path(signed)) else keys["a"]["public_key"]
        code, out, err = run_cli(["run", path, "--key", want, "-p", "hi", "--json"], capsys)
        assert code == 2 and words in one_error_line(err), err
        r = json.loads(out)
        assert r["ok"] is False and r["exit_code"] == 2
    code, _, err = run_cli(["run", signed, "--key", keys["a"]["public_key"], "--no-verify", "-p", "hi"], capsys)
    assert code == 2 and "--key and --no-verify" in one_error_line(err)


def test_bad_key_files_are_exit_2_before_any_work(tmp_path, export_dir, signed, keys, capsys):
    out = tmp_path / "never"
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    unreadable = tmp_path / "unreadable.key"
    shutil.copy(keys["a"]["private_key"], unreadable)
    unreadable.chmod(0)
    cases = [(tmp_path / "missing.key", "signing key not found"), (Path(keys["a"]["public_key"]), "is a public key"),
             (bad, "not a PEM private key")]
    if os.geteuid() != 0:  # root reads anything
        cases.append((unreadable, "not readable"))
    for key, words in cases:
        code, stdout, err = run_cli(["bundle", export_dir, "-o", out, "-t", "cpu-x86", "--sign", key, "--json"], capsys)
        assert code == 2 and words in one_error_line(err), err
        assert json.loads(stdout)["exit_code"] == 2
        assert not out.exists() and not archive_path(out).exists()
    for key, words in ((Path(keys["a"]["private_key"]), "is a private key, not a public key"), (bad, "is a private key"),
                       (tmp_path / "nope.pub", "public key not found")):
        code, _, err = run_cli(["verify", signed, "--key", key], capsys)
        assert code == 2 and words in one_error_line(err)


# ------------------------------------------------------------------------------- build

def test_build_bundle_sign_makes_signed_bundles_bound_to_the_config(tmp_path, tiny_llama, keys, capsys):
    from edgetune.signing import PRIVATE_NAME

    shutil.copytree(Path(keys["a"]["private_key"]).parent, tmp_path / "keys")
    (tmp_path / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. Turn on the kitchen lights. " * 20)
    cfg = tmp_path / "build.toml"
    text = (f'name = "s"\noutput = "out"\n[model]\nbase = "{tiny_llama}"\n[[targets]]\nname = "cpu-x86"\nprecision = "fp32"\n'
            f'[validate]\ndata = "eval.txt"\neval_tokens = 64\nwindow = 32\nlatency = false\n'
            f'[bundle]\nsign = "keys/{PRIVATE_NAME}"\n')
    # an unreadable key is refused before any work
    cfg.write_text(text.replace(f"keys/{PRIVATE_NAME}", "keys/missing.key"))
    code, _, err = run_cli(["build", cfg, "--quiet"], capsys)
    assert code == 2 and "signing key not found" in one_error_line(err) and not (tmp_path / "out").exists()
    cfg.write_text(text)
    code, out, err = run_cli(["build", cfg, "--json", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["signed_by"] == keys["a"]["key_fingerprint"]
    b = tmp_path / "out" / "cpu-x86"
    for path in (b, archive_path(b)):
        r = verify(path, key=keys["a"]["public_key"])
        assert r["ok"], r["problems"]
        assert r["signature"]["payload"]["build_config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
        assert r["signature"]["payload"]["validation"]["passed"] is True
    assert not verify(b, key=keys["b"]["public_key"])["ok"]
    # a changed config (even a comment) re-signs the bundle with the new config's hash; nothing else re-runs
    cfg.write_text(text + "# shipped 2026-12\n")
    code, out, err = run_cli(["build", cfg, "--json", "--quiet"], capsys)
    assert code == 0, err
    ran = {s["stage"] for s in json.loads(out)["stages"] if s["status"] == "ran"}
    assert ran == {"materialize", "bundle"}
    assert verify(b, key=keys["a"]["public_key"])["signature"]["payload"]["build_config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    with tarfile.open(archive_path(b)) as tar:
        assert "cpu-x86/signature.json" in tar.getnames()


# ------------------------------------------------------------------------------- the device venv

def test_signed_bundle_verifies_in_the_device_venv(device, signed, unsigned, keys, tmp_path):
    """The base install (no [host] extra) verifies signatures: cryptography is a base dependency."""
    pub = tmp_path / "publisher.pub"
    shutil.copy(keys["a"]["public_key"], pub)
    for path in (signed, archive_path(signed)):
        _, r = device.json("verify", path, "--key", pub)
        assert r["ok"] and r["signature"]["key_fingerprint"] == keys["a"]["key_fingerprint"]
    p = device.edgetune("verify", signed)
    assert p.returncode == 0 and "signed by key" in p.stdout, p.stderr
    for path in (unsigned, archive_path(unsigned)):
        p = device.edgetune("verify", path, "--key", pub)
        assert p.returncode == 2 and "is not signed" in p.stderr and "Traceback" not in p.stderr
    p = device.edgetune("run", unsigned, "--key", pub, "-p", "hi")
    assert p.returncode == 2 and "is not signed" in p.stderr and "Traceback" not in p.stderr


def test_verify_key_never_imports_torch(signed, keys, tmp_path):
    """The signature check is device code: with torch and transformers unimportable it still works."""
    from test_device_imports import _run

    p = _run(f"""
        import sys
        from edgetune.cli import main
        try:
            main(["verify", {str(archive_path(signed))!r}, "--key", {keys["a"]["public_key"]!r}, "--json"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules), "torch leaked"
        """)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["signature"]["key_fingerprint"] == keys["a"]["key_fingerprint"]


def test_a_signing_key_readable_by_others_is_named(tmp_path, export_dir, keys, capsys):
    key = tmp_path / "loose.key"
    shutil.copy(keys["a"]["private_key"], key)
    key.chmod(0o644)
    code, _, err = run_cli(["bundle", export_dir, "-o", tmp_path / "b", "-t", "cpu-x86", "--sign", key], capsys)
    assert code == 0 and "readable by other users (mode 0644)" in err and "chmod 600" in err


def test_run_key_runs_a_bundle_signed_with_that_key(tmp_path, tiny_llama, keys, capsys):
    """The accepting side of `run --key`: a real (tiny) LLM bundle signed with key a generates."""
    code, _, err = run_cli(["export", tiny_llama, "-t", "cpu-x86", "-o", tmp_path / "export", "--precision", "fp32", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["bundle", tmp_path / "export", "-o", tmp_path / "b", "-t", "cpu-x86", "--archive",
                            "--sign", keys["a"]["private_key"], "--quiet"], capsys)
    assert code == 0, err
    for path in (tmp_path / "b", archive_path(tmp_path / "b")):
        code, out, err = run_cli(["run", path, "--key", keys["a"]["public_key"], "-p", "hi", "-n", "3", "--json"], capsys)
        assert code == 0, err
        r = json.loads(out)
        assert r["results"][0]["new_tokens"] >= 1
    code, out, err = run_cli(["run", tmp_path / "b", "--key", keys["a"]["public_key"], "-p", "hi", "-n", "2"], capsys)
    assert code == 0 and f"signed by the given key {keys['a']['key_fingerprint'][:23]}" in err


def test_a_signature_check_reads_no_file_outside_the_bundle(signed, tmp_path, capsys):
    """A manifest naming its report outside the bundle: the check never opens that path."""
    from edgetune.signing import payload

    b = tmp_path / "outside"
    shutil.copytree(signed, b)
    outside = tmp_path / "outside-report.json"
    outside.write_text('{"passed": true}')
    m = json.loads((b / "manifest.json").read_text())
    m["validation"]["report"] = str(outside)
    body = payload(b, b"{}", m, build_config_sha256=None)
    assert body["validation"] == {"report": str(outside), "report_sha256": None, "passed": False}
    m["validation"]["report"] = "../outside-report.json"
    assert payload(b, b"{}", m, build_config_sha256=None)["validation"]["passed"] is False
