"""`edgetune build` for the encoder NLP tasks (issue 29): extractive QA and NER from one TOML file,
finetune -> merge -> export -> validate -> bundle, on tiny random models (seconds).

The config schema needs nothing new: ``[finetune] task = "qa"`` (with ``max_seq_len`` / ``doc_stride``) or
``"token-cls"`` are FinetuneOptions fields, the export reads the head from the merged model, validate picks
SQuAD EM/F1 or entity F1 from the data. A random model's answers are arbitrary: the builds are checked for
what they made (bundles, task metrics next to the PyTorch model, `run` answering), not for accuracy.
"""

from __future__ import annotations

import json

import pytest

from edgetune.cli import main
from test_build import run_cli
from tiny_models import squad_records

# the fpga profile's accuracy budget (1 point) is for trained models; a random span head's near ties flip
LOOSE_FPGA = 'extends = "fpga-vitisai"\nname = "fpga-tiny"\n[budgets]\nmax_accuracy_drop = 100.0\n'

QA_CONFIG = """
name = "tiny-qa"
output = "out"
[model]
base = "{base}"
[data]
train = "squad.jsonl"
[finetune]
method = "lora"
task = "qa"
max_steps = 3
batch_size = 4
max_seq_len = 64
doc_stride = 16
save_steps = 100
limit = 7                     # records 1-7 train; 8-9 (long contexts) are held out
[[targets]]
name = "cpu-x86"
precision = "fp32"
[[targets]]
name = "fpga-tiny.toml"
calibration = "squad.jsonl"
[validate]
data = "squad.jsonl"
rows = "8-9"
"""

NER_CONFIG = """
name = "tiny-ner"
output = "out"
[model]
base = "{base}"
[data]
train = "ner.jsonl"
[finetune]
method = "lora"
task = "token-cls"
max_steps = 3
batch_size = 4
max_seq_len = 32
save_steps = 100
limit = 24
[[targets]]
name = "cpu-x86"
precision = "fp32"
[validate]
data = "ner.jsonl"
rows = "25-"
"""


def _build(cfg) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(["build", str(cfg), "--json", "--quiet"])
    r = json.loads(buf.getvalue())
    assert exc.value.code == 0, r
    return r


@pytest.fixture(scope="module")
def qa_build(module_tmp):
    from tiny_models import build_tiny_bert_qa

    root = module_tmp("build-qa")
    base = build_tiny_bert_qa(root / "model")
    recs = squad_records(long_context_repeats=12)
    assert len(recs) == 9
    (root / "squad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "fpga-tiny.toml").write_text(LOOSE_FPGA)
    (root / "build.toml").write_text(QA_CONFIG.format(base=base))
    return root, recs, _build(root / "build.toml")


def test_qa_build_runs_every_stage_and_bundles_both_targets(qa_build):
    root, _, r = qa_build
    assert r["passed"] and [t["target"] for t in r["targets"]] == ["cpu-x86", "fpga-tiny"]
    ran = [s["stage"] for s in r["stages"] if s["status"] == "ran"]
    for stage in ("finetune", "merge", "export", "validate", "bundle"):
        assert stage in ran, (stage, ran)
    assert r["validation_data"]["examples"] == 2 and r["validation_data"]["overlap"] == 0
    ft = json.loads((root / "out" / ".work" / "adapter" / "edgetune.json").read_text())["results"]
    assert ft["task"] == "qa" and ft["train_records"] + ft["eval_records"] == 7 and ft["train_samples"] >= ft["train_records"]
    for t in r["targets"]:
        assert t["task_metric"] == "accuracy" and isinstance(t["task_figures"]["bundle"], float)  # SQuAD F1, %
        fig = t["accuracy_figures"]
        assert {"exact_match", "f1", "reference_f1", "agreement_with_reference"} <= set(fig), fig
        man = json.loads((root / "out" / t["target"] / "manifest.json").read_text())
        assert man["task"] == "question-answering"
    assert r["targets"][0]["accuracy_figures"]["agreement_with_reference"] == 1.0  # fp32: PyTorch's spans
    rec = json.loads((root / "out" / ".work" / "export-fpga-tiny" / "edgetune.json").read_text())["results"]
    assert rec["pow2"]["check"]["ok"] and rec["sequence_length"] == 128


def test_qa_build_bundle_answers_and_a_second_build_skips_everything(qa_build, capsys):
    root, recs, _ = qa_build
    long = recs[-1]
    code, out, err = run_cli(["run", str(root / "out" / "cpu-x86"), "-Q", long["question"], "-c", long["context"], "--json", "--quiet"], capsys)
    assert code == 0, err
    x = json.loads(out)["results"][0]
    assert x["answer"] and long["context"][x["start"]:x["end"]] == x["answer"] and 0 < x["score"] <= 1
    assert _build(root / "build.toml")["skipped_all"]


def test_ner_build_bundles_a_tagger_with_entity_f1(tmp_path, capsys):
    from tiny_models import build_tiny_bert_ner

    base = build_tiny_bert_ner(tmp_path / "model")
    rows = [{"tokens": ["anna", "smith", "lives", "in", "paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
            {"tokens": ["we", "flew", "to", "new", "york"], "tags": ["O", "O", "O", "B-LOC", "I-LOC"]},
            {"tokens": ["peter", "met", "maria", "today"], "tags": ["B-PER", "O", "B-PER", "O"]}]
    held = [{"tokens": ["helen", "moved", "to", "oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]},
            {"tokens": ["the", "office", "in", "rome", "is", "closed"], "tags": ["O", "O", "O", "B-LOC", "O", "O"]}]
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows * 8 + held))
    (tmp_path / "build.toml").write_text(NER_CONFIG.format(base=base))
    r = _build(tmp_path / "build.toml")
    assert r["passed"] and r["validation_data"]["examples"] == 2
    fig = r["targets"][0]["accuracy_figures"]
    assert {"entity_f1", "reference_entity_f1", "entity_f1_vs_reference"} <= set(fig) and fig["agreement_with_reference"] == 1.0
    assert json.loads((tmp_path / "out" / "cpu-x86" / "manifest.json").read_text())["task"] == "token-classification"
    code, out, err = run_cli(["run", str(tmp_path / "out" / "cpu-x86"), "-x", "helen moved to oslo", "--json", "--quiet"], capsys)
    assert code == 0, err
    res = json.loads(out)["results"][0]
    assert res["text"] == "helen moved to oslo" and isinstance(res["entities"], list)
