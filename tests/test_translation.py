"""Machine translation end to end (issue 29) on tiny random Marian and T5 models.

finetune --task translation (LoRA, SEQ_2_SEQ_LM) -> merge -> export (encoder + decoder-with-past graphs, fp32 and
int8 dynamic) -> validate (chrF/BLEU vs gold and vs the PyTorch model, token agreement) -> bundle -> run. A random
model's translations are gibberish, so the graphs are compared with PyTorch's greedy ``generate``, never with the gold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.cli import main
from tiny_models import MT_PAIRS, T5_PREFIX, translation_records

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")


class _Capture:
    """Runs the CLI with stdout captured (module fixtures have no capsys)."""

    def run(self, args: list, stdin: str | None = None) -> tuple[int, dict]:
        import contextlib
        import io
        import sys

        buf = io.StringIO()
        old = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
                main([*map(str, args), "--json", "--quiet"])
        finally:
            sys.stdin = old
        return exc.value.code, json.loads(buf.getvalue())

    def ok(self, args: list, stdin: str | None = None) -> dict:
        code, r = self.run(args, stdin)
        assert code == 0, r
        return r


cli = _Capture()


@pytest.fixture(scope="module")
def mt(module_tmp):
    """The whole host pipeline once on a tiny Marian; each test reads the folders it made."""
    from tiny_models import build_tiny_marian

    root = module_tmp("mt")
    base = build_tiny_marian(root / "marian")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in translation_records()))
    p = {"root": root, "data": data, "base": base}
    p["finetune"] = cli.ok(["finetune", base, data, "-o", root / "adapter", "--max-steps", "2", "--batch-size", "4",
                            "--max-seq-len", "32", "--save-steps", "100"])
    p["merge"] = cli.ok(["merge", base, root / "adapter", "-o", root / "merged", "--gate-data", data])
    for name in ("fp32", "int8"):
        p[name] = cli.ok(["export", root / "merged", "-t", "cpu-x86", "-o", root / name, "--precision", name])
    p["v_fp32"] = cli.ok(["validate", root / "fp32", "-t", "cpu-x86", "-r", root / "merged", "-d", data, "-o", root / "fp32.report",
                          "--no-latency"])
    code, p["v_int8"] = cli.run(["validate", root / "int8", "-t", "cpu-x86", "-r", root / "fp32", "-d", data, "-o", root / "int8.report",
                                 "--no-latency"])
    assert code in (0, 1), p["v_int8"]  # int8 of a random model may miss the 1-point chrF budget: measured, not assumed
    p["bundle"] = cli.ok(["bundle", root / "fp32", "-t", "cpu-x86", "-r", root / "fp32.report", "-o", root / "bundle"])
    return p


def _record(path: Path) -> dict:
    return json.loads((path / "edgetune.json").read_text())["results"]


def test_finetune_trains_lora_on_the_attention_projections_and_merge_gates_it(mt):
    assert mt["finetune"]["task"] == "translation" and mt["finetune"]["global_step"] == 2
    cfg = json.loads((mt["root"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and sorted(cfg["target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert not cfg.get("modules_to_save")
    gate = mt["merge"]["gate"]
    assert mt["merge"]["task_type"] == "SEQ_2_SEQ_LM" and gate["passed"] and gate["max_abs_diff"] <= 1e-3 and gate["inputs"] == 10
    assert json.loads((mt["root"] / "merged" / "config.json").read_text())["architectures"] == ["MarianMTModel"]


def test_labels_mask_padding_with_minus_100():
    from edgetune.finetune.features import IGNORE, Collator

    batch = Collator(pad_id=0)([{"input_ids": [5, 6, 1], "attention_mask": [1, 1, 1], "labels": [7, 8, 9, 10, 1]},
                                {"input_ids": [5, 1], "attention_mask": [1, 1], "labels": [7, 1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]] and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 8, 9, 10, 1], [7, 1, IGNORE, IGNORE, IGNORE]]


def test_export_writes_two_graphs_with_a_kv_cache_and_proves_them(mt):
    import onnx

    rec = _record(mt["root"] / "fp32")
    assert rec["kind"] == "seq2seq" and rec["task"] == "translation" and rec["precision"] == "fp32"
    assert (rec["decoder_start_token_id"], rec["eos_token_id"], rec["pad_token_id"]) == (0, 1, 0) and rec["layers"] == 2
    par = rec["parity"]
    assert par["passed"] and par["token_agreement"] == 1.0 and par["steps_checked"] >= 4 * 4
    assert par["max_rel_logit_diff"] < 1e-4 and par["tolerance"] == 1e-3
    assert rec["tokenizer_parity"]["mismatches"] == 0
    dec = onnx.load(str(mt["root"] / "fp32" / "decoder.onnx")).graph
    names = [i.name for i in dec.input]
    assert names[:2] == ["input_ids", "encoder_attention_mask"] and "past_key_values.1.decoder.value" in names
    assert "past_key_values.0.encoder.key" in names and "present.1.decoder.key" in [o.name for o in dec.output]
    enc = onnx.load(str(mt["root"] / "fp32" / "encoder.onnx")).graph
    assert [o.name for o in enc.output][:2] == ["last_hidden_state", "present.0.encoder.key"]
    q = _record(mt["root"] / "int8")
    assert q["precision"] == "int8-dynamic" and q["quantization"]["decoder.onnx"]["format"] == "qoperator"
    assert q["size_mb"] < 0.5 * q["fp32_size_mb"] and 0.0 <= q["int8_parity"]["token_agreement"] <= 1.0
    cfg = json.loads((mt["root"] / "int8" / "seq2seq.json").read_text())
    assert cfg["task"] == "translation" and cfg["prefix"] == "" and cfg["max_source_tokens"] == 128


def test_validate_reports_chrf_and_bleu_vs_gold_and_pytorch(mt):
    a = mt["v_fp32"]["accuracy"]
    assert a["metric"] == "chrf" and a["examples"] == len(MT_PAIRS)
    assert a["agreement_with_reference"] == 1.0 and a["token_agreement"] == 1.0
    assert a["chrf_vs_reference"] == 100.0 and a["bleu_vs_reference"] == 100.0
    assert a["chrf"] == a["reference_chrf"] and a["bleu"] == a["reference_bleu"] and a["accuracy_drop"] == 0.0
    assert mt["v_fp32"]["reference"]["computed_with"] == "torch"
    b = mt["v_int8"]["accuracy"]  # int8 measured against the fp32 export (onnxruntime), on the same source ids
    assert mt["v_int8"]["reference"]["computed_with"] == "onnxruntime" and b["reference_chrf"] == a["chrf"]
    assert b["accuracy_drop"] == pytest.approx(b["reference_chrf"] - b["chrf"], abs=1e-3)
    assert 0.0 <= b["token_agreement"] <= 1.0 and "chrf_vs_reference" in b
    md = (mt["root"] / "fp32.report" / "report.md").read_text()
    assert "chrf" in md and "bleu" in md


def _torch_translations(model_dir: Path, folder: Path, texts: list[str]) -> list[str]:
    """HF's own greedy generate (batch 1) and tokenizer decode, on the source ids the device builds."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    from edgetune.device import seq2seq as S

    tr = S.load(folder)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model.generation_config = gen
    out = []
    for t in texts:
        ids = torch.tensor([tr.source_ids(t)])
        assert ids[0].tolist() == tok(t)["input_ids"]  # the device tokenizes as transformers does
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0]
        out.append(tok.decode(seq, skip_special_tokens=True).strip())
    return out


