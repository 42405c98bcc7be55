"""Task accuracy (gold answers) in validation: metrics, the gate, failing examples listed."""

from __future__ import annotations

import json
import shutil

import pytest

from edgetune.cli import main
from edgetune.device import metrics as M

from test_validate import genai_export, scaled_weights_export


# ---------------------------------------------------------------- metric functions

def test_json_exact_match_ignores_key_order_and_number_form():
    gold = '{"device":"light","room":"office","action":"dim","level":45}'
    assert M.exact_match(gold, '{"level": 45.0, "action": "dim", "room": "office", "device": "light"}')
    assert M.exact_match(gold, '  {"device":"light","room":"office","action":"dim","level":45}\n')
    assert not M.exact_match(gold, '{"device":"light","room":"office","action":"dim","level":46}')
    assert not M.exact_match(gold, '{"device":"light","room":"office","action":"dim"}')  # a key missing
    assert not M.exact_match(gold, '{"device":"light","room":"office","action":"dim","level":"45"}')  # string is not a number
    assert not M.exact_match(gold, 'device light')  # not JSON
    assert M.json_equal([1, {"a": True}], [1.0, {"a": True}]) and not M.json_equal([1, 2], [2, 1])
    assert not M.json_equal(True, 1) and not M.json_equal(0, False)  # booleans are not numbers


def test_free_text_exact_match_normalizes_whitespace_only():
    assert M.exact_match("Paris is  the capital", " Paris is the\ncapital ")
    assert not M.exact_match("Paris", "paris")
    assert M.valid_format("Paris", "x") is None
    assert M.valid_format('{"a":1}', '{"a":') is False and M.valid_format('{"a":1}', '{"b":2}') is True


def test_token_f1():
    assert M.token_f1("the cat sat", "the cat sat") == 1.0
    assert M.token_f1("the cat sat", "dog") == 0.0
    assert M.token_f1("the cat sat on the mat", "the cat") == pytest.approx(2 * 1.0 * (2 / 6) / (1 + 2 / 6))
    assert M.token_f1("", "") == 1.0 and M.token_f1("a", "") == 0.0


def test_task_scores_primary_metric():
    s = M.task_scores(['{"a":1}', '{"a":2}'], ['{"a":1.0}', 'nope'])
    assert s["metric"] == "exact_match" and s["task_accuracy"] == 50.0 and s["valid_format"] == 50.0
    t = M.task_scores(["red green blue", "yes"], ["red green", "yes"])
    assert t["metric"] == "token_f1" and t["exact_match"] == 50.0 and t["valid_format"] is None
    assert t["task_accuracy"] == pytest.approx(100 * (0.8 + 1.0) / 2)


# ---------------------------------------------------------------- the gate on a tiny model

def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


PROMPTS = ["The lazy dog", "Turn on the kitchen", "Edge devices run", "The quick brown",
           "Hello world! Numbers", "Turn on the lights and set the"]
CAP = 12  # new tokens per answer: a random model never stops, so the gold is its answer at this cap


@pytest.fixture(scope="module")
def task_work(module_tmp, tiny_llama):
    """Gold answers = the tiny model's own greedy answers (so a faithful export 'answers the gold'),
    as prompt/completion pairs. The answer cap is fixed (it normally grows with the gold's length)."""
    from edgetune.data import load_dataset, task_examples
    from edgetune.validate.reference import task_answers

    root = module_tmp("task")
    recs = [{"prompt": p, "completion": "x"} for p in PROMPTS]
    (root / "draft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("edgetune.validate.reference.answer_cap", lambda n: CAP)
        got = task_answers(tiny_llama, task_examples(load_dataset(root / "draft.jsonl")))
    for r, a in zip(recs, got["answers"]):
        r["completion"] = a
    (root / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fp32 = genai_export(tiny_llama, root / "fp32")
    return root, fp32


def test_model_that_answers_the_gold_passes(task_work, tiny_llama, monkeypatch):
    from edgetune.validate import validate

    root, fp32 = task_work
    monkeypatch.setattr("edgetune.validate.reference.answer_cap", lambda n: CAP)
    r = validate(fp32, target="cpu-x86", reference=tiny_llama, data=root / "gold.jsonl", out=root / "rep", latency=False,
                 window=64, eval_tokens=128)
    t, acc = r["task"], r["accuracy"]
    assert r["passed"], r["failed"]
    assert t["metric"] == "token_f1" and t["examples"] == len(PROMPTS)  # free-text golds: token F1 is the primary figure
    assert t["reference"]["exact_match"] == 100.0 and t["model"]["exact_match"] == 100.0 and t["drop"] == 0.0
    assert t["prompt_mismatches"] == 0 and acc["task_answer_agreement"] == 1.0 and t["failing_examples"] == []
    assert {"task_accuracy_drop", "task_accuracy"} <= {c["name"] for c in r["checks"]}
    pack = json.loads((root / "rep" / "reference" / "reference.json").read_text())
    assert [e["answer"] for e in pack["task"]["examples"]] == [e["gold"] for e in pack["task"]["examples"]]
    assert "## Task accuracy" in (root / "rep" / "report.md").read_text()


def test_reference_with_other_answers_fails_and_lists_examples(task_work, tmp_path, capsys):
    """A stored pack whose gold and reference answers were both replaced (JSON the model never
    says): the reference scores 100 %, the model 0 %: exit 1, the failing examples listed."""
    root, fp32 = task_work
    pack = root / "rep" / "reference"
    if not pack.exists():
        pytest.skip("needs the pack of the previous test")
    bad = tmp_path / "pack"
    shutil.copytree(pack, bad)
    meta = json.loads((bad / "reference.json").read_text())
    for i, e in enumerate(meta["task"]["examples"]):
        e["gold"] = e["answer"] = '{"answer": %d, "text": "scrambled"}' % i  # JSON gold the model never says
    (bad / "reference.json").write_text(json.dumps(meta))
    code, out, err = run_cli(["validate", str(fp32), "-t", "cpu-x86", "-r", str(bad), "--no-latency", "-o", str(tmp_path / "rep")], capsys)
    assert code == 1 and "task_accuracy_drop" in err
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    t = r["task"]
    assert t["metric"] == "exact_match" and t["reference"]["exact_match"] == 100.0 and t["model"]["exact_match"] == 0.0
    assert t["drop"] == 100.0 and t["model"]["valid_format"] < 100.0
    assert {"task_accuracy_drop", "task_accuracy"} <= set(r["failed"])
    f = t["failing_examples"]
    assert len(f) == 5 and f[0]["index"] == 0 and f[0]["prompt"] == PROMPTS[0] and f[0]["reference_correct"] and not f[0]["model_correct"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "failing examples" in md and "scrambled" in md and PROMPTS[0][:20] in md


def test_perturbed_weights_fail_the_task_check(task_work, tiny_llama, tmp_path, capsys):
    root, _ = task_work
    broken = scaled_weights_export(tiny_llama, tmp_path, 3)
    code, out, err = run_cli(["validate", str(broken), "-t", "cpu-x86", "-r", str(root / "rep" / "reference"), "--no-latency",
                              "-o", str(tmp_path / "rep")], capsys)
    assert code == 1 and "task_accuracy_drop" in err
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert r["task"]["drop"] > 2 and r["task"]["failing_examples"]
