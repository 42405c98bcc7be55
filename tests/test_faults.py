"""Bad input and faults (issue 18): every case is a user error with a documented exit code.

Each row of the issue's table is reproduced here on tiny models: a native crash on a long
argv prompt, a second build racing the first into one output, user files deleted by
`export -o`, non-UTF-8 data, a truncated GGUF, unknown peft target modules, a full disk,
misspelt DeepSpeed / build config keys, a broken onnxruntime-genai import, `--json` and
`--quiet` contracts, a bundle for another target, `validate --reference model.gguf`, and a
profile that `extends` a missing parent. None of them may exit 4 (internal error).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgetune import artifacts
from edgetune.errors import BadInput

# exit codes (README): 2 bad input, 3 missing dependency, 4 internal error (a bug), 5 no space left
BAD_INPUT, INTERNAL, NO_SPACE = 2, 4, 5

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "data" / "smarthome_train.jsonl"


def cli(*args: str, env: dict | None = None, timeout: int = 300, code: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (`python -m edgetune ...`, the way a user runs it)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "edgetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def one_json(stdout: str) -> dict:
    """stdout holds exactly one JSON object."""
    obj, end = json.JSONDecoder().raw_decode(stdout.strip())
    assert stdout.strip()[end:].strip() == "", f"more than one JSON object on stdout: {stdout!r}"
    return obj


# ---------------------------------------------------------------- shared tiny artifacts

@pytest.fixture(scope="module")
def quiet_export(module_tmp, tiny_llama):
    """`edgetune export TINY -t cpu-x86 --precision fp32 --quiet` (the process result is kept)."""
    out = module_tmp("faults") / "export"
    r = cli("export", str(tiny_llama), "-t", "cpu-x86", "-o", str(out), "--precision", "fp32", "--quiet")
    return out, r


@pytest.fixture(scope="module")
def tiny_bundle(quiet_export):
    from edgetune.bundle import make_bundle

    out, r = quiet_export
    assert r.returncode == 0, r.stderr
    bundle = out.parent / "bundle"
    make_bundle(out, bundle, target="cpu-x86")
    return bundle


def _tiny_gguf(path: Path) -> Path:
    import numpy as np

    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- the table, case by case

def test_export_quiet_prints_nothing(quiet_export):
    out, r = quiet_export
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr[-2000:])
    assert artifacts.read_record(out)["stage"] == "export"


def test_run_100k_character_prompt_is_bounded_before_native_code(tiny_bundle):
    # 0.15.2's og.Model crashed with SIGSEGV (exit 139) in `edgetune run -p <100,000 characters>`
    prompt = "hello world " * (100_000 // 12)
    r = cli("run", str(tiny_bundle), "-p", prompt, "-n", "4", "--json")
    assert r.returncode == BAD_INPUT, (r.returncode, r.stderr[-500:])
    err = one_json(r.stdout)
    assert err["ok"] is False and err["exit_code"] == 2
    assert "exceeds the context (512 tokens)" in err["error"] and "tokens" in err["error"].split("exceeds")[0]


def test_second_build_into_a_locked_output_fails_fast_naming_the_holder(tmp_path, tiny_llama):
    out = tmp_path / "out"
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'name = "t"\noutput = "out"\n[model]\nbase = "{tiny_llama}"\n[[targets]]\nname = "cpu-x86"\nprecision = "fp32"\n')
    holder = textwrap.dedent(f"""
        import sys, time
        from edgetune.artifacts import output_lock
        with output_lock({str(out)!r}, what="build output"):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        r = cli("build", str(cfg), "--json", timeout=120)
        assert r.returncode == BAD_INPUT, r.stderr[-1000:]
        err = one_json(r.stdout)
        assert "being written by another edgetune process" in err["error"] and f"pid {p.pid}" in err["error"]
        assert not (out / ".work").exists()  # it did not start
        # the same lock guards every stage output: an export into a locked folder fails fast too
        r = cli("export", str(tiny_llama), "-t", "cpu-x86", "-o", str(out), "--precision", "fp32")
        assert r.returncode == BAD_INPUT and f"pid {p.pid}" in r.stderr
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(timeout=30)


