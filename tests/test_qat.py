"""Quantization-aware LoRA (`finetune --quant-aware int4`): the grid is the export's, and merge -> int4 export
reproduces the model the adapter was trained as."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.errors import BadInput
from edgetune.finetune import FinetuneOptions, finetune

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "data" / "smarthome_train.jsonl"
IDS = [5, 17, 42, 99, 7, 3, 250, 11]


def _ort_dequant(w_kn: np.ndarray, bits: int, block: int) -> np.ndarray:
    """onnxruntime's own MatMulNBits RTN (what the builder calls), dequantized: [K, N] -> [N, K]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w_kn.shape
    kb = (k + block - 1) // block
    scales = np.zeros((n * kb,), dtype=np.float32)
    if bits == 4:
        packed = np.zeros((n, kb, block // 2), dtype=np.uint8)
        quantize_matmul_4bits(packed, w_kn, scales, np.zeros((n * ((kb + 1) // 2),), np.uint8), block, n, k, True)
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, kb, block).astype(np.float32)
    else:
        packed = np.zeros((n, kb, block), dtype=np.uint8)
        quantize_matmul_8bits(packed, w_kn, scales, np.zeros((n * kb,), np.uint8), block, n, k, True)
        q = packed.astype(np.float32)
    mid = 1 << (bits - 1)
    return ((q - mid) * scales.reshape(n, kb, 1)).reshape(n, kb * block)[:, :k]


@pytest.mark.parametrize("bits,block,k", [(4, 32, 128), (4, 16, 96), (4, 64, 200), (8, 32, 128)])
def test_fake_quant_is_onnxruntimes_grid(bits, block, k):
    import torch

    from edgetune.finetune.qat import fake_quant

    rng = np.random.default_rng(bits * block + k)
    w = rng.standard_normal((48, k)).astype(np.float32)  # [out, in] like nn.Linear
    w[0, :block] = 0.0  # an all-zero block (scale 0)
    w[1, :block] = np.round(w[1, :block] * 4) / 4  # values on a coarse grid: ties at the rounding boundary
    w[2, 3] = -7.0  # a negative extreme (the signed maximum sets the scale)
    got = fake_quant(torch.from_numpy(w), bits, block).numpy()
    want = _ort_dequant(np.ascontiguousarray(w.T), bits, block)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(w).max()
    assert np.unique(got[5, :block]).size <= (1 << bits)


def test_options_are_checked_before_any_work():
    for kw, words in [({"quant_aware": "int3"}, "unknown --quant-aware"),
                      ({"quant_aware": "int4", "method": "dora"}, "needs --method lora"),
                      ({"quant_aware": "int4", "method": "qlora"}, "needs --method lora"),
                      ({"quant_aware": "int4", "quant_aware_block_size": 48}, "power of two"),
                      ({"quant_aware": "int4", "quant_aware_lm_head": "int2"}, "lm-head"),
                      ({"quant_aware": "int4", "deepspeed": "zero2"}, "--deepspeed"),
                      ({"quant_aware_distill": 1.0}, "needs --quant-aware"),
                      ({"quant_aware": "int4", "quant_aware_distill": -1.0}, ">= 0")]:
        with pytest.raises(BadInput, match=words):
            FinetuneOptions(**kw).check()


def test_classifier_refused(tiny_bert, tmp_path):
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"lights {x}", "label": x}) + "\n" for x in ["on", "off"] * 4))
    with pytest.raises(BadInput, match="decoder LLMs"):
        finetune(tiny_bert, data, tmp_path / "a", options=FinetuneOptions(quant_aware="int4", max_steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.work").exists()


@pytest.fixture(scope="module")
def qat_adapter(tiny_llama, module_tmp):
    opts = FinetuneOptions(max_steps=8, save_steps=8, batch_size=4, max_seq_len=96, lr=3e-3, limit=48, seed=0,
                           quant_aware="int4", quant_aware_block_size=32, quant_aware_lm_head="int4")
    return finetune(tiny_llama, CHAT, module_tmp("qat") / "adapter", options=opts)


def test_quant_aware_training_records_its_grid_and_learns(qat_adapter):
    r = json.loads((qat_adapter / "edgetune.json").read_text())["results"]
    qa = r["quant_aware"]
    assert qa["bits"] == 4 and qa["block_size"] == 32 and qa["lm_head"] == "int4" and qa["lora_linears"] == 14
    assert "lm_head int4" in qa["frozen_quantized"]
    assert r["last_loss"] < r["first_loss"] and r["eval_loss"] < r["base_eval_loss"]


@pytest.fixture(scope="module")
def qat_merged(tiny_llama, qat_adapter, module_tmp):
    from edgetune.merge import merge

    return merge(tiny_llama, qat_adapter, module_tmp("qat-merged") / "m")


def test_merge_then_int4_export_is_the_trained_model(tiny_llama, qat_adapter, qat_merged, tmp_path):
    """The adapter's QAT forward (torch) == the int4 ONNX export of the merged model; the plain export is not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.device import llm as dev
    from edgetune.export import export
    from edgetune.finetune import qat

    merged = qat_merged
    gate = json.loads((merged / "edgetune.json").read_text())["results"]["gate"]
    vs = gate["vs_fake_quant"]
    assert vs["int4_vs_trained"]["passed"] and vs["int4_vs_trained"]["max_abs_diff"] < 1e-4
    assert vs["merged_vs_trained"]["max_abs_diff"] > 10 * vs["int4_vs_trained"]["max_abs_diff"]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    trained = PeftModel.from_pretrained(model, str(qat_adapter)).eval()
    qat.apply(trained, qat.QATSpec())
    with torch.no_grad():
        want = trained(torch.tensor([IDS])).logits[0].numpy()
    x = export(merged, tmp_path / "x", target="cpu-x86", precision="int4")
    assert json.loads((x / "edgetune.json").read_text())["results"]["quantization"]["quant_aware"]["matches"] is True
    got = dev.logits(dev.load(x), IDS)
    assert np.abs(got - want).max() < 1e-4
    fp32 = export(merged, tmp_path / "f", target="cpu-x86", precision="fp32")
    assert np.abs(dev.logits(dev.load(fp32), IDS) - want).max() > 100 * np.abs(got - want).max()


def test_cli_flags_reach_the_record(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import cli

    out = tmp_path / "a"
    res = CliRunner().invoke(cli, ["finetune", str(tiny_llama), str(CHAT), "-o", str(out), "--max-steps", "2",
                                   "--limit", "16", "--max-seq-len", "192", "--quant-aware", "int4",
                                   "--quant-aware-lm-head", "int8", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["quant_aware"]["lm_head"] == "int8" and "lm_head int8" in payload["quant_aware"]["frozen_quantized"]


def test_export_on_another_grid_says_so(qat_merged, tmp_path, capsys):
    from edgetune.export import export

    x = export(qat_merged, tmp_path / "x", target="cpu-x86", precision="int4", int4={"block_size": 64})
    qa = json.loads((x / "edgetune.json").read_text())["results"]["quantization"]["quant_aware"]
    assert qa["matches"] is False and qa["differences"] == ["block_size 64 (trained for 32)"]
    assert "fine-tuned quant-aware" in capsys.readouterr().err


def _config(tmp_path, targets: str, extra: str = "") -> Path:
    cfg = tmp_path / "b.toml"
    cfg.write_text(f"""name = "q"
[model]
base = "smollm2"
[data]
train = "{CHAT}"
[finetune]
method = "lora"
quant_aware = "int4"
{extra}
{targets}
""")
    return cfg


def test_build_takes_the_grid_from_its_targets_and_refuses_a_mismatch(tmp_path):
    from edgetune.build import load_config

    cfg, _ = load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n'))
    ft = cfg.finetune.model_dump()
    assert ft["quant_aware_block_size"] == 32 and ft["quant_aware_lm_head"] == "int4"
    board = tmp_path / "board.toml"
    board.write_text('name = "board"\nextends = "cpu-x86"\n[quantization.int4]\nblock_size = 64\n')
    two = '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n[[targets]]\nname = "board.toml"\nprecision = "int4"\n'
    with pytest.raises(BadInput, match="block_size 64 \\(trained for 32\\)"):
        load_config(_config(tmp_path, two))
    with pytest.raises(BadInput, match="no target exports the merged model at int4"):
        load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "gguf"\nadapter = "float"\n'))
    # cpu-x86's default recipe (a target with no precision) is imatrix-gptq with 8-bit layers: not the grid trained for
    with pytest.raises(BadInput, match="targets.cpu-x86 exports with recipe 'imatrix-gptq-head8-vdown8-smooth' \\(its profile "
                                       "default\\), not on the int4 RTN grid"):
        load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\n'))
    with pytest.raises(BadInput, match="recipe 'rtn-head8', not on the int4 RTN grid"):
        load_config(_config(tmp_path, '[[targets]]\nname = "cpu-x86"\nrecipe = "rtn-head8"\n'))
    with pytest.raises(BadInput, match="needs --method lora"):
        load_config(_dora(tmp_path))
    # a target's own int4 table is the grid too: lm_head int8 there trains the head at int8
    h8 = '[[targets]]\nname = "cpu-x86-avx512"\nprecision = "int4"\nint4 = { lm_head = "int8" }\n'
    assert load_config(_config(tmp_path, h8))[0].finetune.model_dump()["quant_aware_lm_head"] == "int8"
    with pytest.raises(BadInput, match="lm_head int4 \\(trained for int8\\)"):
        load_config(_config(tmp_path, h8 + '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n'))


def _dora(tmp_path) -> Path:
    p = _config(tmp_path, '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n')
    p.write_text(p.read_text().replace('method = "lora"', 'method = "dora"'))
    return p


def test_self_distillation_corpus_is_the_base_models_own_reproducible_and_cached(tiny_llama, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    opts = dict(max_steps=3, save_steps=3, batch_size=4, max_seq_len=96, lr=3e-3, limit=16, seed=0,
                quant_aware="int4", quant_aware_distill=1.0)

    def run(name, cache):
        monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / cache))
        out = finetune(tiny_llama, CHAT, tmp_path / name, options=FinetuneOptions(**opts))
        return json.loads((out / "edgetune.json").read_text())["results"]["quant_aware"]["distill"], load_file(out / "adapter_model.safetensors")

    (d, first), (again, _) = run("a", "cache-a"), run("b", "cache-b")
    assert d["weight"] == 1.0 and d["samples"] == 48 and d["tokens"] > 48 * 64 and "llm-general.jsonl" in d["source"]
    assert d["cache"] == again["cache"] == "written"
    assert again["sha256"] == d["sha256"]  # seeded: written twice from scratch, the same corpus
    [stored] = (tmp_path / "cache-a" / "qat-corpus").glob("*.json")
    hit, adapter = run("c", "cache-a")  # read back: the same corpus and, since nothing else changed, the same adapter
    assert hit["cache"] == "hit" and hit["sha256"] == d["sha256"]
    assert adapter.keys() == first.keys() and all(np.array_equal(adapter[k], first[k]) for k in first)
    stored.write_text('{"key": "%s", "seqs": [[1, -2]]}' % json.loads(stored.read_text())["key"])  # damaged: written anew
    redone, _ = run("d", "cache-a")
    assert redone["cache"] == "written" and redone["sha256"] == d["sha256"]
    opts["seed"] = 1  # another seed is another corpus, not a stale hit
    other, _ = run("e", "cache-a")
    assert other["cache"] == "written" and other["sha256"] != d["sha256"]


def test_a_quant_aware_build_checks_its_float_reference_and_teacher_before_any_work(tmp_path):
    from edgetune.build import load_config

    int4 = '[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n'
    # the default teacher of a distilled quant-aware build is the float fine-tune the build makes anyway
    cfg, _ = load_config(_config(tmp_path, int4, "quant_aware_distill = 1.0"))
    assert cfg.finetune.model_dump()["quant_aware_teacher"] == "finetune"
    assert "quant_aware_teacher" not in load_config(_config(tmp_path, int4))[0].finetune.model_dump()  # no distillation: no teacher
    for extra, targets, words in [
            ('quant_aware_distill = 1.0\nquant_aware_teacher = "fine-tune"', int4, "did you mean 'finetune'"),
            ('quant_aware_teacher = "base"', int4, "quant_aware_distill is 0"),
            ("", int4 + '[validate]\nreference = "none"\n', 'reference = "none"'),
    ]:
        with pytest.raises(BadInput, match=words) as exc:
            load_config(_config(tmp_path, targets, extra))
        assert "\n" not in exc.value.message and exc.value.hint
    plain = _config(tmp_path, int4, 'quant_aware_teacher = "base"')
    plain.write_text(plain.read_text().replace('quant_aware = "int4"\n', ""))
    with pytest.raises(BadInput, match="finetune.quant_aware is not"):
        load_config(plain)


QAT_BUILD = """name = "qat"
output = "out"
[model]
base = "{base}"
[data]
train = "train.jsonl"
[finetune]
method = "lora"
max_steps = 8
batch_size = 2
max_seq_len = 128
save_steps = 100
eval_fraction = 0.0
lr = 5e-2
quant_aware = "int4"
quant_aware_distill = 1.0
quant_aware_distill_samples = 4
quant_aware_distill_seq_len = 32
[[targets]]
name = "{target}"
precision = "int4"
archive = false
[validate]
data = "eval.txt"
prompts = "prompts.txt"
eval_tokens = 128
window = 32
max_tokens = 4
prompt_tokens = 16
repeats = 1
warmup = 0
"""


def _qat_build(root: Path, base: Path, target: str = "cpu-x86") -> tuple[int, dict, str]:
    import contextlib
    import io

    from edgetune.cli import main

    (root / "build.toml").write_text(QAT_BUILD.format(base=base, target=target))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(["build", str(root / "build.toml")])
    return exc.value.code, json.loads((root / "out" / "build-summary.json").read_text()), out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def qat_build(tiny_llama, module_tmp):
    """A quant-aware build of the tiny Llama: the float fine-tune is made too and every bundle validated against it."""
    root = module_tmp("qat-build")
    (root / "train.jsonl").write_text("".join(CHAT.read_text().splitlines(keepends=True)[:16]))
    (root / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. Turn on the kitchen lights. " * 30)
    (root / "prompts.txt").write_text("Turn on the lights\nWhat is the weather\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_CACHE", str(root / "cache"))
        first = _qat_build(root, tiny_llama)
        yield root, first, mp


def test_a_quant_aware_bundle_is_validated_against_the_float_fine_tune_too(qat_build, tiny_llama):
    root, (code, s, text), _ = qat_build
    work = root / "out" / ".work"
    assert code == 0, text
    stages = {(x["stage"], x["target"]): x["status"] for x in s["stages"]}
    assert all(stages[(k, None)] == "ran" for k in ("finetune-float", "merge-float", "finetune", "merge"))
    assert stages[("validate", "cpu-x86")] == stages[("validate-float", "cpu-x86")] == "ran"
    # the float fine-tune: the same LoRA without the grid, and the distillation's teacher by default
    assert json.loads((work / "adapter-float" / "edgetune.json").read_text())["results"]["quant_aware"] is None
    distill = json.loads((work / "adapter" / "edgetune.json").read_text())["results"]["quant_aware"]["distill"]
    assert Path(distill["teacher"]) == work / "merged-float" and distill["samples"] == 4 and distill["seq_len"] == 32
    [row] = s["targets"]
    own = json.loads((work / "validate-cpu-x86" / "report.json").read_text())
    vs = json.loads((work / "validate-float-cpu-x86" / "report.json").read_text())
    assert Path(own["reference"]["source"]) == work / "merged" and Path(vs["reference"]["source"]) == work / "merged-float"
    assert vs.get("latency") is None and own["latency"]  # latency is the bundle's, measured once
    assert row["reference"] == "the quant-aware model's own fp32 merge"
    f = row["vs_float_finetune"]
    assert "float fine-tune" in f["reference"] and f["passed"] and row["result"] == "pass"
    assert f["accuracy_figures"]["kl_divergence"] == vs["accuracy"]["kl_divergence"]
    assert row["accuracy_figures"]["kl_divergence"] == own["accuracy"]["kl_divergence"]
    # the int4 bundle is the model it was trained as, not the float fine-tune: closer to its own merge
    assert vs["accuracy"]["kl_divergence"] > 2 * own["accuracy"]["kl_divergence"]
    assert "vs float FT" in text and "against the quant-aware model's own fp32 merge" in text and "float fine-tune's fp32 merge" in text
    m = json.loads((root / "out" / "cpu-x86" / "manifest.json").read_text())
    assert m["figures"]["vs_float_finetune"]["passed"] is True and m["figures"]["passed"] is True
    assert any(x["path"] == "validation/vs-float-finetune/report.json" for x in m["files"])
    # the float fine-tune is kept in the stage cache under the key of a plain LoRA build of the same settings
    from edgetune import artifacts
    from edgetune.build import load_config
    from edgetune.build.runner import shared_dir as _shared_dir

    plain = root / "plain.toml"
    plain.write_text("\n".join(line for line in (root / "build.toml").read_text().splitlines() if not line.startswith("quant_aware")))
    cfg, _ = load_config(plain)
    key = _shared_dir("finetune", artifacts.input_hashes({"model": tiny_llama, "data": root / "train.jsonl"}), cfg.finetune.model_dump())
    assert artifacts.hash_path(key) == artifacts.hash_path(work / "adapter-float")


def test_a_bundle_that_misses_a_budget_against_the_float_fine_tune_fails_the_build(qat_build, tiny_llama):
    root, (_, first, _), _ = qat_build
    kl_own = first["targets"][0]["accuracy_figures"]["kl_divergence"]
    kl_float = first["targets"][0]["vs_float_finetune"]["accuracy_figures"]["kl_divergence"]
    limit = (kl_own * kl_float) ** 0.5  # kept against its own merge, missed against the float fine-tune
    (root / "strict.toml").write_text(f'extends = "cpu-x86"\nname = "strict"\n[budgets]\nmax_kl_divergence = {limit!r}\n')
    code, s, text = _qat_build(root, tiny_llama, "strict.toml")
    assert code == 1 and "missed their budgets: strict" in text
    status = {(x["stage"], x["target"]): x["status"] for x in s["stages"]}
    assert all(status[(k, None)] == "skipped" for k in ("finetune-float", "merge-float", "finetune", "merge"))
    [row] = s["targets"]
    assert row["result"] == "FAIL: kl_divergence vs float fine-tune", row
    assert row["accuracy_figures"]["kl_divergence"] == kl_own  # the same export, the same figures
    assert not row["vs_float_finetune"]["passed"] and row["vs_float_finetune"]["failed"] == ["kl_divergence"]
    assert not (root / "out" / "strict").exists()
    m = json.loads((root / "out" / "rejected" / "strict" / "manifest.json").read_text())
    assert m["figures"]["passed"] is False and m["figures"]["vs_float_finetune"]["failed_checks"] == ["kl_divergence"]
    own = json.loads((root / "out" / ".work" / "validate-strict" / "report.json").read_text())
    assert own["passed"] is True  # against its own merge alone it would have shipped


def test_the_grid_names_every_difference_from_an_export():
    """QATSpec.matches_export: what an export does differently from the grid the adapter was trained through."""
    from edgetune.quant import QATSpec

    spec = QATSpec(block_size=64, lm_head="int8")
    same = {"algorithm": "rtn", "block_size": 64, "symmetric": True, "lm_head": "int8"}
    assert spec.matches_export(same) == [] and spec.matches_export({**same, "int8_block_size": 64}) == []
    assert spec.matches_export({**same, "int8_block_size": 128}) == ["int8_block_size 128 (the head trained in blocks of 64)"]
    assert spec.matches_export({**same, "block_size": 32, "lm_head": "int4", "symmetric": False}) == [
        "block_size 32 (trained for 64)", "asymmetric (trained for symmetric)", "lm_head int4 (trained for int8)"]
    assert QATSpec().matches_export({"block_size": 32, "lm_head": "int4", "int8_block_size": 128}) == []  # no 8-bit head


def test_the_distillation_prompts_are_an_input_of_the_quant_aware_fine_tune(qat_build, tiny_llama, monkeypatch):
    """The corpus comes from a data file (calibration/llm-general.jsonl), not code: an edgetune whose set changed
    trains the quant-aware fine-tune again (and only it and what follows) instead of reusing one distilled on the old set."""
    from edgetune.finetune import qat

    root, _, _ = qat_build
    record = json.loads((root / "out" / ".work" / "adapter" / "edgetune.json").read_text())
    assert "distill_prompts" in record["inputs"]
    changed = root / "llm-general.jsonl"
    changed.write_text("".join(reversed(qat.distill_prompts().read_text().splitlines(keepends=True))))  # other prompts first
    monkeypatch.setattr(qat, "distill_prompts", lambda: changed)
    code, s, text = _qat_build(root, tiny_llama)
    assert code == 0, text
    status = {(x["stage"], x["target"]): x["status"] for x in s["stages"]}
    assert status[("finetune-float", None)] == status[("merge-float", None)] == "skipped"
    assert status[("finetune", None)] == status[("merge", None)] == "ran"
    assert "[finetune] runs again: input distill_prompts changed" in text
