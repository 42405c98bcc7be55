"""Validation of tiny exports: fp32 export == PyTorch, broken models fail with exit 1, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgetune.cli import main

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France. "
    "Edge devices run small language models with int4 weights. Turn on the kitchen lights. "
) * 12


def genai_export(src: Path, out: Path, precision: str = "fp32") -> Path:
    """The LLM export stage if present, else onnxruntime-genai's builder directly."""
    try:
        from edgetune.export import export  # noqa: F401  (lands with the LLM issue)
    except ImportError:
        export = None
    if export is not None:
        try:
            return Path(export(src, out, target="cpu-x86", precision=precision))
        except TypeError:
            pass
    import onnxruntime_genai.models.builder as b

    cache = out.parent / f"{out.name}-cache"
    extra = b.parse_extra_options("", str(src), str(out), precision, "cpu", str(cache), [])
    b.create_model("", str(src), str(out), precision, "cpu", str(cache), **extra)
    return out


def scaled_weights_export(src: Path, tmp_path: Path, factor: float) -> Path:
    """A copy of the HF model ``src`` with every 2-D weight times ``factor``, exported (a model that must fail)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "scaled-src"
    shutil.copytree(src, copy)
    (st,) = copy.glob("*.safetensors")
    save_file({k: (v * factor if v.ndim == 2 else v) for k, v in load_file(st).items()}, st, metadata={"format": "pt"})
    return genai_export(copy, tmp_path / "broken")


@pytest.fixture(scope="module")
def work(module_tmp, tiny_llama):
    root = module_tmp("validate")
    (root / "eval.txt").write_text(TEXT)
    (root / "prompts.txt").write_text("What is the capital of France?\nTurn on the lights.\n")
    fp32 = genai_export(tiny_llama, root / "fp32")
    return root, fp32


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_fp32_export_matches_pytorch_and_writes_report(work, tiny_llama):
    from edgetune.validate import validate

    root, fp32 = work
    r = validate(fp32, target="cpu-x86", reference=tiny_llama, data=root / "eval.txt", prompts=root / "prompts.txt",
                 out=root / "rep-fp32", repeats=2, max_tokens=8, prompt_tokens=16)
    acc = r["accuracy"]
    assert r["passed"] and r["schema_version"] == 1
    assert abs(acc["perplexity_increase_pct"]) < 0.01  # same tokens, same math: equal within 0.01%
    assert acc["kl_divergence"] < 1e-6 and acc["top1_agreement"] == 1.0 and acc["generation_agreement"] == 1.0
    assert acc["tokens_scored"] == r["accuracy"]["tokens_scored"] > 100
    assert r["tokenizer"]["mismatches"] == 0 and r["tokenizer"]["checked"] > 5
    lat = r["latency"]
    assert lat["decode_tokens_per_s"]["n"] == 2 and lat["decode_tokens_per_s"]["p50"] > 0 and lat["peak_memory_mb"] > 10
    assert {c["name"] for c in r["checks"]} >= {"tokenizer_parity", "perplexity_increase_pct", "kl_divergence", "top1_agreement", "decode_tokens_per_s"}
    out = root / "rep-fp32"
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"]["perplexity"] == pytest.approx(acc["perplexity"])
    assert saved["versions"]["onnxruntime"] and saved["machine"]["cpu_count"] and saved["runtime"]["providers"]
    assert "PASSED" in (out / "report.md").read_text()
    assert json.loads((out / "edgetune.json").read_text())["stage"] == "validate"
    # the stored pack reproduces the PyTorch reference's perplexity
    ref_meta = json.loads((out / "reference" / "reference.json").read_text())
    assert ref_meta["computed_with"] == "torch"
    assert ref_meta["perplexity"] == pytest.approx(acc["reference_perplexity"])


def test_validate_with_stored_pack_via_cli(work, capsys):
    root, fp32 = work
    pack = root / "rep-fp32" / "reference"
    if not pack.exists():
        pytest.skip("needs the report of the previous test")
    code, out, err = run_cli(["validate", str(fp32), "-t", "cpu-x86", "-r", str(pack), "--no-latency", "--json", "-o", str(root / "rep-pack")], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["reference"]["computed_with"] == "torch" and r["accuracy"]["top1_agreement"] == 1.0
    assert "decode_tokens_per_s" in r.get("not_measured", []) or not any(c["name"] == "decode_tokens_per_s" for c in r["checks"])
    assert "accuracy is not checked" not in err
    # nothing to compare with: it passes on size alone, and says so (a script reading only the exit code learns nothing)
    code, out, err = run_cli(["validate", str(fp32), "-t", "cpu-x86", "--no-latency", "--json", "-o", str(root / "rep-none")], capsys)
    assert code == 0 and [c["name"] for c in json.loads(out)["checks"]] == ["size_mb"]
    assert "warning: no --reference, --data or --prompts: accuracy is not checked" in err, err


def test_scaled_weights_fail_with_exit_1(work, tiny_llama, tmp_path, capsys):
    root, _ = work
    broken = scaled_weights_export(tiny_llama, tmp_path, 4)
    code, out, err = run_cli(["validate", str(broken), "-t", "cpu-x86", "-r", str(tiny_llama), "-d", str(root / "eval.txt"),
                              "--no-latency", "-o", str(tmp_path / "rep"), "--max-tokens", "8"], capsys)
    assert code == 1
    assert "validation failed" in err and ("top1_agreement" in err or "kl_divergence" in err)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())  # written before failing
    assert not report["passed"] and "top1_agreement" in report["failed"]
    assert "FAIL" in out


def test_changed_tokenizer_vocabulary_fails_parity(work, tmp_path, capsys):
    root, fp32 = work
    pack = root / "rep-fp32" / "reference"
    if not pack.exists():
        pytest.skip("needs the report of the first test")
    bad = tmp_path / "bad-tok"
    shutil.copytree(fp32, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    # swap the ids of two frequent tokens: same strings, different ids
    a, b = "Ġthe", "Ġof"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    code, out, err = run_cli(["validate", str(bad), "-t", "cpu-x86", "-r", str(pack), "--no-latency", "-o", str(tmp_path / "rep")], capsys)
    assert code == 1 and "tokenizer_parity" in err
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    fm = r["tokenizer"]["first_mismatch"]
    assert fm["where"] == "data" and fm["reference"] != fm["device"]
    assert "first difference in data" in out


def test_bad_inputs_exit_2(work, tmp_path, capsys):
    root, fp32 = work
    code, _, err = run_cli(["validate", str(tmp_path / "nope"), "-t", "cpu-x86"], capsys)
    assert code == 2 and "model not found" in err
    code, _, err = run_cli(["validate", str(fp32), "-t", "cpu-x86", "-r", str(root / "eval.txt")], capsys)
    assert code == 2 and "reference" in err
    code, _, err = run_cli(["validate", str(fp32), "-t", "cpu-x86", "-r", str(fp32), "--no-latency", "--stride", "0", "-d", str(root / "eval.txt")], capsys)
    assert code == 2 and "stride" in err


def test_profile_reports_ops_and_providers(work, capsys):
    _, fp32 = work
    code, out, err = run_cli(["profile", str(fp32), "-t", "cpu-x86", "--top", "4", "--repeats", "1", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert len(r["top_op_types"]) == 4 and r["top_op_types"][0]["total_us"] >= r["top_op_types"][1]["total_us"]
    full = json.loads(run_cli(["profile", str(fp32), "-t", "cpu-x86", "--top", "100", "--repeats", "1", "--json"], capsys)[1])
    assert {"GroupQueryAttention", "MatMul"} <= {o["op_type"] for o in full["top_op_types"]}
    assert set(r["by_provider"]) == {"CPUExecutionProvider"} and r["fallback_nodes"] == 0


def test_onnx_reference_with_llama_cpp_chunks(work, tmp_path):
    """The fp32 export as reference (no torch), llama.cpp-style chunked windows; plots and samples land."""
    from edgetune.validate import validate

    root, fp32 = work
    r = validate(fp32, target="cpu-x86", reference=fp32, data=root / "eval.txt", out=tmp_path / "rep", method="chunked",
                 window=64, max_tokens=4, prompt_tokens=8, repeats=3)
    a = r["accuracy"]
    assert r["reference"]["computed_with"] == "onnxruntime-genai" and a["method"] == "chunked"
    assert a["perplexity"] == pytest.approx(a["reference_perplexity"], rel=1e-9) and a["kl_divergence"] < 1e-9
    n_tokens = json.loads((tmp_path / "rep" / "reference" / "reference.json").read_text())["n_tokens"]
    assert n_tokens > 128 and a["tokens_scored"] == 32 * (n_tokens // 64)  # second half of each full 64-token chunk
    assert len(r["latency"]["samples"]["decode_tokens_per_s"]) == 3
    files = set(r["files"])
    assert {"report.json", "report.md"} <= files
    pytest.importorskip("matplotlib")
    assert {"accuracy.png", "latency.png"} <= files and (tmp_path / "rep" / "latency.png").stat().st_size > 1000


def test_missing_execution_provider_exits_3(work, capsys):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    _, fp32 = work
    code, _, err = run_cli(["profile", str(fp32), "-t", "gpu-tensorrt"], capsys)
    assert code == 3 and "TensorrtExecutionProvider" in err


@pytest.mark.parametrize("increase, se, flagged, passed", [
    (24.0, 0.8, True, True),     # 1 below the budget of 25, 1.25 standard errors: passes, flagged
    (26.0, 0.8, True, False),    # 1 above it: fails, flagged as undecided too
    (20.0, 0.8, False, True),    # 5 below, 6 standard errors: decided
    (24.0, None, False, True),   # no standard error (one scoring window): nothing to say
])
def test_a_perplexity_verdict_within_its_noise_is_flagged(increase, se, flagged, passed):
    from edgetune.commands.validate import _human
    from edgetune.device.report import markdown
    from edgetune.targets import load_target
    from edgetune.validate import _checks

    target = load_target("cpu-x86")
    assert target.budgets.max_perplexity_increase_pct == 25
    report = {"model": {"kind": "decoder", "path": "m"}, "target": {"name": "cpu-x86"}, "runtime": {"providers": ["CPU"]},
              "accuracy": {"perplexity_increase_pct": increase, "perplexity_increase_se_pct": se}, "latency": None}
    (c,) = [c for c in _checks(report, target) if c["name"] == "perplexity_increase_pct"]
    assert c["passed"] is passed and bool(c.get("within_noise")) is flagged
    report.update(checks=[c], passed=passed, failed=[] if passed else [c["name"]], report_dir="r", machine={}, versions={})
    said = "within two standard errors of the limit 25" in _human(report)
    assert said is flagged and ("within two standard errors" in markdown(report, [])) is flagged