def test_export_never_deletes_a_folder_edgetune_did_not_write(tmp_path, tiny_llama):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    r = cli("export", str(tiny_llama), "-t", "cpu-x86", "-o", str(mine), "--precision", "fp32", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-1000:]
    err = one_json(r.stdout)
    assert "not written by edgetune" in err["error"] and "notes.txt" in err["error"] and "--force" in err["hint"]
    assert (mine / "notes.txt").read_text() == "my thesis"


def test_bundle_into_the_parent_of_its_input_deletes_nothing_even_with_force(tmp_path, quiet_export):
    """`bundle w/x -o w --force` once deleted the whole folder w/ (the input among it) and exited 0."""
    export, r = quiet_export
    assert r.returncode == 0, r.stderr
    w = tmp_path / "w"
    shutil.copytree(export, w / "x")
    (w / "thesis.txt").write_text("mine")
    before = sorted(p.relative_to(w).as_posix() for p in w.rglob("*"))
    for out, extra in ((w, ["--force"]), (w / "x", ["--force"]), (w / "x" / "..", []), (tmp_path, ["--force"])):
        r = cli("bundle", str(w / "x"), "-t", "cpu-x86", "-o", str(out), *extra, "--json")
        assert r.returncode == BAD_INPUT, (out, r.stdout, r.stderr[-800:])
        err = one_json(r.stdout)
        assert "would delete the input" in err["error"] and "outside the input" in err["hint"], err
    assert sorted(p.relative_to(w).as_posix() for p in w.rglob("*")) == before
    assert (w / "thesis.txt").read_text() == "mine"


def test_no_stage_replaces_a_folder_that_holds_its_input(tmp_path):
    """The refusal lives in the shared output code (atomic_dir / stage_output), not in one command."""
    data = tmp_path / "w" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    for inputs in ({"data": data}, {"data": data.parent}):
        with artifacts.replace_foreign(), pytest.raises(BadInput, match="would delete the input"):
            with artifacts.stage_output(data.parent, "demo", inputs=inputs, options={}):
                pass
    with artifacts.replace_foreign(), pytest.raises(BadInput, match="contains the input"):
        with artifacts.atomic_dir(tmp_path, inputs=(str(data),)):
            pass
    assert data.read_text() == "{}\n"
    # an input beside the output, or an alias that is not a path, is no reason to refuse
    with artifacts.stage_output(tmp_path / "out", "demo", inputs={"data": data, "model": "smollm2"}, options={}) as run:
        (run.dir / "a").write_text("1")
    assert (tmp_path / "out" / "a").is_file()


def test_stage_output_replaces_only_edgetune_folders(tmp_path):
    out = tmp_path / "out"
    with artifacts.stage_output(out, "demo", inputs={}, options={}) as run:
        (run.dir / "a").write_text("1")
    with artifacts.stage_output(out, "demo", inputs={}, options={"k": 2}) as run:  # its own artifact: replaced
        (run.dir / "b").write_text("2")
    assert (out / "b").is_file() and not (out / "a").exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="not written by edgetune"):
        with artifacts.stage_output(user, "demo", inputs={}, options={}) as run:
            pass
    assert (user / "keep.txt").is_file()
    with artifacts.replace_foreign(), artifacts.stage_output(user, "demo", inputs={}, options={}) as run:  # --force
        (run.dir / "c").write_text("3")
    assert not (user / "keep.txt").exists() and (user / "c").is_file()
    (tmp_path / "afile").write_text("x")
    with artifacts.replace_foreign(), pytest.raises(BadInput, match="not a folder"):
        artifacts.check_replaceable(tmp_path / "afile")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no locks or temp folders left here


