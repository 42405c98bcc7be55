"""Encoder export through torch.onnx (no optimum): PyTorch parity, fused ops, inputs, the gate (fast).

The references are computed here with transformers on real tokenized text, independently of the
parity block the exporter writes into its record.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from edgetune.export.encoder.pipeline import export_encoder
from edgetune.errors import CheckFailed

from encoder_helpers import TEXTS, record

TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tiny_token_bert(tiny_bert, module_tmp):
    """The tiny BERT with a 5-tag token-classification head (random weights)."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    src = module_tmp("tok-bert")
    shutil.copytree(tiny_bert, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    cfg = BertConfig.from_pretrained(tiny_bert, num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                                     label2id={t: i for i, t in enumerate(TAGS)})
    cfg.architectures = ["BertForTokenClassification"]
    torch.manual_seed(1)
    BertForTokenClassification(cfg).eval().save_pretrained(src, safe_serialization=True)
    return src


@pytest.fixture(scope="module")
def models(tiny_bert, tiny_token_bert):
    return {"sequence-classification": tiny_bert, "token-classification": tiny_token_bert}


@pytest.fixture(scope="module")
def exported(models, module_tmp):
    """fp32 exports: 'dynamic' (cpu-x86, fused) and 'static' (fpga-vitisai shapes 1x128, unfused)."""
    root = module_tmp("tx")
    cache = {}

    def get(task: str, shapes: str):
        if (task, shapes) not in cache:
            target = "cpu-x86" if shapes == "dynamic" else "fpga-vitisai"
            cache[task, shapes] = export_encoder(models[task], root / f"{task}-{shapes}", target=target, precision="fp32")
        return cache[task, shapes]

    return get


def _feeds(model_dir, texts, *, length=None):
    """Tokenize with transformers (padding to the longest, or to ``length``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = {"padding": "max_length", "max_length": length} if length else {"padding": True}
    return {k: v.astype(np.int64) for k, v in tok(texts, return_tensors="np", truncation=True, **kw).items()}


def _torch(model_dir, task, feeds):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForTokenClassification
    model = cls.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def _onnx(folder, feeds, *, one_at_a_time=False):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if one_at_a_time:
        n = len(next(iter(feeds.values())))
        return np.concatenate([sess.run(None, {k: feeds[k][i : i + 1] for k in names})[0] for i in range(n)])
    return sess.run(None, {k: feeds[k] for k in names})[0]


def _ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)


def _dims(value_info):
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_dynamic_export_matches_pytorch_on_a_padded_batch(models, exported, task):
    out = exported(task, "dynamic")
    feeds = _feeds(models[task], TEXTS)  # 6 texts of different lengths: padded rows, batch 6
    assert feeds["attention_mask"].min() == 0
    want = _torch(models[task], task, feeds)
    got = _onnx(out, feeds)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in model.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert _dims(i) == ["batch_size", "sequence_length"]
    (o,) = model.graph.output
    assert o.name == "logits" and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(o)[:2] == (["batch_size", 2] if task == "sequence-classification" else ["batch_size", "sequence_length"])
    r = record(out)["results"]
    assert r["task"] == task and r["static_shapes"] is False
    assert r["exporter"]["exporter"] == "torch.onnx (TorchScript)"
    assert r["parity"]["fp32_max_abs_diff"] < 1e-4 and r["parity"]["model_max_abs_diff"] < 1e-4
    if task == "token-classification":
        assert r["labels"] == TAGS


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_dynamic_export_has_the_fused_transformer_ops(exported, task):
    """onnxruntime's optimizer fused every layer, as optimum's export did: 2 layers -> 2 Attention,
    4 SkipLayerNormalization, 2 BiasGelu, 1 EmbedLayerNormalization; no unfused Softmax/Erf left."""
    out = exported(task, "dynamic")
    ops = _ops(out)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] == 4
    assert ops["BiasGelu"] == 2 and ops["EmbedLayerNormalization"] == 1
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["LayerNormalization"] == 0
    assert record(out)["results"]["fusions"] == {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1,
                                                  "SkipLayerNormalization": 4}


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_static_export_matches_pytorch_at_the_profile_shape(models, exported, task):
    """fpga-vitisai's static 1x128 graph, fp32: every position (pads included) agrees with PyTorch."""
    out = exported(task, "static")
    feeds = _feeds(models[task], TEXTS, length=128)
    want = _torch(models[task], task, feeds)
    got = _onnx(out, feeds, one_at_a_time=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    model = onnx.load(str(out / "model.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    for i in model.graph.input:
        assert _dims(i) == [1, 128], i.name
    assert _dims(model.graph.output[0]) == ([1, 2] if task == "sequence-classification" else [1, 128, len(TAGS)])
    ops = _ops(out)
    assert not [op for op in ops if op in ("Attention", "SkipLayerNormalization", "EmbedLayerNormalization")]
    assert ops["Softmax"] == 2 and ops["LayerNormalization"] == 5  # plain ONNX for the QDQ quantizer
    r = record(out)["results"]
    assert r["static_shapes"] and r["sequence_length"] == 128 and r["batch_size"] == 1
    assert r["parity"]["inputs"].startswith("1x128") and r["parity"]["fp32_max_abs_diff"] < 1e-4


def test_no_token_type_ids_for_models_without_them(tiny_bert, tmp_path):
    """DistilBERT has no token types: the graph takes input_ids + attention_mask only, as optimum's did."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    src = tmp_path / "distil"
    shutil.copytree(tiny_bert, src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    vocab = json.loads((tiny_bert / "config.json").read_text())["vocab_size"]
    torch.manual_seed(2)
    cfg = DistilBertConfig(vocab_size=vocab, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=256)
    DistilBertForSequenceClassification(cfg).eval().save_pretrained(src, safe_serialization=True)
    out = export_encoder(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    assert [i.name for i in onnx.load(str(out / "model.onnx")).graph.input] == ["input_ids", "attention_mask"]
    feeds = _feeds(src, TEXTS)
    feeds.pop("token_type_ids", None)
    np.testing.assert_allclose(_onnx(out, feeds), _torch(src, "sequence-classification", feeds), atol=1e-4, rtol=0)
    assert record(out)["results"]["inputs"] == ["input_ids", "attention_mask"]


def test_a_wrong_export_fails_the_parity_gate_and_leaves_nothing(tiny_bert, tmp_path, monkeypatch):
    """If the exported graph disagrees with PyTorch (here: the reference is off by 0.05), export stops."""
    from edgetune.export.encoder import torch_export

    real = torch_export.export_fp32

    def skewed(*a, **kw):
        ref, rec = real(*a, **kw)
        ref.expected = ref.expected + 0.05
        return ref, rec

    monkeypatch.setattr(torch_export, "export_fp32", skewed)
    with pytest.raises(CheckFailed, match="disagrees with PyTorch"):
        export_encoder(tiny_bert, tmp_path / "out", target="cpu-x86", precision="fp32")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_tokenizer_is_bad_input(tiny_bert, tmp_path):
    from edgetune.errors import BadInput

    src = tmp_path / "notok"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_bert / name, src / name)
    with pytest.raises(BadInput, match="no tokenizer in"):
        export_encoder(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    assert not (tmp_path / "out").exists()
