"""Foundation: package import without torch, targets, CLI conventions, artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune import artifacts
from edgetune.cli import cli, main
from edgetune.errors import BadInput
from edgetune.targets import list_targets, load_target

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_TARGETS = {"cpu-x86", "cpu-x86-avx512", "cpu-arm64", "gpu-cuda", "gpu-tensorrt", "fpga-vitisai"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetune", *args], capture_output=True, text=True, cwd=ROOT)


def test_import_does_not_pull_torch():
    code = (
        "import sys, edgetune, edgetune.cli, edgetune.targets, edgetune.artifacts, edgetune.doctor, edgetune.console\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and "edgetune" in r.stdout and "0.1.0" in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0
    assert "Exit codes" in r.stdout and "targets" in r.stdout and "doctor" in r.stdout


def test_all_required_profiles_validate():
    names = {t.name for t in list_targets()}
    assert REQUIRED_TARGETS <= names
    assert names & {"npu-openvino", "npu-qnn"}


def test_targets_list_json():
    r = run_cli("targets", "list", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {d["name"] for d in data} == {p.stem for p in (ROOT / "targets").glob("*.toml")}


def test_targets_show_resolves_extends():
    r = run_cli("targets", "show", "cpu-x86-avx512", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["quantization"]["int4"]["accuracy_level"] == 4  # own value
    assert t["budgets"]["max_size_mb"] == load_target("cpu-x86").budgets.max_size_mb  # inherited
    fpga = load_target("fpga-vitisai")
    assert fpga.quantization.int8.power_of_two_scales and fpga.graph.static_shapes
    assert fpga.ort_providers == ["VitisAIExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    "body, must_name",
    [
        ('[runtime]\nexecution_providr = "cpu"\n', ["runtime.execution_providr", "execution_provider"]),
        ('[budgets]\nmax_size_mb = "big"\n', ["budgets.max_size_mb", "number"]),
        ('[precision]\nllm = "int3"\n', ["precision.llm", "int4"]),
        ('extends = "no-such-target"\n', ["no-such-target", "cpu-x86"]),
        ("[runtime\n", ["invalid TOML"]),
    ],
)
def test_bad_profile_exits_2_with_one_line(tmp_path, body, must_name):
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\n' + body)
    r = run_cli("targets", "show", str(f))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for word in must_name:
        assert word in lines[0]
    if "extends" not in body and "TOML" not in must_name[0]:
        assert str(f) in lines[0]


def test_user_profile_extends_builtin(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text('name = "board"\nextends = "cpu-arm64"\n[session]\nintra_op_threads = 2\n')
    t = load_target(f)
    assert t.runtime.arch == "aarch64" and t.session.intra_op_threads == 2
    assert t.budgets.max_peak_memory_mb == load_target("cpu-arm64").budgets.max_peak_memory_mb


def test_unknown_target_names_choices():
    with pytest.raises(BadInput) as e:
        load_target("cpu-x87")
    assert "cpu-x86" in str(e.value)


def test_doctor_json_is_truthful():
    import onnxruntime as ort

    r = run_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["execution_providers"] == ort.get_available_providers()
    assert d["versions"]["onnxruntime"] == ort.__version__
    assert d["machine"]["cpu_count"] == os.cpu_count()
    by_name = {t["name"]: t for t in d["targets"]}
    assert by_name["gpu-cuda"]["validate_here"] == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_quiet_and_unknown_command():
    r = run_cli("no-such-command")
    assert r.returncode == 2


def test_internal_error_is_one_line(monkeypatch, capsys):
    @cli.command("boom-test")
    def boom():
        raise RuntimeError("kaput")

    with pytest.raises(SystemExit) as e:
        main(["boom-test"])
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert "kaput" in err and "Traceback" not in err
    cli.commands.pop("boom-test", None)


def test_code_identity_hashes_the_stage_import_closure(tmp_path):
    """A stage's code identity follows its imports (relative, function-level) through edgetune's source: an edit
    in the bundle's modules changes the bundle's identity and not the merge's."""
    import shutil

    from edgetune import stage_code as ci

    root = tmp_path / "edgetune"
    shutil.copytree(ci.PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert ci.source_hash("bundle.cpu-x86", root) == ci.source_hash("bundle.cpu-x86")  # same source, same hash
    before = {k: ci.source_hash(k, root) for k in ("bundle.cpu-x86", "merge", "export.cpu-x86")}
    assert len(set(before.values())) == 3
    assert "edgetune.signing" in ci.closure(("edgetune.bundle",), root)  # a function-level import counts
    assert "edgetune.doctor" not in ci.closure(("edgetune.bundle",), root)

    with (root / "bundle.py").open("a") as f:
        f.write("\n\ndef _later():\n    from . import doctor\n")
    assert "edgetune.doctor" in ci.closure(("edgetune.bundle",), root)
    assert "edgetune.profiling" not in ci.closure(("edgetune.bundle",), root)
    with (root / "bundle.py").open("a") as f:  # a module named in a string: a worker run with -m, import_module(...)
        f.write('\n\ndef _worker():\n    return ["-m", "edgetune.profiling"]\n')
    assert "edgetune.profiling" in ci.closure(("edgetune.bundle",), root)
    after = {k: ci.source_hash(k, root) for k in before}
    assert after["bundle.cpu-x86"] != before["bundle.cpu-x86"] and after["merge"] == before["merge"]
    (root / "doctor.py").write_text((root / "doctor.py").read_text() + "\n# edited\n")  # reached only through the new import
    assert ci.source_hash("bundle.cpu-x86", root) != after["bundle.cpu-x86"]
    assert ci.source_hash("merge", root) == before["merge"]
    assert ci.source_hash("demo", root) != ci.source_hash("demo")  # an unknown kind hashes the whole package


def test_stage_output_is_atomic_and_fingerprinted(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    out = tmp_path / "out"
    with artifacts.stage_output(out, "demo", inputs={"src": src}, options={"k": 1}) as run:
        (run.dir / "a.txt").write_text("x")
        assert not out.exists()  # nothing visible until it succeeds
        run.results["n"] = 1
    rec = artifacts.read_record(out)
    assert rec["stage"] == "demo" and rec["results"] == {"n": 1}
    assert rec["inputs"]["src"]["sha256"] == artifacts.sha256_file(src)
    assert artifacts.up_to_date(out, "demo", {"src": src}, {"k": 1})
    assert not artifacts.up_to_date(out, "demo", {"src": src}, {"k": 2})
    assert rec["code"] == artifacts.code_identity("demo")
    with pytest.MonkeyPatch.context() as mp:  # same inputs and options, other code: not up to date
        mp.setattr(artifacts, "code_identity", lambda stage: "other code")
        assert not artifacts.up_to_date(out, "demo", {"src": src}, {"k": 1})
    src.write_text("changed")
    assert not artifacts.up_to_date(out, "demo", {"src": src}, {"k": 1})

    with pytest.raises(RuntimeError):
        with artifacts.stage_output(out, "demo", inputs={"src": src}, options={"k": 1}) as run:
            (run.dir / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").exists() and not (out / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_hash_path_ignores_record_and_sees_content(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "w.bin").write_bytes(b"abc")
    h1 = artifacts.hash_path(d)
    (d / artifacts.RECORD_NAME).write_text("{}")
    assert artifacts.hash_path(d) == h1
    (d / "w.bin").write_bytes(b"abd")
    assert artifacts.hash_path(d) != h1


def test_cli_runner_targets_table():
    r = CliRunner().invoke(cli, ["targets", "list"])
    assert r.exit_code == 0 and "fpga-vitisai" in r.output


def test_library_output_on_stdout_never_reaches_the_result():
    """Libraries print on stdout (DeepSpeed's logger, the genai builder, C++ code via fd 1):
    under a command, all of it goes to stderr and stdout holds only the JSON result."""
    import json
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from edgetune import console\n"
        "console.configure(json_output=True)\n"
        "with console.results_only_stdout():\n"
        "    print('[WARNING] a library logger on sys.stdout')\n"
        "    os.write(1, b'native code writing to fd 1\\n')\n"
        "    console.emit({'ok': True})\n"
        "print('after the command, stdout is stdout again')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split("}\n", 1)
    assert json.loads(first + "}") == {"ok": True}
    assert rest == "after the command, stdout is stdout again\n"
    assert "a library logger" in p.stderr and "native code" in p.stderr