def test_finetune_bad_target_modules_lists_the_models_modules(tmp_path, tiny_llama):
    out = tmp_path / "adapter"
    r = cli("finetune", str(tiny_llama), str(CHAT), "-o", str(out), "--target-modules", "q_projj,v_projj",
            "--max-steps", "1", "--limit", "8", "--max-seq-len", "192", "--json")
    assert r.returncode == BAD_INPUT, r.stderr[-2000:]
    err = one_json(r.stdout)
    assert "q_projj" in err["error"] and "did you mean" in err["error"]
    for name in ("q_proj", "v_proj", "o_proj", "gate_proj"):
        assert name in err["hint"]
    assert not out.exists() and not (tmp_path / "adapter.work").exists()


def test_full_disk_is_exit_5_and_leaves_nothing(tmp_path):
    from edgetune.errors import NoSpace, translate

    # the mechanism, on any machine: a stage body that hits ENOSPC
    out = tmp_path / "out"
    with pytest.raises(NoSpace) as e:
        with artifacts.stage_output(out, "demo", inputs={}, options={}) as run:
            (run.dir / "part").write_bytes(b"x" * 300_000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.exit_code == NO_SPACE == 5
    assert "no space left on" in e.value.message and "needed ~0.3 MB" in e.value.message
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    quota = translate(OSError(errno.EDQUOT, "Disk quota exceeded", str(out)))
    assert quota.exit_code == NO_SPACE and "quota" in quota.message


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def test_export_onto_a_full_tmpfs(tmp_path, tiny_llama):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "100k"):
        pytest.skip("needs root and a tmpfs mount")
    try:
        r = cli("export", str(tiny_llama), "-t", "cpu-x86", "-o", str(disk / "exp"), "--precision", "fp32", "--json")
        assert r.returncode == NO_SPACE, r.stderr[-1000:]
        err = one_json(r.stdout)
        assert f"no space left on {disk}" in err["error"] and "needed ~" in err["error"]
        assert list(disk.iterdir()) == []  # nothing partial
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_export_into_a_read_only_folder(tmp_path, tiny_llama):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "1m,ro"):
        pytest.skip("needs root and a tmpfs mount")
    try:
        r = cli("export", str(tiny_llama), "-t", "cpu-x86", "-o", str(disk / "exp"), "--precision", "fp32", "--json")
        assert r.returncode == BAD_INPUT, r.stderr[-1000:]
        assert "read-only file system" in one_json(r.stdout)["error"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_not_writable_and_undecodable_are_user_errors(tmp_path):
    from edgetune.errors import translate

    ro = translate(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"))
    assert ro.exit_code == BAD_INPUT and "read-only file system: /mnt/ro/out" in ro.message
    denied = translate(PermissionError(errno.EACCES, "Permission denied", "/root/x"))
    assert denied.exit_code == BAD_INPUT and "permission denied: /root/x" in denied.message
    ude = translate(UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"))
    assert ude.exit_code == BAD_INPUT and "UTF-8" in ude.message
    assert translate(RuntimeError("a real bug")) is None  # stays exit 4


def test_doctor_and_run_when_onnxruntime_genai_cannot_be_imported(tiny_bundle):
    broken = textwrap.dedent("""
        import sys
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime_genai":
                    raise ImportError("libonnxruntime-genai.so: cannot open shared object file: No such file or directory")
                return None
        sys.meta_path.insert(0, Broken())
        from edgetune.cli import main
        main(sys.argv[1:])
    """)
    r = cli("doctor", code=broken)
    assert r.returncode == 0, r.stderr
    assert "BROKEN: onnxruntime-genai" in r.stdout and "cannot open shared object file" in r.stdout
    assert "encoders only" in r.stdout
    d = one_json(cli("doctor", "--json", code=broken).stdout)["onnxruntime_genai"]
    assert d["installed"] and not d["available"] and "cannot open shared object" in d["error"]
    r = cli("run", str(tiny_bundle), "-p", "hi", "-n", "2", "--json", code=broken)
    assert r.returncode == 3, r.stderr
    err = one_json(r.stdout)
    assert "installed but cannot be imported: libonnxruntime-genai.so" in err["error"] and "not installed" not in err["error"]


def test_bundle_for_another_target_than_the_export(quiet_export, tmp_path):
    out, _ = quiet_export
    r = cli("bundle", str(out), "-t", "gpu-cuda", "-o", str(tmp_path / "b"), "--json")
    assert r.returncode == BAD_INPUT, r.stderr
    err = one_json(r.stdout)
    assert "exported for cpu-x86" in err["error"] and "gpu-cuda" in err["error"]
    assert not (tmp_path / "b").exists()


def test_validate_reference_accepts_what_export_accepts(quiet_export, tmp_path, tiny_llama, monkeypatch):
    """`--reference model.gguf` or an alias is materialized like `export` does (here: to the tiny model)."""
    from edgetune import model_input as models
    from edgetune.validate import reference_source, validate

    out, _ = quiet_export
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    seen = []

    def fake_materialize(spec, **kw):
        seen.append(str(spec))
        return models.inspect(tiny_llama)

    monkeypatch.setattr(models, "materialize", fake_materialize)
    assert reference_source("smollm2") == tiny_llama
    text = tmp_path / "eval.txt"
    text.write_text("Turn on the kitchen lights. The quick brown fox jumps over the lazy dog. " * 12)
    report = validate(out, target="cpu-x86", reference=gguf_file, data=text, out=tmp_path / "report", latency=False,
                      eval_tokens=128, window=64, max_tokens=4)
    assert seen == ["smollm2", str(gguf_file)]
    assert report["accuracy"]["top1_agreement"] > 0.99  # the fp32 export against its own HF weights


# cases that fail fast: (argv builder, expected exit code, words the error must contain)
def _cases(tmp: Path, tiny: Path) -> dict:
    data = tmp / "latin1.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    gguf_cut = tmp / "cut.gguf"
    full = _tiny_gguf(tmp / "full.gguf").read_bytes()
    gguf_cut.write_bytes(full[: len(full) // 2])  # inside the tensor data
    gguf_head = tmp / "head.gguf"
    gguf_head.write_bytes(full[:100])  # inside the header
    ds_top = tmp / "ds_top.json"
    ds_top.write_text(json.dumps({"gradient_cliping": 1.0, "zero_optimization": {"stage": 2}}))
    ds_zero = tmp / "ds_zero.json"
    ds_zero.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comms": False}}))
    base = f'name = "t"\n[model]\nbase = "{tiny}"\n[[targets]]\nname = "cpu-x86"\n'
    cfg_validate = tmp / "validate_typo.toml"
    cfg_validate.write_text(base + '[validate]\nrefrence = "base"\n')
    cfg_top = tmp / "top_typo.toml"
    cfg_top.write_text('outptu = "x"\n' + base + 'precison = "fp32"\n')
    profile = tmp / "board.toml"
    profile.write_text('name = "board"\nextends = "missing-parent"\n')
    st = tmp / "st"
    shutil.copytree(tiny, st)
    w = st / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    onnx_dir = tmp / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    return {
        "non-utf8 data": (["finetune", str(tiny), str(data), "-o", str(tmp / "a1")], 2, [f"{data}:3", "UTF-8"]),
        "gguf cut in tensor data": (["export", str(gguf_cut), "-t", "cpu-x86", "-o", str(tmp / "e1")], 2, ["GGUF file truncated or corrupt"]),
        "gguf cut in header": (["export", str(gguf_head), "-t", "cpu-x86", "-o", str(tmp / "e2")], 2, ["GGUF file truncated or corrupt"]),
        "truncated safetensors": (["export", str(st), "-t", "cpu-x86", "-o", str(tmp / "e3"), "--precision", "fp32"], 2, ["safetensors", "truncated or corrupt"]),
        "corrupt onnx": (["profile", str(onnx_dir), "-t", "cpu-x86"], 2, ["ONNX", "corrupt"]),
        "deepspeed top-level typo": (["finetune", str(tiny), str(CHAT), "-o", str(tmp / "a2"), "--deepspeed", str(ds_top)], 2,
                                     ["gradient_cliping", "did you mean 'gradient_clipping'"]),
        "deepspeed zero typo": (["finetune", str(tiny), str(CHAT), "-o", str(tmp / "a3"), "--deepspeed", str(ds_zero)], 2,
                                ["overlap_comms", "did you mean 'overlap_comm'"]),
        "build [validate] typo": (["build", str(cfg_validate)], 2, ["refrence", "did you mean 'reference'"]),
        "build unknown keys": (["build", str(cfg_top)], 2, ["outptu", "did you mean 'output'", "precison", "did you mean 'precision'"]),
        "extends missing parent": (["targets", "show", str(profile)], 2, [str(profile), "missing-parent"]),
    }


CASES = ["non-utf8 data", "gguf cut in tensor data", "gguf cut in header", "truncated safetensors", "corrupt onnx",
         "deepspeed top-level typo", "deepspeed zero typo", "build [validate] typo", "build unknown keys", "extends missing parent"]


@pytest.mark.parametrize("case", CASES)
def test_table_case_is_a_user_error_never_exit_4(case, tmp_path, tiny_llama):
    argv, code, words = _cases(tmp_path, tiny_llama)[case]
    r = cli(*argv, "--json", timeout=240)
    assert r.returncode != INTERNAL, f"{case}: exit 4: {r.stderr[-1500:]}"
    assert r.returncode == code, f"{case}: exit {r.returncode}: {r.stderr[-1500:]}"
    err = one_json(r.stdout)
    assert err["ok"] is False and err["exit_code"] == code
    text = err["error"] + " " + (err["hint"] or "")
    for w in words:
        assert w in text, (case, w, text)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not any(p.name.endswith(".work") for p in tmp_path.iterdir())  # no work folder left behind


def test_json_on_usage_and_internal_errors(capsys):
    from edgetune.cli import cli as group, main

    r = cli("export", "--json")  # usage error: missing MODEL / options
    assert r.returncode == 2 and one_json(r.stdout)["exit_code"] == 2

    @group.command("boom-faults")
    @__import__("edgetune.cli", fromlist=["common_options"]).common_options
    def boom():
        raise RuntimeError("kaput")

    try:
        with pytest.raises(SystemExit) as e:
            main(["boom-faults", "--json"])
        assert e.value.code == INTERNAL
        out = capsys.readouterr().out
        err = one_json(out)
        assert err == {"ok": False, "exit_code": 4, "error": "internal error: RuntimeError: kaput", "hint": err["hint"]}
    finally:
        group.commands.pop("boom-faults", None)


def test_known_config_names_are_derived_from_the_code(tmp_path, tiny_llama, monkeypatch):
    """[validate] accepts every edgetune.validate option and [finetune] every FinetuneOptions field;
    DeepSpeed sub-keys are checked against our list where DeepSpeed is not importable."""
    import dataclasses

    from edgetune.build import load_config
    from edgetune.finetune import deepspeed as ds
    from edgetune.finetune.options import FinetuneOptions
    from edgetune.validate import DEFAULTS

    lines = [f'name = "t"\n[model]\nbase = "{tiny_llama}"\n[[targets]]\nname = "cpu-x86"\n[validate]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in DEFAULTS.items() if v is not None]
    cfg = tmp_path / "all.toml"
    cfg.write_text("\n".join(lines) + "\n")
    parsed, _ = load_config(cfg)
    from edgetune.build import ValidateCfg

    declared = set(ValidateCfg.model_fields)  # fields the build config declares itself (typed there)
    assert set(parsed.validation.model_extra) == {k for k, v in DEFAULTS.items() if v is not None} - declared
    names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    from edgetune.build import unknown_keys

    assert unknown_keys({"finetune": {n: 1 for n in names}}) == []
    assert unknown_keys({"finetune": {"rnak": 1}})[0][1] == "rnak"
    monkeypatch.setattr(ds, "_zero_model", lambda: None)
    with pytest.raises(BadInput, match="did you mean 'overlap_comm'"):
        ds.check_config({"zero_optimization": {"stage": 2, "overlap_comms": True}}, "x.json")
    for name in ("zero2", "zero3", "offload"):
        ds.check_config(ds.preset(name), name)
