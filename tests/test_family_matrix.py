"""The family matrix (tests/family_matrix.py), proven: per family the whole pipeline through `edgetune build`
(LoRA finetune -> merge -> int4 export -> validate against the merged model -> bundle) and `edgetune run`
on its bundle; the export variants (AWQ, k_quant, float and runtime LoRA) over each family's build, the
fine-tune variants (DoRA, QLoRA) on the layouts that differ. Each test's families come from the matrix, and README.md's "Supported models" table must be the
matrix rendered.

Tiny random models (tests/test_families.build_family): the runtime's real shapes, a 16-token sliding window.
Their logits are nearly flat (perplexity ~480 over a 512-token vocabulary), so int4 rounding flips many argmaxes
and greedy continuations part after a token or two (measured: top-1 agreement 0.67-0.73, Gemma 2 / 3's 0.38-0.43;
generation agreement 0-0.375; KL 2-5e-4). The profile these builds validate against (``tiny-int4``) extends cpu-x86 with the two
argmax floors lowered and the distribution budgets tightened instead: KL <= 0.01, perplexity +5 % at most.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import family_matrix as fm
from edgetune.bundle import verify
from edgetune.cli import main
from test_build import write_config
from test_families import build_family

REPO = Path(__file__).resolve().parent.parent
PROFILE = ('extends = "cpu-x86"\nname = "tiny-int4"\n[budgets]\nmin_top1_agreement = 0.3\nmin_generation_agreement = 0.0\n'
           'max_kl_divergence = 0.01\nmax_perplexity_increase_pct = 5\n')
TARGET = '[[targets]]\nname = "tiny-int4.toml"\nprecision = "int4"\narchive = false\n'
PROMPT = "Turn on the kitchen lights"


def run_cli(args, capsys):
    capsys.readouterr()  # what earlier commands (a fixture's build) printed
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def _params(test: str):
    return [pytest.param(f, id=f) for f in fm.families_proven_by(test)]


# ---------------------------------------------------------------- the whole pipeline, one build per family

@pytest.fixture(scope="module")
def built(module_tmp):
    """family -> its build (made on first use, shared by the family's variant tests)."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            root = module_tmp(f"matrix-{family}")
            src = build_family(family, root / "src")
            cfg = write_config(root, src, targets=TARGET)
            (root / "tiny-int4.toml").write_text(PROFILE)
            code = 0
            # a stage cache of its own: the shared one (.edgetune-cache) outlives a test run, and a second run would
            # take the seeded family's fine-tune from it ("reused") instead of running the pipeline under test
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("EDGETUNE_CACHE", str(root / "cache"))
                try:
                    main(["build", str(cfg), "--json", "--quiet"])
                except SystemExit as exc:
                    code = exc.code
            out = root / "out"
            summary = json.loads((out / "build-summary.json").read_text()) if (out / "build-summary.json").is_file() else {}
            cache[family] = {"code": code, "summary": summary, "root": root, "src": src, "out": out,
                             "adapter": out / ".work" / "adapter", "merged": out / ".work" / "merged",
                             "profile": root / "tiny-int4.toml", "train": root / "train.jsonl"}
        return cache[family]

    return get


def _run_bundle(bundle: Path, capsys, *extra) -> str:
    """`edgetune run BUNDLE -p PROMPT --json`: exit 0 and the generated text (non-empty)."""
    code, out, err = run_cli(["run", bundle, "-p", PROMPT, "-n", "8", "--json", *extra], capsys)
    assert code == 0, err
    res = json.loads(out)
    text = res["results"][0]["output"]
    assert res["results"][0]["new_tokens"] >= 1 and isinstance(text, str) and text, res
    return text


@pytest.mark.parametrize("family", _params(fm.PIPELINE))
def test_whole_pipeline(family, built, capsys):
    b = built(family)
    res = b["summary"]
    assert b["code"] == 0 and res["passed"], json.dumps(res.get("targets"), indent=1)
    ran = [s["stage"] for s in res["stages"] if s["status"] == "ran"]
    assert ran == ["materialize", "finetune", "merge", "export", "validate", "bundle"]
    # the fine-tune trained this family's LoRA, and the merge gate measured it
    adapter_cfg = json.loads((b["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and not adapter_cfg.get("use_dora")
    # int4 RTN, its graph proven against the merged model
    export_rec = json.loads((b["out"] / ".work" / "export-tiny-int4" / "edgetune.json").read_text())["results"]
    assert export_rec["precision"] == "int4" and export_rec["kind"] == "decoder"
    assert export_rec["graph_proof"]["tokens"] > 16 and export_rec["graph_proof"]["max_abs_logit_diff"] > 0
    # validate against the merged model: its figures are there and within the profile's budgets
    row = res["targets"][0]
    assert row["result"] == "pass" and row["precision"] == "int4"
    acc = row["accuracy_figures"]
    for key in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement", "generation_agreement"):
        assert isinstance(acc[key], float), (key, acc)
    assert acc["perplexity_increase_pct"] <= 5 and 0 < acc["kl_divergence"] <= 0.01
    report = json.loads((b["out"] / ".work" / "validate-tiny-int4" / "report.json").read_text())
    assert report["passed"] is True and Path(report["reference"]["source"]).resolve() == b["merged"].resolve()
    bundle = b["out"] / "tiny-int4"
    assert verify(bundle)["ok"]
    _run_bundle(bundle, capsys)


# ---------------------------------------------------------------- export variants over the build's merged model

def _bundle(export_dir: Path, out: Path, profile: Path, capsys) -> Path:
    code, _, err = run_cli(["bundle", export_dir, "-o", out, "-t", profile, "--quiet"], capsys)
    assert code == 0, err
    assert verify(out)["ok"]
    return out


def _refused(family: str, key: str) -> fm.Refused | None:
    cell = fm.MATRIX[family][key]
    return cell if isinstance(cell, fm.Refused) else None


def _export(args, capsys, refused: fm.Refused | None = None) -> dict | None:
    """`edgetune export ARGS`: exit 0 and its record's results, or, where the matrix says the family is refused,
    exit 2 with the refusal's reason and no output folder."""
    out_dir = Path(args[args.index("-o") + 1])
    code, out, err = run_cli(["export", *args, "--json", "--quiet"], capsys)
    if refused is not None:
        assert code == 2 and refused.match in err and "Traceback" not in err, (code, err)
        assert not out_dir.exists()
        return None
    assert code == 0, err
    return json.loads((out_dir / "edgetune.json").read_text())["results"]


@pytest.fixture(scope="module")
def calib(module_tmp):
    p = module_tmp("calib") / "calib.jsonl"
    texts = ["Turn on the kitchen lights and set the thermostat to 21 degrees.",
             "What is the capital of France? Paris is the capital of France.",
             "Edge devices run small language models with int4 weights.",
             "The quick brown fox jumps over the lazy dog."]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


@pytest.mark.parametrize("family", _params(fm.AWQ))
def test_awq_export_bundle_run(family, built, calib, tmp_path, capsys):
    b = built(family)
    r = _export([b["merged"], "-t", b["profile"], "-o", tmp_path / "awq", "--precision", "int4", "--int4-algorithm", "awq",
                 "--calibration", calib], capsys)
    assert r["int4"]["algorithm"] == "awq" and r["graph_proof"]["max_abs_logit_diff"] > 0
    awq = r["quantization"]["awq"]  # the folds were exact in float and the scales no worse than RTN on its measure
    assert awq["groups"] == 4 * 4 and awq["output_error_vs_rtn"] <= 1.0, {k: v for k, v in awq.items() if k != "table"}
    _run_bundle(_bundle(tmp_path / "awq", tmp_path / "bundle", b["profile"], capsys), capsys)


@pytest.mark.parametrize("family", _params(fm.K_QUANT))
def test_k_quant_export_bundle_run(family, built, tmp_path, capsys):
    b = built(family)
    r = _export([b["merged"], "-t", b["profile"], "-o", tmp_path / "kq", "--precision", "int4", "--int4-algorithm", "k_quant"],
                capsys)
    assert r["int4"]["algorithm"] == "k_quant" and r["graph_proof"]["max_abs_logit_diff"] > 0
    _run_bundle(_bundle(tmp_path / "kq", tmp_path / "bundle", b["profile"], capsys), capsys)


@pytest.mark.parametrize("family", _params(fm.FLOAT_ADAPTER))
def test_float_adapter_export_bundle_run(family, built, tmp_path, capsys):
    b = built(family)
    r = _export([b["src"], "-t", b["profile"], "-o", tmp_path / "fa", "--precision", "int4", "--float-adapter", b["adapter"]],
                capsys, _refused(family, "float_adapter"))
    if r is None:
        return
    assert r["precision"] == "int4" and r.get("float_adapter"), r.keys()
    _run_bundle(_bundle(tmp_path / "fa", tmp_path / "bundle", b["profile"], capsys), capsys)


@pytest.mark.parametrize("family", _params(fm.RUNTIME_ADAPTER))
def test_runtime_adapter_export_bundle_run(family, built, tmp_path, capsys):
    b = built(family)
    r = _export([b["src"], "-t", b["profile"], "-o", tmp_path / "ra", "--precision", "int4", "--adapter", b["adapter"]], capsys,
                _refused(family, "runtime_adapter"))
    if r is None:
        return
    assert (tmp_path / "ra" / "adapter.onnx_adapter").is_file()
    bundle = _bundle(tmp_path / "ra", tmp_path / "bundle", b["profile"], capsys)
    code, out, err = run_cli(["run", bundle, "-p", PROMPT, "-n", "8", "--json", "--adapter", "adapter"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["adapter"] == "adapter" and res["results"][0]["output"], res


# ---------------------------------------------------------------- fine-tune variants

def _layer_linears(src: Path) -> set[str]:
    """The decoder layers' linear modules of a checkpoint (Phi-3's fused qkv_proj / gate_up_proj as one each)."""
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "np") as f:
        return {k.removesuffix(".weight") for k in f.keys() if ".layers." in k and k.endswith("_proj.weight")}


def _finetune_merge(b: dict, method: str, tmp_path: Path, capsys, *extra) -> Path:
    code, _, err = run_cli(["finetune", b["src"], b["train"], "-o", tmp_path / method, "--method", method, "--max-steps", 2,
                            "--batch-size", 2, "--eval-fraction", 0, "--quiet", *extra], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", b["src"], tmp_path / method, "-o", tmp_path / "merged", "--quiet"], capsys)
    assert code == 0, err
    return tmp_path / "merged"


@pytest.mark.parametrize("family", _params(fm.DORA))
def test_dora_finetune_merge_export_run(family, built, tmp_path, capsys):
    b = built(family)
    merged = _finetune_merge(b, "dora", tmp_path, capsys)
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dora" / "adapter_model.safetensors"), "np") as f:  # a magnitude per linear
        magnitudes = {k.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0] for k in f.keys()
                      if ".lora_magnitude_vector" in k}
    assert magnitudes == _layer_linears(b["src"])
    gate = json.loads((merged / "edgetune.json").read_text())["results"]["gate"]
    assert gate["use_dora"] is True and gate["passed"] and gate["top1_agreement"] == 1.0, gate
    r = _export([merged, "-t", b["profile"], "-o", tmp_path / "int4", "--precision", "int4"], capsys)
    assert r["precision"] == "int4"
    _run_bundle(_bundle(tmp_path / "int4", tmp_path / "bundle", b["profile"], capsys), capsys)


@pytest.mark.parametrize("family", _params(fm.QLORA))
def test_qlora_finetune_and_merge_on_cpu(family, built, tmp_path, capsys):
    """bitsandbytes' 4-bit base trains on CPU in this stack (~1 s a family on the tiny models): every linear of
    the decoder layers (Phi-3's fused qkv_proj / gate_up_proj included) is a 4-bit base with a LoRA on it, the
    adapter merges into the float base exactly (the merge gate), and its distance to the 4-bit model it was
    trained on is measured."""
    from safetensors import safe_open

    b = built(family)
    merged = _finetune_merge(b, "qlora", tmp_path, capsys)
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None  # a float model
    linears = _layer_linears(b["src"])
    assert len(linears) == 4 * (4 if family in ("phi3", "phi4-mini") else 7), sorted(linears)
    with safe_open(str(tmp_path / "qlora" / "adapter_model.safetensors"), "np") as f:
        lora_b = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight"): f.get_tensor(k)
                  for k in f.keys() if k.endswith(".lora_B.weight")}
    assert set(lora_b) == linears and all(abs(w).max() > 0 for w in lora_b.values())  # every linear trained
    ft = json.loads((tmp_path / "qlora" / "edgetune.json").read_text())["results"]
    assert ft["method"] == "qlora" and ft["model_type"] == json.loads((b["src"] / "config.json").read_text())["model_type"]
    assert ft["global_step"] == 2 and ft["first_loss"] > 0 and ft["last_loss"] > 0
    gate = json.loads((merged / "edgetune.json").read_text())["results"]["gate"]
    assert gate["passed"] and gate["top1_agreement"] == 1.0, gate
    four = gate["vs_trained_4bit"]  # the 4-bit base it was trained on: one bitsandbytes Linear4bit per linear
    assert four["linear4bit_layers"] == len(linears) and four["quant_type"] == "nf4" and 0 < four["kl"] < 0.1, four


# ---------------------------------------------------------------- the README table is the matrix rendered

def test_readme_table_is_the_matrix_rendered():
    readme = (REPO / "README.md").read_text()
    assert fm.readme_table(readme) == fm.render_table(), (
        "README.md's 'Supported models' table differs from tests/family_matrix.py: run `python tests/family_matrix.py`")


def test_every_cell_names_tests_that_exist():
    defined: dict[str, set[str]] = {}
    for row in fm.MATRIX.values():
        for cell in row.values():
            for test in getattr(cell, "tests", ()):
                module, func = test.split("::")
                if module not in defined:
                    tree = ast.parse((fm.TESTS / f"{module}.py").read_text())
                    defined[module] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
                assert func in defined[module], test
    assert all(c.tests for row in fm.MATRIX.values() for c in row.values() if isinstance(c, fm.Refused))
    assert set(fm.MATRIX) == set(fm.FAMILIES) and all(set(row) == set(fm.COLUMNS) for row in fm.MATRIX.values())
    # a "yes" is a test: an empty list of tests is not a cell, and "not tested" never reads as "yes"
    with pytest.raises(ValueError):
        fm.Yes(())
    assert fm.render_cell(fm.NotTested()).startswith("not tested")
    assert not any(fm.render_cell(c).startswith("yes") for row in fm.MATRIX.values() for c in row.values()
                   if not isinstance(c, fm.Yes))
