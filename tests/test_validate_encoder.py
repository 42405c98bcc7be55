"""Encoder validation: accuracy/F1 and drop vs the PyTorch reference, tokenizer parity, latency percentiles."""

from __future__ import annotations

import json

import pytest

from edgetune.errors import CheckFailed


@pytest.fixture(scope="module")
def enc_work(module_tmp, tiny_bert):
    from edgetune.export.encoder.pipeline import export_encoder

    root = module_tmp("venc")
    from tiny_models import CORPUS

    rows = [{"text": t, "label": f"LABEL_{i % 2}"} for i, t in enumerate(CORPUS[:40])]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp32 = export_encoder(tiny_bert, root / "fp32", target="cpu-x86", precision="fp32")
    return root, fp32


def test_encoder_fp32_matches_reference(enc_work, tiny_bert):
    from edgetune.device import encoder as E
    from edgetune.validate import validate

    root, fp32 = enc_work
    r = validate(fp32, target="cpu-x86", reference=tiny_bert, data=root / "data.jsonl", out=root / "rep", repeats=5, warmup=1)
    acc = r["accuracy"]
    assert r["model"]["kind"] == "encoder" and r["passed"], r["failed"]
    assert acc["agreement_with_reference"] == 1.0 and acc["accuracy_drop"] == pytest.approx(0.0)
    assert 0 <= acc["accuracy"] <= 100 and acc["accuracy"] == pytest.approx(acc["reference_accuracy"])
    assert r["tokenizer"]["mismatches"] == 0 and r["tokenizer"]["checked"] == 40 + 10
    lat = r["latency"]["latency_ms"]
    assert lat["n"] == 5 and lat["p50"] <= lat["p90"] <= lat["p99"] and r["latency"]["throughput_per_s"] > 0
    assert any(c["name"] == "p90_ms" for c in r["checks"]) and any(c["name"] == "accuracy_drop" for c in r["checks"])
    # classify() from the device runner gives labels from config.json and probabilities
    out = E.classify(E.load(fp32, "cpu-x86"), ["hello world", "turn on the lights"])
    assert len(out) == 2 and all(lab.startswith("LABEL_") and 0.5 <= p <= 1 for lab, p in out)


def test_encoder_with_flipped_head_fails_accuracy_drop(enc_work, tiny_bert, tmp_path):
    """A classifier head with swapped label rows: predictions flip, the accuracy drop budget fails."""
    from safetensors.torch import load_file, save_file
    import shutil

    from edgetune.export.encoder.pipeline import export_encoder
    from edgetune.validate import validate

    root, _ = enc_work
    src = tmp_path / "src"
    shutil.copytree(tiny_bert, src)
    (st,) = src.glob("*.safetensors")
    w = load_file(st)
    w = {k: (v.flip(0).contiguous() if k.startswith("classifier.") else v) for k, v in w.items()}
    # make the head decisive so that flipping changes every prediction
    w["classifier.weight"] = w["classifier.weight"] * 50
    save_file(w, st, metadata={"format": "pt"})
    wsrc = tmp_path / "wsrc"  # the reference: same decisive head, not flipped
    shutil.copytree(tiny_bert, wsrc)
    (st2,) = wsrc.glob("*.safetensors")
    w2 = load_file(st2)
    w2["classifier.weight"] = w2["classifier.weight"] * 50
    save_file(w2, st2, metadata={"format": "pt"})
    # gold labels = what the reference predicts (a random model has no meaningful gold labels)
    from edgetune.validate.reference import build_encoder_reference

    texts = [json.loads(line)["text"] for line in (root / "data.jsonl").read_text().splitlines()]
    pack = build_encoder_reference(wsrc, texts)
    gold = [pack.meta["labels"][i] for i in pack.arrays["pred"]]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in zip(texts, gold)))
    broken = export_encoder(src, tmp_path / "broken", target="cpu-x86", precision="fp32")
    with pytest.raises(CheckFailed) as exc:
        validate(broken, target="cpu-x86", reference=wsrc, data=tmp_path / "gold.jsonl", out=tmp_path / "rep", latency=False)
    r = exc.value.result
    assert "accuracy_drop" in r["failed"] and r["accuracy"]["agreement_with_reference"] == 0.0
    assert r["accuracy"]["reference_accuracy"] == 100.0 and r["accuracy"]["accuracy_drop"] == 100.0
    assert (tmp_path / "rep" / "report.md").is_file()
    # the same task shape as LLMs: reference, model, drop, failing examples side by side
    t = r["task"]
    assert t["metric"] == "accuracy" and t["reference"]["accuracy"] == 100.0 and t["model"]["accuracy"] == 0.0 and t["drop"] == 100.0
    f = t["failing_examples"]
    assert len(f) == 5 and f[0]["prompt"] == texts[0] and f[0]["gold"] == f[0]["reference"] == gold[0] != f[0]["model"]
    assert "failing examples" in (tmp_path / "rep" / "report.md").read_text()


def test_token_classifier_entity_f1_vs_reference(tmp_path, tiny_bert):
    """A tiny BERT token classifier: entity F1 of the fp32 export equals the PyTorch reference's."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from edgetune.export.encoder.pipeline import export_encoder
    from edgetune.validate import validate

    src = tmp_path / "tok-src"
    import shutil

    shutil.copytree(tiny_bert, src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    tags = ["O", "B-LOC", "I-LOC", "B-PER"]
    cfg = BertConfig.from_pretrained(tiny_bert, num_labels=4, id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    cfg.architectures = ["BertForTokenClassification"]
    torch.manual_seed(0)
    BertForTokenClassification(cfg).eval().save_pretrained(src, safe_serialization=True)
    rows = [{"tokens": ["Paris", "is", "in", "France"], "tags": ["B-LOC", "O", "O", "B-LOC"]},
            {"tokens": ["the", "quick", "brown", "fox", "jumps"], "tags": ["O", "O", "O", "B-PER", "O"]},
            {"tokens": ["naïve", "café", "in", "New", "York"], "tags": ["O", "O", "O", "B-LOC", "I-LOC"]}] * 4
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = export_encoder(src, tmp_path / "exp", target="cpu-x86", precision="fp32")
    r = validate(exp, target="cpu-x86", reference=src, data=tmp_path / "ner.jsonl", out=tmp_path / "rep", latency=False)
    a = r["accuracy"]
    assert a["metric"] == "entity_f1" and a["agreement_with_reference"] == 1.0
    assert a["entity_f1"] == pytest.approx(a["reference_entity_f1"]) and a["accuracy_drop"] == pytest.approx(0.0)
    assert any(c["name"] == "accuracy_drop" and c["passed"] for c in r["checks"])
    t = r["task"]  # the same shape as sequence classifiers and LLMs
    assert t["metric"] == "accuracy" and t["drop"] == pytest.approx(0.0) and t["model"]["entity_f1"] == a["entity_f1"]
    assert t["reference"]["accuracy"] == pytest.approx(a["reference_accuracy"])
    for e in t["failing_examples"]:  # spans readable, reference and model agree (same graph)
        assert e["model"] == e["reference"] and not e["model_correct"] and isinstance(e["gold"], str)