def test_run_prints_the_pytorch_greedy_translation(mt):
    texts = [MT_PAIRS[0][0], MT_PAIRS[5][0], "A sentence the model never saw."]
    want = _torch_translations(mt["root"] / "merged", mt["root"] / "fp32", texts)
    r = cli.ok(["run", mt["root"] / "bundle", *[a for t in texts for a in ("-x", t)], "-n", "20"])
    assert r["kind"] == "seq2seq" and [x["source"] for x in r["results"]] == texts
    assert [x["translation"] for x in r["results"]] == want
    assert any(x["translation"] for x in r["results"])  # not all empty: the comparison means something
    stdin = json.dumps({"source": texts[0]}) + "\n" + texts[1] + "\n"
    r2 = cli.ok(["run", mt["root"] / "bundle", "-n", "20"], stdin=stdin)
    assert [x["translation"] for x in r2["results"]] == want[:2]
    manifest = json.loads((mt["root"] / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == "seq2seq" and manifest["task"] == "translation"
    assert {"model/encoder.onnx", "model/decoder.onnx", "model/seq2seq.json", "model/tokenizer.json"} <= {f["path"] for f in manifest["files"]}


def test_profile_times_the_decoder_with_past_graph(mt):
    r = cli.ok(["profile", mt["root"] / "int8", "-t", "cpu-x86", "--repeats", "1", "--decode-steps", "4"])
    assert r["kind"] == "seq2seq" and r["workload"]["graph"] == "decoder.onnx" and r["total_ms"] > 0
    assert r["top_op_types"] and r["fallback_nodes"] == 0


def test_run_refuses_options_of_other_bundles(mt):
    code, r = cli.run(["run", mt["root"] / "bundle", "-Q", "Who?", "-c", "Anna."])
    assert code == 2 and "translation bundle" in r["error"]


def test_t5_decoder_with_past_equals_pytorch_for_many_steps_with_the_prefix(tmp_path):
    """T5 layout (relative position buckets, tied head): a fine-tune with a task prefix carries it into the export, and
    each cached decoder step's logits equal PyTorch's teacher-forced logits."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from edgetune.device import seq2seq as S
    from tiny_models import build_tiny_t5

    base = build_tiny_t5(tmp_path / "t5")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in translation_records()[:4]))
    cli.ok(["finetune", base, data, "-o", tmp_path / "ad", "--max-steps", "1", "--batch-size", "4", "--max-seq-len", "32",
            "--source-prefix", T5_PREFIX, "--save-steps", "100"])
    # The tiny random T5 (initializer_factor 2, needed for it to say anything but <pad>) amplifies fp32 rounding: merged vs
    # base + adapter differ by 1e-3..1e-2 in fp32 and by ~1e-10 in float64 (measured), so the absolute bound is widened here
    # while KL and top-1 stay at their defaults; merge's 1e-3 is for real models (the Marian fixture keeps it).
    m = cli.ok(["merge", base, tmp_path / "ad", "-o", tmp_path / "merged", "--gate-data", data, "--max-abs-diff", "5e-2"])
    assert m["source_prefix"] == T5_PREFIX and m["gate"]["kl"] <= 1e-4 and m["gate"]["top1_agreement"] >= 0.99
    rec = cli.ok(["export", tmp_path / "merged", "-t", "cpu-x86", "-o", tmp_path / "fp32", "--precision", "fp32"])
    assert rec["prefix"] == T5_PREFIX and rec["parity"]["passed"]
    tr = S.load(tmp_path / "fp32")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tr.source_ids("Where is the station?")
    assert ids == tok(T5_PREFIX + "Where is the station?")["input_ids"]
    got, rows = tr.greedy_ids(ids, max_new_tokens=12, keep_logits=True)
    assert len(rows) >= 8  # the cache is exercised well past the first step
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0, *got[: len(rows) - 1]]])).logits[0].numpy()
    assert np.abs(np.stack(rows) - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert [int(np.argmax(r)) for r in rows] == got[: len(rows)]


# ---------------------------------------------------------------- refusals: exit 2, one line, nothing written


def test_bad_records_exit_2_naming_the_line(tmp_path):
    from tiny_models import build_tiny_marian

    base = build_tiny_marian(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "a", "target": "b"}) + "\n" + json.dumps({"source": "c", "target": 3}) + "\n")
    code, r = cli.run(["finetune", base, bad, "-o", tmp_path / "ad"])
    assert code == 2 and "bad.jsonl:2" in r["error"] and "'target'" in r["error"] and not (tmp_path / "ad").exists()
    cls = tmp_path / "cls.jsonl"
    cls.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    code, r = cli.run(["finetune", base, cls, "-o", tmp_path / "ad", "--task", "seq-cls"])
    assert code == 2 and "encoder-decoder" in r["error"]


def test_source_prefix_outside_translation_is_refused(tiny_bert, tmp_path):
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(4)))
    code, r = cli.run(["finetune", tiny_bert, cls, "-o", tmp_path / "ad", "--source-prefix", "x: "])
    assert code == 2 and "--source-prefix is for translation" in r["error"] and not (tmp_path / "ad").exists()


def test_translation_data_on_an_encoder_is_refused(tiny_bert, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in translation_records()))
    code, r = cli.run(["finetune", tiny_bert, data, "-o", tmp_path / "ad"])
    assert code == 2 and "translation fine-tuning needs an encoder-decoder" in r["error"]


def test_marian_without_tokenizer_json_is_refused_at_finetune_and_export(tmp_path):
    from tiny_models import build_tiny_marian

    base = build_tiny_marian(tmp_path / "m", tokenizer_json=False)
    code, r = cli.run(["export", base, "-t", "cpu-x86", "-o", tmp_path / "out", "--precision", "fp32"])
    assert code == 2 and "tokenizer.json" in r["error"] and "source.spm" in r["error"] and "hint" in r
    assert not (tmp_path / "out").exists()
    # and before training (transformers' MarianTokenizer would need sentencepiece, then the export would refuse anyway)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in translation_records()))
    code, r = cli.run(["finetune", base, data, "-o", tmp_path / "ad", "--max-steps", "1"])
    assert code == 2 and "no tokenizer.json" in r["error"] and not (tmp_path / "ad").exists()


def test_other_encoder_decoders_stay_a_clear_exit_2(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "bart"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}))
    save_file({"w": np.zeros(2, np.float32)}, str(d / "model.safetensors"))
    code, r = cli.run(["export", d, "-t", "cpu-x86", "-o", tmp_path / "out"])
    assert code == 2 and "unsupported architecture 'bart'" in r["error"] and "marian" in r["hint"]


@pytest.mark.slow  # the fixture's stages again through one config: ~5 s idle, 80-90 s with the 2 cores shared
def test_build_config_names_the_translation_task(mt, tmp_path):
    """The example build config's shape (examples/marian-en-de-translation.toml) on the tiny Marian: one `edgetune build`
    fine-tunes, merges, exports int8, validates chrF vs the merged model on held-out pairs and bundles."""
    from edgetune.bundle import verify

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "examples" / "marian-en-de-translation.toml").read_text()
    text = text.replace('"../models/opus-mt-en-de"', json.dumps(str(mt["base"]))).replace('"../build/marian-en-de"', '"out"')
    text = text.replace('"data/', json.dumps(str(repo / "examples" / "data"))[:-1] + '/').replace("epochs = 3", "max_steps = 2")
    cfg = tmp_path / "mt.toml"
    cfg.write_text(text + "repeats = 1\nlatency = false\n")
    r = cli.ok(["build", cfg])
    row = r["targets"][0]
    assert r["passed"] and row["result"] == "pass" and row["task_metric"] == "chrf"
    figs = row["accuracy_figures"]  # the int8 bundle vs the merged fp32 model (PyTorch), measured
    assert 0.0 <= figs["agreement_with_reference"] <= 1.0 and 0.0 <= figs["token_agreement"] <= 1.0
    assert figs["accuracy_drop"] == pytest.approx(figs["reference_chrf"] - figs["chrf"], abs=1e-3)
    res = verify(tmp_path / "out" / "cpu-x86")
    assert res["ok"] and res["kind"] == "seq2seq"
    rep = json.loads((tmp_path / "out" / "cpu-x86" / "validation" / "report.json").read_text())
    assert rep["accuracy"]["metric"] == "chrf" and rep["accuracy"]["examples"] == 4 and "bleu" in rep["accuracy"]
