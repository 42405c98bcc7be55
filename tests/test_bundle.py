"""Bundles: manifest contents, byte-identical rebuilds, and verify catching every kind of damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgetune import artifacts
from edgetune.bundle import archive_path, make_bundle, verify
from edgetune.cli import main


def fake_export(root: Path) -> Path:
    """A decoder export folder with a record chain data -> finetune -> merge -> export."""
    (root / "data.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.jsonl").write_text('{"text": "hello"}\n')
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    with artifacts.stage_output(root / "adapter", "finetune", inputs={"model": base, "data": root / "data.jsonl"}, options={"method": "lora"}) as run:
        (run.dir / "adapter_model.safetensors").write_bytes(b"A" * 100)
    with artifacts.stage_output(root / "merged", "merge", inputs={"base": base, "adapter": root / "adapter"}, options={}) as run:
        (run.dir / "model.safetensors").write_bytes(b"M" * 100)
    with artifacts.stage_output(root / "export", "export", inputs={"model": root / "merged"}, options={"precision": "int4"}) as run:
        (run.dir / "genai_config.json").write_text('{"model": {"context_length": 64}}')
        (run.dir / "model.onnx").write_bytes(os.urandom(3000))
        (run.dir / "model.onnx.data").write_bytes(os.urandom(20000))
        (run.dir / "tokenizer.json").write_text('{"version": "1.0"}')
        run.results.update(kind="decoder", precision="int4", target="cpu-x86", size_mb=0.02)
    rep = root / "report"
    (rep / "reference").mkdir(parents=True)
    (rep / "report.json").write_text(json.dumps({"passed": True, "failed": [], "model": {"size_mb": 0.02},
                                                 "accuracy": {"perplexity_increase_pct": 1.5}, "latency": {"load_time_s": 0.1},
                                                 "checks": [{"name": "size_mb", "value": 0.02, "limit": 100, "op": "<=", "passed": True}]}))
    (rep / "report.md").write_text("# report\n")
    (rep / "reference" / "golden.npz").write_bytes(os.urandom(500))
    return root / "export"


@pytest.fixture(scope="module")
def export_dir(module_tmp):
    return fake_export(module_tmp("bundle-src") / "work")


@pytest.fixture()
def built(tmp_path, export_dir):
    m = make_bundle(export_dir, tmp_path / "b1", target="cpu-x86", report=export_dir.parent / "report", archive=True)
    return tmp_path, export_dir, m


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_manifest_lists_every_file_and_provenance(built):
    tmp, exp, m = built
    b = tmp / "b1"
    paths = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"manifest.json"}
    assert paths == on_disk
    assert {"model/model.onnx", "model/model.onnx.data", "model/genai_config.json", "target.toml",
            "validation/report.json", "validation/reference/golden.npz"} <= paths
    assert "model/edgetune.json" not in paths  # records hold timestamps and host paths
    for f in m["files"]:
        assert f["sha256"] == artifacts.sha256_file(b / f["path"]) and f["size"] == (b / f["path"]).stat().st_size
    prov = m["provenance"]["summary"]
    work = exp.parent
    assert prov["base_model"] == artifacts.hash_path(work / "base")
    assert prov["dataset"] == artifacts.hash_path(work / "data.jsonl")
    assert prov["adapter"] == artifacts.hash_path(work / "adapter")
    assert m["kind"] == "decoder" and m["precision"] == "int4" and m["target"]["name"] == "cpu-x86"
    assert m["figures"]["passed"] is True and m["figures"]["accuracy"]["perplexity_increase_pct"] == 1.5
    assert "onnxruntime" in m["versions"]["export"]
    assert str(exp.parent) not in (b / "manifest.json").read_text()  # no host paths
    assert verify(b)["ok"] and verify(archive_path(b))["ok"]


def test_same_inputs_give_byte_identical_archives(built):
    tmp, exp, _ = built
    make_bundle(exp, tmp / "again" / "b1", target="cpu-x86", report=exp.parent / "report", archive=True)
    assert archive_path(tmp / "b1").read_bytes() == archive_path(tmp / "again" / "b1").read_bytes()


def test_flipping_any_byte_of_any_file_fails_verify(built):
    tmp, _, _ = built
    b = tmp / "b1"
    files = sorted(p for p in b.rglob("*") if p.is_file())
    assert len(files) >= 8
    for p in files:
        data = bytearray(p.read_bytes())
        for pos in {0, len(data) // 2, len(data) - 1}:
            orig = data[pos]
            data[pos] = orig ^ 0x01
            p.write_bytes(bytes(data))
            res = verify(b)
            assert not res["ok"], f"flipping byte {pos} of {p.name} went unnoticed"
            assert any(pr["path"] == p.relative_to(b).as_posix() for pr in res["problems"]) or p.name == "manifest.json"
            data[pos] = orig
            p.write_bytes(bytes(data))
    assert verify(b)["ok"]


def test_missing_extra_truncated_reported_by_cli_with_exit_2(built, capsys):
    tmp, _, _ = built
    b = tmp / "b1"
    (b / "model" / "tokenizer.json").unlink()
    (b / "model" / "notes.txt").write_text("extra")
    data = (b / "model" / "model.onnx.data").read_bytes()
    (b / "model" / "model.onnx.data").write_bytes(data[:100])
    code, out, err = run_cli(["verify", str(b), "--json"], capsys)
    assert code == 2
    res = json.loads(out)
    kinds = {(p["path"], p["problem"]) for p in res["problems"]}
    assert kinds == {("model/tokenizer.json", "missing"), ("model/notes.txt", "extra"), ("model/model.onnx.data", "truncated")}
    assert "tokenizer.json: missing" in err and "Traceback" not in err


def test_cli_bundle_and_verify_archive(built, capsys):
    tmp, exp, _ = built
    code, out, _ = run_cli(["bundle", str(exp), "-o", str(tmp / "cli"), "-t", "cpu-x86", "--archive", "--json"], capsys)
    assert code == 0 and json.loads(out)["files"] >= 5
    code, out, _ = run_cli(["verify", str(tmp / "cli.tar.gz")], capsys)
    assert code == 0 and out.startswith("ok:")
    # a tampered archive (one byte of the compressed stream) fails with exit 2
    arc = tmp / "cli.tar.gz"
    data = bytearray(arc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arc.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", str(arc)], capsys)
    assert code == 2 and err.startswith("error:")


def test_not_a_bundle_is_bad_input(tmp_path, capsys):
    code, _, err = run_cli(["verify", str(tmp_path)], capsys)
    assert code == 2 and "manifest.json" in err
    code, _, err = run_cli(["bundle", str(tmp_path), "-o", str(tmp_path / "x"), "-t", "cpu-x86"], capsys)
    assert code == 2 and not (tmp_path / "x").exists()


def test_a_bundle_is_not_bundled_again(built, capsys):
    """`bundle BUNDLE` took the bundle's model/ (which carries no export record) and wrote a manifest that guessed the
    precision from the target and lost the task, labels, provenance and the made-for-this-target check. Now exit 2
    naming the export to bundle instead, and nothing written."""
    tmp, _, first = built
    code, out, _ = run_cli(["bundle", str(tmp / "b1"), "-o", str(tmp / "again"), "-t", "cpu-x86", "--json"], capsys)
    assert code == 2 and json.loads(out)["error"].startswith(f"{tmp / 'b1'} is a bundle (it has manifest.json), not an export")
    assert not (tmp / "again").exists() and first["provenance"]
