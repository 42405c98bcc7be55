"""SmolLM2-135M: real exports (each costs about a minute on a 2-core CPU, so they are shared)."""

from __future__ import annotations

import json

import pytest

from edgetune.export import export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4_export(smollm2_dir, module_tmp):
    return export(smollm2_dir, module_tmp("smol") / "int4", target="cpu-x86", precision="int4")


def test_int4_answers_paris(int4_export):
    from edgetune.device import llm

    model = llm.load(int4_export)
    answer = llm.generate(model, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in answer, answer
    rec = json.loads((int4_export / "edgetune.json").read_text())["results"]
    assert rec["tokenizer_check"]["mismatches"] == 0
    body = [a for a in rec["matmulnbits"] if a["bits"] == 4]
    assert body and all(a["block_size"] == 32 for a in body) and sum(a["count"] for a in body) >= 30 * 4
    assert rec["lm_head"]["kind"] == rec["int4"]["lm_head"]  # the profile default (docs/llm.md)


def test_gpu_cuda_int4_export_is_produced_on_cpu(smollm2_dir, tmp_path):
    out = export(smollm2_dir, tmp_path / "cuda", target="gpu-cuda", precision="int4")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in json.dumps(cfg["model"]["decoder"]["session_options"]).lower()
    assert json.loads((out / "edgetune.json").read_text())["results"]["builder_provider"] == "cuda"


def test_fp32_greedy_equals_pytorch(smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.device import llm

    out = export(smollm2_dir, tmp_path / "fp32", target="cpu-x86", precision="fp32")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    got = llm.generate_ids(llm.load(out), ids[0].tolist(), 16, ignore_eos=True)
    assert got == want


TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer "
        "Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was "
        "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.")


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """PyTorch fp32: teacher-forced logits on TEXT and 16 greedy tokens after 'The quick brown fox'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    fox = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ref(ids).logits[0].numpy()
        greedy = ref.generate(fox, attention_mask=torch.ones_like(fox), max_new_tokens=16, do_sample=False)[0, fox.shape[1]:].tolist()
    return {"ids": ids[0].tolist(), "logits": logits, "fox": fox[0].tolist(), "greedy": greedy}


def teacher_forced(folder, reference):
    """Top-1 agreement and mean KL(fp32 || export) over TEXT, one prefill through onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([reference["ids"]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), dtype=np.float32)
    got, want = sess.run(["logits"], feeds)[0][0], reference["logits"]

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = float((np.exp(logp(want)) * (logp(want) - logp(got))).sum(-1).mean())
    return float((got.argmax(-1) == want.argmax(-1)).mean()), kl


def test_int8_loads(smollm2_dir, reference, tmp_path):
    """Tied embeddings (SmolLM2): int8 is exported with an untied float embedding and loads in onnxruntime-genai.

    Measured (accuracy_level 4): teacher-forced top-1 and KL within the bounds below vs PyTorch fp32. (The chat answer to 'capital of France' is not a usable
    check at int8: fp32's first token is a near tie, 'The' 25.33 vs 'L' 25.24.)
    """
    import onnxruntime_genai as og

    from edgetune.device import llm

    out = export(smollm2_dir, tmp_path / "int8", target="cpu-x86", precision="int8")
    og.Model(str(out))
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["matmulnbits"] and all(a["bits"] == 8 for a in rec["matmulnbits"])
    assert rec["embeddings"] == "float Gather, own table" and rec["tokenizer_check"]["mismatches"] == 0
    # 8-bit nodes run at accuracy_level 4 on CPU (level 0 dequantizes every weight each call, ~40x slower
    # whole-model; docs/llm.md "Why int8 was slow"): int8 activations, so greedy continuations of the base
    # model may part from PyTorch's at a near tie (measured: 'The quick brown fox' parts at token 3; at
    # level 0 the first 16 tokens matched). Quality is held by the teacher-forced figures and, for a
    # fine-tune, by the task gate (the demo's int8 keeps 100 % exact match).
    assert all(a["accuracy_level"] == 4 for a in rec["matmulnbits"])
    top1, kl = teacher_forced(out, reference)
    assert top1 >= 0.95 and kl < 0.01, (top1, kl)
    got = llm.generate_ids(llm.load(out), reference["fox"], 16, ignore_eos=True)
    assert len(got) == 16 and got[0] == reference["greedy"][0], (got, reference["greedy"])


def test_inc_rtn_int4_vs_onnxruntime_rtn_int4(smollm2_dir, int4_export, reference, tmp_path):
    """neural-compressor RTN -> GPTQ layout -> builder, against the builder's own RTN (same block 32, symmetric)."""
    from edgetune.device import llm

    out = export(smollm2_dir, tmp_path / "inc-rtn", target="cpu-x86", precision="int4", int4={"algorithm": "inc-rtn"})
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    parity = rec["quantization"]["weight_parity"]
    assert parity["compared"] == 15 and parity["max_abs_diff"] < 1e-6 and not parity["unmatched"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for folder in (out, int4_export):
        answer = llm.generate(llm.load(folder), question, max_new_tokens=24)
        assert "Paris" in answer, (folder.name, answer)
    inc, ort_rtn = teacher_forced(out, reference), teacher_forced(int4_export, reference)
    print(f"teacher-forced vs fp32: inc-rtn top1 {inc[0]:.3f} KL {inc[1]:.3f}; onnxruntime rtn top1 {ort_rtn[0]:.3f} KL {ort_rtn[1]:.3f}")
    assert inc[0] >= 0.5 and ort_rtn[0] >= 0.5


def test_gguf_transcode_keeps_the_gguf_weights(smollm2_dir, tmp_path):
    """--precision gguf on SmolLM2's Q4_1/Q8_0 GGUF: every tensor exact (210 Q4_1 + the Q8_0 table as head and as embedding), perplexity within 0.5 % of the dequantized
    fp32 reference, size within 1.1x of the GGUF file (measured: +0.11 %, KL 7e-4, 1.057x; docs/llm.md)."""
    from conftest import shared_data

    from edgetune.errors import CheckFailed
    from edgetune.validate import validate

    text = shared_data("tinyshakespeare.txt").read_text()
    (tmp_path / "tail.txt").write_text(text[-6000:])
    out = export(smollm2_dir, tmp_path / "gguf", target="cpu-x86")  # the default for a GGUF not fine-tuned
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    g = rec["gguf"]
    assert rec["precision"] == "gguf" and g["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert len(g["tensors"]) == 212 and g["max_rel_diff_vs_gguf_dequantize"] <= 1e-6 and g["max_rel_diff_vs_builder_fp32"] <= 1e-6
    assert g["embedding"]["shared_with_lm_head"] and g["all_prepacked"] and g["size_vs_gguf"] <= 1.1
    assert all(not a["zero_points"] for a in rec["matmulnbits"])
    try:
        report = validate(out, target="cpu-x86", reference=smollm2_dir, data=tmp_path / "tail.txt", out=tmp_path / "rep",
                          eval_tokens=1024, window=512, stride=256, max_tokens=16, latency=False)
    except CheckFailed as exc:
        # Known and reported, not hidden: on CPU the Q8_0 head runs at accuracy_level 4 (int8 activations; level 0
        # dequantizes the 576x49152 head every token, ~100x slower), which flips the base model's greedy near ties
        # on the tail's generation prompts (generation agreement ~0.3 here). Every other budget must hold.
        report = exc.result
        assert report["failed"] == ["generation_agreement"], report["failed"]
    a = report["accuracy"]
    print("gguf:", {k: a[k] for k in ("perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence", "top1_agreement")})
    assert abs(a["perplexity_increase_pct"]) < 0.5 and a["top1_agreement"] > 0.95
