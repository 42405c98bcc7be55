"""Faults a hostile or careless user still found (issue 31): one test per row of the issue's table.

Each test runs the real code path (the CLI in a fresh process where it is a CLI behaviour), checks
the exit code and the one-line message, and failed on the code before the fix. Row 1 (`bundle -o
PARENT --force`) is in tests/test_faults.py; signing is in its own tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_faults import BAD_INPUT, cli, one_json, quiet_export, tiny_bundle  # noqa: F401  (fixtures)


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _rewrite_manifest(bundle: Path, change) -> dict:
    """Edit a bundle's manifest and rehash it, the way an attacker who can write the folder would."""
    from edgetune.bundle import MANIFEST, _canonical_bytes, _self_hash

    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    m.pop("manifest_sha256", None)
    m["manifest_sha256"] = _self_hash(m)
    (bundle / MANIFEST).write_bytes(_canonical_bytes(m))
    return m


def _relist(bundle: Path, rel: str) -> None:
    """Put ``rel`` (a file changed in the bundle) into files[] with its new size and hash."""
    from edgetune.bundle import _sha256

    p = bundle / rel

    def change(m):
        m["files"] = [f for f in m["files"] if f["path"] != rel] + [{"path": rel, "size": p.stat().st_size, "sha256": _sha256(p)}]
        m["files"].sort(key=lambda f: f["path"])

    _rewrite_manifest(bundle, change)


# ---------------------------------------------------------------- manifest paths and folder symlinks

def test_manifest_target_file_outside_the_bundle_is_refused(tmp_path, tiny_bundle):
    """Row: manifest `target.file` rewritten to an absolute path outside the bundle (rehashed): verify said ok
    and run loaded the outside profile. Every path a manifest names is now checked like files[]."""
    outside = tmp_path / "evil.toml"
    shutil.copyfile(tiny_bundle / "target.toml", outside)
    cases = {
        "absolute": (str(outside), "is an absolute path"),
        "dotdot": ("../evil.toml", "escapes the bundle (..)"),
        "unlisted": ("model/genai_config.json.orig", "files[] does not list"),
    }
    for name, (value, why) in cases.items():
        b = _copy_bundle(tiny_bundle, tmp_path / name)
        _rewrite_manifest(b, lambda m: m["target"].__setitem__("file", value))
        r = cli("verify", str(b), "--json")
        assert r.returncode == BAD_INPUT, (name, r.stdout, r.stderr[-800:])
        res = one_json(r.stdout)
        assert not res["ok"] and any(p["path"] == value and why in p["detail"] for p in res["problems"]), (name, res["problems"])
        assert "target.file" in json.dumps(res["problems"])
        r = cli("run", str(b), "-p", "hi", "-n", "2", "--json")
        assert r.returncode == BAD_INPUT and "failed verification" in one_json(r.stdout)["error"], (name, r.stderr[-800:])
    # without verification run still never opens a named path outside the bundle
    r = cli("run", str(tmp_path / "absolute"), "-p", "hi", "-n", "2", "--no-verify", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    err = one_json(r.stdout)
    assert "manifest target.file" in err["error"] and "absolute path" in err["error"] and "rebuild" in err["hint"]
    # model_dir and validation paths are covered too
    b = _copy_bundle(tiny_bundle, tmp_path / "modeldir")
    _rewrite_manifest(b, lambda m: m.update(model_dir="/", validation={"report": "../r.json", "reference": "validation/reference"}))
    res = one_json(cli("verify", str(b), "--json").stdout)
    details = " | ".join(p["detail"] for p in res["problems"])
    assert "model_dir is an absolute path" in details and "validation.report escapes" in details
    assert "validation.reference names a folder that files[] does not list" in details


def test_unlisted_directory_symlink_in_a_bundle_is_reported(tmp_path, tiny_bundle):
    """Row: a bundle folder with an unlisted directory symlink pointing outside it: verify said ok
    (os.walk never descends into folder links, so they were skipped)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("x")
    b = _copy_bundle(tiny_bundle, tmp_path / "b")
    os.symlink(secret, b / "model" / "extra", target_is_directory=True)
    r = cli("verify", str(b), "--json")
    assert r.returncode == BAD_INPUT, (r.stdout, r.stderr[-800:])
    res = one_json(r.stdout)
    assert [p["problem"] for p in res["problems"]] == ["unsafe"] and res["problems"][0]["path"] == "model/extra"
    assert "symbolic link to a folder" in res["problems"][0]["detail"]
    assert "model/extra: unsafe" in cli("verify", str(b)).stderr


# ---------------------------------------------------------------- files a bundle loads, parsed defensively

@pytest.mark.parametrize("name,damage", [
    ("tokenizer.json", "deep"), ("tokenizer.json", "truncated"), ("genai_config.json", "truncated"),
    ("genai_config.json", "deep"), ("tokenizer_config.json", "truncated"),
])
def test_run_refuses_a_damaged_file_the_bundle_loads(tmp_path, tiny_bundle, name, damage):
    """Row: bundle `tokenizer.json` 200k levels deep, or truncated (manifest rehashed): run exited 4
    ("recursion limit exceeded" / "EOF while parsing"). Now exit 2 naming the file, also for genai_config.json."""
    b = _copy_bundle(tiny_bundle, tmp_path / "b")
    p = b / "model" / name
    if damage == "deep":
        p.write_text('{"a":' * 200_000 + "1" + "}" * 200_000)
    else:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _relist(b, f"model/{name}")
    assert cli("verify", str(b)).returncode == 0  # the manifest was rehashed: only parsing can catch it
    r = cli("run", str(b), "-p", "hi", "-n", "2", "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stdout, r.stderr[-800:])
    err = one_json(r.stdout)
    assert f"model/{name}:" in err["error"], err
    assert ("nested too deeply" if damage == "deep" else "not valid JSON") in err["error"] and "re-export" in err["hint"]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_encoder_config_json_is_parsed_defensively(tmp_path):
    """Row (same class): an encoder bundle's config.json truncated or with a broken id2label is exit 2 naming it."""
    from edgetune.device import encoder as E
    from edgetune.errors import BadInput

    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not read before the config")
    (folder / "tokenizer.json").write_text("{}")
    for text, words in (('{"id2label": {"0": "ham"', "not valid JSON"), ("[1, 2]", "not a JSON object"),
                        ('{"id2label": {"x": "ham"}}', "id2label is not a mapping")):
        (folder / "config.json").write_text(text)
        with pytest.raises(BadInput, match="config.json") as e:
            E.load(folder)
        assert words in e.value.message


def test_reference_pack_files_are_parsed_defensively(tmp_path):
    """Row (same class): a bundle's reference pack (validation/reference) with a truncated JSON or a damaged .npz
    is exit 2 naming the file (the .npz raised BadZipFile, exit 4)."""
    from edgetune.errors import BadInput
    from edgetune.validate.reference import PACK_JSON, PACK_NPZ, SCHEMA_VERSION, load_pack

    (tmp_path / PACK_JSON).write_text('{"schema_version": ')
    (tmp_path / PACK_NPZ).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(BadInput, match=f"{PACK_JSON}: reference pack file is not valid JSON"):
        load_pack(tmp_path)
    (tmp_path / PACK_JSON).write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    with pytest.raises(BadInput, match=f"{PACK_NPZ}: reference pack .* truncated or corrupt"):
        load_pack(tmp_path)


# ---------------------------------------------------------------- numeric options, up front

def test_validate_zero_repeats_and_max_tokens_are_refused_at_once(tmp_path, tiny_bundle, tiny_llama):
    """Row: `validate --repeats 0 --max-tokens 0` ran 4 minutes, then exit 1 (or exit 4 against a GGUF
    reference). Now exit 2 at once, in the CLI, the library call and the build config."""
    import time

    from edgetune.errors import BadInput
    from edgetune.validate import validate

    ref = tiny_bundle / "validation" / "reference"
    t0 = time.monotonic()
    r = cli("validate", str(tiny_bundle), "-t", "cpu-x86", "-r", str(ref), "--repeats", "0", "--max-tokens", "0", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    assert "'--repeats': 0 is not in the range x>=1" in one_json(r.stdout)["error"]
    assert time.monotonic() - t0 < 60
    for opt, value in (("--window", "1"), ("--eval-tokens", "0"), ("--batch", "-1"), ("--warmup", "-1")):
        r = cli("validate", str(tiny_bundle), "-t", "cpu-x86", opt, value)
        assert r.returncode == BAD_INPUT and f"'{opt}'" in r.stderr, (opt, r.stderr[-500:])
    for opt, value in (("--top", "0"), ("--repeats", "0")):
        r = cli("profile", str(tiny_bundle), "-t", "cpu-x86", opt, value)
        assert r.returncode == BAD_INPUT and f"'{opt}'" in r.stderr, (opt, r.stderr[-500:])
    r = cli("merge", str(tiny_llama), str(tiny_llama), "-o", str(tmp_path / "m"), "--min-top1", "1.5")
    assert r.returncode == BAD_INPUT and "'--min-top1'" in r.stderr
    with pytest.raises(BadInput, match="validate option repeats = 0 is below its minimum 1"):
        validate(tiny_bundle, target="cpu-x86", repeats=0)
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'name = "t"\noutput = "out"\n[model]\nbase = "{tiny_llama}"\n[[targets]]\nname = "cpu-x86"\n'
                   f'precision = "fp32"\n[validate]\nrepeats = 0\nmax_tokens = 0\n')
    r = cli("build", str(cfg), "--json", timeout=120)
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    assert "validate.max_tokens = 0 is below its minimum 1" in one_json(r.stdout)["error"]
    assert not (tmp_path / "out" / ".work").exists()


# ---------------------------------------------------------------- a reference with another vocabulary

def test_validate_against_a_reference_with_another_vocabulary(tmp_path, quiet_export):
    """Row: `validate` against a reference with another vocabulary exited 4 ("IndexError: index out of
    range in self"). Now exit 2 naming both vocabulary sizes, for an HF reference and a reference pack."""
    import torch
    from tiny_models import _decoder_common, build_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    export, r = quiet_export
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "other"
    ref.mkdir()
    tok = build_bpe_tokenizer(ref)
    torch.manual_seed(1)
    cfg = LlamaConfig(**{**_decoder_common(tok), "vocab_size": len(tok) + 256}, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(ref, safe_serialization=True)
    model_vocab = json.loads((export / "genai_config.json").read_text())["model"]["vocab_size"]
    text = tmp_path / "eval.txt"
    text.write_text("turn on the kitchen lights and set the thermostat to twenty degrees. " * 20)
    r = cli("validate", str(export), "-t", "cpu-x86", "-r", str(ref), "-d", str(text), "--no-latency",
            "-o", str(tmp_path / "report"), "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    err = one_json(r.stdout)
    assert f"vocabulary of {len(tok) + 256} tokens, the model one of {model_vocab} tokens" in err["error"], err
    assert "made from" in err["hint"]
    # a stored reference pack whose token ids run past the model's vocabulary: the same refusal
    from edgetune.validate.reference import Pack, load_pack

    good = tmp_path / "pack"
    r = cli("validate", str(export), "-t", "cpu-x86", "-r", str(export), "-d", str(text), "--no-latency", "-o", str(good))
    assert r.returncode in (0, 1), r.stderr[-1500:]
    pack = load_pack(good / "reference")
    pack.meta.pop("vocab_size", None)  # a pack written before the size was stored: its largest id decides
    pack.arrays["top_ids"][0, 0] = model_vocab + 9
    Pack(pack.meta, pack.arrays).save(tmp_path / "bad-pack")
    r = cli("validate", str(export), "-t", "cpu-x86", "-r", str(tmp_path / "bad-pack"), "--no-latency",
            "-o", str(tmp_path / "report2"), "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stderr[-1500:])
    assert f"vocabulary of at least {model_vocab + 10} tokens, the model one of {model_vocab} tokens" in one_json(r.stdout)["error"]


# ---------------------------------------------------------------- argv that is not UTF-8

def test_run_prompt_bytes_that_are_not_utf8(tiny_bundle):
    """Row: `run -p` with bytes that are not UTF-8 exited 4 ("TypeError: TextInputSequence must be str").
    Python decodes argv with surrogateescape; run now refuses such text with exit 2 and one clear line."""
    latin1 = os.fsdecode(b"caf\xe9 lights on")  # what Python makes of a Latin-1 terminal's bytes
    r = cli("run", str(tiny_bundle), "-p", "fine", "-p", latin1, "-n", "2", "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stderr[-800:])
    err = one_json(r.stdout)
    assert err["error"] == "--prompt #2 is not valid UTF-8 text (byte 0xe9 at character 3)" and "UTF-8" in err["hint"]
    r = cli("run", str(tiny_bundle), "-p", "hi", "--system", latin1)
    assert r.returncode == BAD_INPUT and r.stderr.startswith("error: --system is not valid UTF-8 text"), r.stderr[-800:]



def test_run_refuses_an_empty_prompt(tiny_bundle):
    """Row: `run -p "$PROMPT"` with PROMPT unset ran the model on its chat template alone and printed made-up output
    with exit 0. A blank prompt (or text, question, context) is now exit 2 naming which one, before the model loads."""
    r = cli("run", str(tiny_bundle), "-p", "", "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stderr[-800:])
    assert one_json(r.stdout)["error"] == "--prompt is empty"
    r = cli("run", str(tiny_bundle), "-p", "lights on", "-p", " \t", "-n", "2")
    assert r.returncode == BAD_INPUT and r.stderr.startswith("error: --prompt #2 is empty"), r.stderr[-800:]
    assert "[run] loaded" not in r.stderr

# ---------------------------------------------------------------- signals, and what killed runs leave behind

_SLOW = """
import os, shutil, sys, tarfile, time
from pathlib import Path
phase = os.environ["SLOW_PHASE"]
def slowed(orig):
    def f(*a, **k):
        out = orig(*a, **k)
        Path(os.environ["SLOW_MARKER"]).write_text(phase)
        time.sleep(0.4)
        return out
    return f
if phase == "archive":
    tarfile.TarFile.addfile = slowed(tarfile.TarFile.addfile)
else:
    shutil.copyfile = slowed(shutil.copyfile)
from edgetune.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("phase,sig,code,word", [("archive", "SIGTERM", 143, "terminated (SIGTERM)"),
                                                 ("copy", "SIGTERM", 143, "terminated (SIGTERM)"),
                                                 ("copy", "SIGINT", 130, "interrupted (SIGINT)")])
def test_signal_during_bundle_removes_its_temp_files(tmp_path, quiet_export, phase, sig, code, word):
    """Row: SIGTERM during `bundle --archive` exited 143 with no message and left `.NAME.tar.gz.tmp-<pid>`;
    Ctrl-C printed "error: aborted". Now the temp files are removed, one line is printed, exit 143/130."""
    import signal
    import subprocess
    import sys
    import time

    from test_faults import ROOT

    export, r = quiet_export
    assert r.returncode == 0, r.stderr
    parent = tmp_path / "out"
    parent.mkdir()
    marker = tmp_path / "marker"
    env = {**os.environ, "SLOW_PHASE": phase, "SLOW_MARKER": str(marker), "PYTHONPATH": str(ROOT)}
    # the child starts with SIGINT's default action, as under a terminal: a test run started in the background by a
    # non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, which Python and edgetune rightly keep
    p = subprocess.Popen([sys.executable, "-c", _SLOW, "bundle", str(export), "-t", "cpu-x86", "-o", str(parent / "b"),
                          "--archive", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), p.communicate()
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, (p.returncode, out, err[-1500:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {word}; ") and "temp files removed" in lines[-1], err[-1500:]
    assert "aborted" not in err and "Traceback" not in err
    assert one_json(out)["exit_code"] == code
    left = sorted(q.name for q in parent.iterdir())
    assert left == (["b"] if phase == "archive" else []), left  # the finished folder stays; no temp file, no partial archive


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_sweeps_what_killed_runs_left_and_nothing_else(tmp_path, quiet_export):
    """Row: `build` killed with SIGKILL left `$TMPDIR/edgetune-gguf-*` and `.export-*.tmp-<pid>` folders, a killed
    `bundle --archive` its `.NAME.tar.gz.tmp-<pid>`, and lock files piled up; nothing swept them. The next run
    now removes edgetune's own leftovers of dead pids, and nothing else."""
    export, r = quiet_export
    assert r.returncode == 0, r.stderr
    dead, live = _dead_pid(), os.getpid()
    parent, tmpdir, locks = tmp_path / "out", tmp_path / "tmp", tmp_path / "locks"
    for d in (parent, tmpdir, locks):
        d.mkdir()

    def make(p: Path, folder: bool) -> Path:
        if folder:
            p.mkdir()
            (p / "model.onnx.data").write_bytes(b"x" * 1000)
        else:
            p.write_bytes(b"partial")
        return p

    stale = [make(parent / f".b.tar.gz.tmp-{dead}", False), make(parent / f".b.tmp-{dead}-123", True),
             make(parent / f".b.old-{dead}-7", True), make(tmpdir / f"edgetune-gguf-{dead}-abc123xy", True)]
    keep = [make(parent / f".b.tmp-{live}-1", True), make(parent / f".notes.tmp-{dead}", False),
            make(parent / f".b.tar.gz.tmp-{dead}.mine", False), make(parent / "b.tar.gz.tmp-1", False),
            make(tmpdir / f"edgetune-gguf-{live}-abc123xy", True), make(tmpdir / "edgetune-notes", True),
            make(tmpdir / f"edgetune-gguf-{dead}", True), make(tmpdir / f"myapp-gguf-{dead}-abc123xy", True)]
    old_lock, fresh_lock = locks / "x-0123456789abcdef.lock", locks / "y-0123456789abcdef.lock"
    for lk in (old_lock, fresh_lock):
        lk.write_text("")
        lk.with_name(lk.name + ".json").write_text(json.dumps({"pid": dead}))
    os.utime(old_lock, (1, 1))
    os.utime(old_lock.with_name(old_lock.name + ".json"), (1, 1))
    r = cli("bundle", str(export), "-t", "cpu-x86", "-o", str(parent / "b"), "--archive",
            env={"TMPDIR": str(tmpdir), "EDGETUNE_LOCK_DIR": str(locks)})
    assert r.returncode == 0, r.stderr[-1500:]
    assert [p for p in stale if p.exists()] == []
    assert [p for p in keep if not p.exists()] == []
    assert not old_lock.exists() and fresh_lock.exists() and fresh_lock.with_name(fresh_lock.name + ".json").exists()
    # a build sweeps its .work folder at start, beside the stages it skips (empty `.export-*.tmp-<pid>` folders)
    from edgetune.cleanup import sweep_work

    work = tmp_path / ".work"
    work.mkdir()
    gone, mine = make(work / f".export-cpu-x86.tmp-{dead}-99", True), make(work / f".export-cpu-x86.tmp-{live}-99", True)
    assert sweep_work(work) == [gone] and mine.exists()
    # temp folders are named with the pid so that they can be swept
    from edgetune.cleanup import temp_dir

    with temp_dir("gguf") as t:
        assert Path(t).name.startswith(f"edgetune-gguf-{live}-")


# ---------------------------------------------------------------- archive extraction: sizes and a full disk

_FULL = """
import errno, os, sys
import edgetune.archive as A
if os.environ["FULL_MODE"] == "write":
    class Full:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, b): raise OSError(errno.ENOSPC, "No space left on device")
    A.open = lambda path, mode: Full(open(path, mode))
else:
    import shutil, collections
    real = shutil.disk_usage
    shutil.disk_usage = lambda p: collections.namedtuple("u", "total used free")(10**6, 10**6 - 4096, 4096)
from edgetune.cli import main
main(sys.argv[1:])
"""


def test_archive_members_are_checked_against_the_manifest_and_a_full_disk_is_exit_5(tmp_path, tiny_bundle):
    """Row: an archive that expands 1000x into a small TMPDIR was exit 2 "corrupted or truncated member ... copy
    the archive again": it is a full disk (exit 5), and member sizes were never checked against the manifest."""
    import subprocess
    import sys

    from edgetune.archive import pack
    from test_faults import ROOT

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    # an unlisted member of 50 MB of zeros (50 kB packed): refused before anything is written
    b = _copy_bundle(tiny_bundle, tmp_path / "bomb" / "b")
    (b / "model" / "pad.bin").write_bytes(bytes(50 << 20))
    bomb = pack(b, tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 1 << 20
    r = cli("verify", str(bomb), "--json", env=env)
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    assert "member 'b/model/pad.bin' (52428800 bytes) is not listed in the bundle's manifest" in one_json(r.stdout)["error"]
    assert list(tmpdir.iterdir()) == []
    # a listed member whose size is not the manifest's (the manifest is the bundle's, the file was swapped)
    b = _copy_bundle(tiny_bundle, tmp_path / "swap" / "b")
    cfg = b / "model" / "genai_config.json"
    listed = cfg.stat().st_size
    cfg.write_text(cfg.read_text() + " " * 5000)
    r = cli("run", str(pack(b, tmp_path / "swap.tar.gz")), "-p", "hi", "--json", env=env)
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    assert f"member 'b/model/genai_config.json' is {listed + 5000} bytes, the manifest says {listed}" in one_json(r.stdout)["error"]
    # an intact archive passes, with its members under a prefix (edgetune's) or at the root
    for prefix in (None, ""):
        ok = pack(tiny_bundle, tmp_path / f"ok{prefix}.tar.gz", prefix=prefix)
        assert cli("verify", str(ok), env=env).returncode == 0, prefix
    # a full disk while unpacking, or no room for the unpacked size: exit 5, nothing partial, no "corrupted"
    good = pack(tiny_bundle, tmp_path / "good.tar.gz")
    for mode in ("write", "free"):
        p = subprocess.run([sys.executable, "-c", _FULL, "verify", str(good), "--json"], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, **env, "FULL_MODE": mode, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert p.returncode == 5, (mode, p.stdout, p.stderr[-800:])
        err = one_json(p.stdout)["error"]
        assert "no space left on" in err and "needed ~" in err and "corrupt" not in err, (mode, err)
        assert list(tmpdir.iterdir()) == [], mode


# ---------------------------------------------------------------- build config string lengths

def test_build_config_string_fields_have_length_limits(tmp_path):
    """Row: a build config with a 10 MB string field was accepted without a word and the build ran past
    15 minutes. Now exit 2 at once, naming the field (pydantic max_length, and the sections' extra keys)."""
    import time

    cases = {
        "name = \"" + "a" * (10 << 20) + "\"\n[model]\nbase = \"x\"\n[[targets]]\nname = \"cpu-x86\"\n":
            "name is 10485760 characters long, over the limit of 4096",
        "name = \"t\"\n[model]\nbase = \"x\"\n[[targets]]\nname = \"" + "c" * 300 + "\"\n":
            "targets.0.name: String should have at most 200 characters",
        "name = \"t\"\n[model]\nbase = \"x\"\n[[targets]]\nname = \"cpu-x86\"\n[validate]\nmethod = \"" + "s" * 5000 + "\"\n":
            "validate.method is 5000 characters long",
        "name = \"t\"\n[model]\nbase = \"" + "m" * 5000 + "\"\n[[targets]]\nname = \"cpu-x86\"\n":
            "model.base is 5000 characters long",
    }
    for i, (text, words) in enumerate(cases.items()):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_text(text)
        t0 = time.monotonic()
        r = cli("build", str(cfg), "--json", timeout=120)
        assert r.returncode == BAD_INPUT, (words, r.stderr[-500:])
        assert words in one_json(r.stdout)["error"], r.stdout[:500]
        assert time.monotonic() - t0 < 60
        assert not (tmp_path / "build").exists()


# ---------------------------------------------------------------- chat templates, rendered once in the sandbox

PAYLOAD = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


def test_a_chat_template_that_fails_in_the_sandbox_is_refused_at_import_and_export(tmp_path, tiny_llama, quiet_export):
    """Row: a model whose chat template holds a Jinja payload: the sandbox held, but `finetune` exited 4
    ("SecurityError"), `run` of its bundle exited 4 with a 31-line RuntimeError, and `export` and `bundle`
    copied the template unchecked. Now each is exit 2 naming the template and its error."""
    from test_faults import CHAT

    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_llama, hostile)
    (hostile / "chat_template.jinja").write_text(PAYLOAD)
    r = cli("export", str(hostile), "-t", "cpu-x86", "-o", str(tmp_path / "exp"), "--precision", "fp32", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    err = one_json(r.stdout)
    assert err["error"].startswith(f"{hostile / 'chat_template.jinja'}: the chat template fails in the Jinja sandbox (SecurityError: "), err
    assert not (tmp_path / "exp").exists()
    # the template in tokenizer_config.json (how GGUF imports and older models carry it): finetune refuses it up front
    (hostile / "chat_template.jinja").unlink()
    cfg = json.loads((hostile / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}{{ raise_exception('nope') }}"
    (hostile / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = cli("finetune", str(hostile), str(CHAT), "-o", str(tmp_path / "ad"), "--max-steps", "1", "--limit", "8", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-1500:]
    assert "tokenizer_config.json (chat_template): the chat template fails in the Jinja sandbox" in one_json(r.stdout)["error"]
    # bundle never ships one, and run of a bundle that carries one (manifest rehashed) is exit 2, one line
    export, _ = quiet_export
    exp2 = tmp_path / "exp2"
    shutil.copytree(export, exp2)
    (exp2 / "chat_template.jinja").write_text(PAYLOAD)
    r = cli("bundle", str(exp2), "-t", "cpu-x86", "-o", str(tmp_path / "b"), "--json")
    assert r.returncode == BAD_INPUT and "SecurityError" in one_json(r.stdout)["error"], r.stderr[-800:]


def test_run_of_a_bundle_with_a_hostile_chat_template_is_exit_2(tmp_path, tiny_bundle):
    """Row (same): `run` of a bundle whose chat template holds a Jinja payload exited 4 with a 31-line RuntimeError."""
    b = _copy_bundle(tiny_bundle, tmp_path / "b")
    (b / "model" / "chat_template.jinja").write_text(PAYLOAD)
    _relist(b, "model/chat_template.jinja")
    r = cli("run", str(b), "-p", "hi", "-n", "2", "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stderr[-1500:])
    err = one_json(r.stdout)
    assert "the chat template cannot be rendered" in err["error"] and "--raw" in err["hint"]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    from edgetune.errors import translate

    jinja2 = pytest.importorskip("jinja2")
    assert translate(jinja2.exceptions.SecurityError("unsafe")).exit_code == BAD_INPUT


# ---------------------------------------------------------------- smaller: a FIFO, doctor, the size a full disk names

def test_a_fifo_given_as_data_is_not_a_regular_file(tmp_path, quiet_export):
    """Row (smaller): a FIFO given as data was "not found"; now it says it is not a regular file."""
    export, _ = quiet_export
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    r = cli("validate", str(export), "-t", "cpu-x86", "-d", str(fifo), "--no-latency", "-o", str(tmp_path / "rep"), "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-800:]
    err = one_json(r.stdout)
    assert err["error"] == f"data file {fifo} is not a regular file (it is a named pipe (FIFO))" and "regular file" in err["hint"]
    cfg = tmp_path / "build.toml"
    os.mkfifo(cfg)
    r = cli("build", str(cfg), "--json")
    assert r.returncode == BAD_INPUT and "is not a regular file (it is a named pipe (FIFO))" in one_json(r.stdout)["error"]
    r = cli("build", str(tmp_path / "none.toml"), "--json")
    assert r.returncode == BAD_INPUT and one_json(r.stdout)["error"] == f"build config not found: {tmp_path / 'none.toml'}"


def test_doctor_with_onnxruntime_genai_broken_lists_no_llm_bundle_as_runnable():
    """Row (smaller): with onnxruntime-genai broken, `doctor` still listed LLM bundles as runnable."""
    import textwrap

    broken = textwrap.dedent("""
        import sys
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime_genai":
                    raise ImportError("libonnxruntime-genai.so: cannot open shared object file")
                return None
        sys.meta_path.insert(0, Broken())
        from edgetune.cli import main
        main(sys.argv[1:])
    """)
    r = cli("doctor", code=broken)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("bundles this machine can run:"))
    assert "encoder bundles only" in line and "LLM bundles: none (onnxruntime-genai cannot be imported)" in line, line
    targets = one_json(cli("doctor", "--json", code=broken).stdout)["targets"]
    assert not any(t["llm_runs_here"] for t in targets)
    assert any(t["encoder_runs_here"] for t in targets if t["name"] == "cpu-x86")
    healthy = one_json(cli("doctor", "--json").stdout)["targets"]
    assert next(t for t in healthy if t["name"] == "cpu-x86")["llm_runs_here"] is True


_NOSPACE = """
import errno, shutil, sys
real = shutil.copyfile
calls = []
def copyfile(src, dst, **k):
    calls.append(src)
    if len(calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return real(src, dst, **k)
shutil.copyfile = copyfile
from edgetune.cli import main
main(sys.argv[1:])
"""


def test_a_full_disk_while_bundling_names_the_size_the_bundle_needs(tmp_path, quiet_export):
    """Row (smaller): a full disk while bundling 119 MB said "needed ~30 MB" (what had been written when it ran
    out). Now it names the model folder's size."""
    import re

    from edgetune.artifacts import _tree_bytes

    export, _ = quiet_export
    r = cli("bundle", str(export), "-t", "cpu-x86", "-o", str(tmp_path / "b"), "--json", code=_NOSPACE)
    assert r.returncode == 5, (r.returncode, r.stderr[-800:])
    err = one_json(r.stdout)["error"]
    needed = float(re.search(r"needed ~([0-9.]+) MB", err).group(1))
    assert abs(needed - _tree_bytes(export) / 2**20) <= 0.1 + 0.02 * needed, (needed, _tree_bytes(export), err)
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == []
