"""Fast fine-tuning tests on the tiny random models (seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import cli, main
from edgetune.errors import BadInput
from edgetune.finetune import FinetuneOptions, finetune, work_dir
from edgetune.finetune.features import IGNORE, causal_features
from edgetune.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "data" / "smarthome_train.jsonl"


def _opts(**kw) -> FinetuneOptions:
    base = dict(max_steps=10, save_steps=5, batch_size=4, max_seq_len=96, lr=3e-3, limit=60, seed=0)
    base.update(kw)
    return FinetuneOptions(**base)


def _results(out: Path) -> dict:
    return json.loads((out / "edgetune.json").read_text())["results"]


def _adapter_tensors(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_chat_adapter_learns_and_is_complete(tiny_llama, tmp_path, method):
    out = finetune(tiny_llama, CHAT, tmp_path / "adapter", options=_opts(method=method))
    r = _results(out)
    assert r["global_step"] == 10 and r["task"] == "causal-lm"
    assert r["last_loss"] < r["first_loss"]
    assert r["eval_loss"] < r["base_eval_loss"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss_curve.json", "loss_curve.png", "finetune_config.json", "eval_metrics.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickles shipped
    tensors = _adapter_tensors(out)
    assert any("lora_B" in k and abs(v).sum() > 0 for k, v in tensors.items())  # B moved away from zero
    if method == "dora":
        assert any("lora_magnitude_vector" in k for k in tensors)
        assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [p["step"] for p in curve] == list(range(1, 11))
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "edgetune.json").read_text())
    assert set(rec["inputs"]) == {"model", "data"} and rec["options"]["method"] == method
    assert not work_dir(out).exists()


def test_qlora_on_cpu(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = finetune(tiny_llama, CHAT, tmp_path / "q", options=_opts(method="qlora"))
    r = _results(out)
    assert r["eval_loss"] < r["base_eval_loss"] and r["last_loss"] < r["first_loss"]
    cfg = json.loads((out / "finetune_config.json").read_text())["options"]
    assert cfg["quant_type"] == "nf4" and cfg["double_quant"] is True


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_other_peft_methods_train(tiny_llama, tmp_path, method):
    out = finetune(tiny_llama, CHAT, tmp_path / method, options=_opts(method=method, max_steps=6, lr=1e-2))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == method.upper()
    assert _results(out)["eval_loss"] < _results(out)["base_eval_loss"]


def test_loss_on_answer_only_masks_the_prompt(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ds = load_dataset(CHAT, limit=3)
    feats = causal_features(tok, ds, max_seq_len=512, loss_on_answer_only=True, packing=False)
    for f, rec in zip(feats, ds.records):
        learned = tok.decode([t for t, l in zip(f["input_ids"], f["labels"]) if l != IGNORE])
        assert learned.startswith(rec["messages"][-1]["content"]) and "<|im_end|>" in learned
        assert "smart home" not in learned  # the system prompt is not learned
    full = causal_features(tok, ds, max_seq_len=512, loss_on_answer_only=False, packing=False)
    assert all(IGNORE not in f["labels"] for f in full)
    packed = causal_features(tok, ds, max_seq_len=32, loss_on_answer_only=False, packing=True)
    assert all(len(f["input_ids"]) <= 32 for f in packed) and len(packed[0]["input_ids"]) == 32


def test_sequence_classifier_saves_head(tiny_bert, tmp_path):
    data = tmp_path / "cls.jsonl"
    with open(data, "w") as f:
        for i in range(80):
            label = "on" if i % 2 else "off"
            f.write(json.dumps({"text": f"turn the lights {label} please", "label": label}) + "\n")
    # 30 steps at batch 4 left the random tiny BERT at chance on some runs (eval loss ~0.69): train until it has learned
    out = finetune(tiny_bert, data, tmp_path / "cls", options=_opts(max_steps=60, batch_size=8, lr=1e-2, save_steps=100, limit=None, eval_fraction=0.2))
    r = _results(out)
    assert r["task"] == "seq-cls" and r["label_names"] == ["off", "on"]
    assert r["eval_accuracy"] == 1.0 and r["eval_loss"] < 0.2
    keys = _adapter_tensors(out)
    assert any("classifier" in k for k in keys)  # the new head is saved (modules_to_save)


def test_token_classifier(tiny_bert, tmp_path):
    data = tmp_path / "ner.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            room = ["kitchen", "office"][i % 2]
            f.write(json.dumps({"tokens": ["turn", "on", "the", room, "lights"], "tags": ["O", "O", "O", "B-ROOM", "O"]}) + "\n")
    out = finetune(tiny_bert, data, tmp_path / "ner", options=_opts(max_steps=25, lr=1e-2, limit=None, eval_fraction=0.2))
    r = _results(out)
    assert r["task"] == "token-cls" and r["eval_accuracy"] > 0.9


def test_bad_options_and_data(tiny_llama, tmp_path):
    with pytest.raises(BadInput, match="unknown method"):
        finetune(tiny_llama, CHAT, tmp_path / "x", options=FinetuneOptions(method="bogus"))
    with pytest.raises(BadInput, match="needs --deepspeed"):
        finetune(tiny_llama, CHAT, tmp_path / "x", options=FinetuneOptions(num_processes=2))
    with pytest.raises(BadInput, match="nothing to resume"):
        finetune(tiny_llama, CHAT, tmp_path / "x", options=_opts(), resume=True)
    assert not (tmp_path / "x").exists()


def test_cli_malformed_line_exits_2(tiny_llama, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(CHAT.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(SystemExit) as exc:
        main(["finetune", str(tiny_llama), str(data), "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_json_result(tiny_llama, tmp_path):
    res = CliRunner().invoke(cli, ["finetune", str(tiny_llama), str(CHAT), "-o", str(tmp_path / "o"), "--max-steps", "3", "--limit", "20", "--max-seq-len", "192", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["global_step"] == 3 and Path(result["out"]).is_dir()


def test_resume_after_kill_9(tiny_llama, tmp_path):
    """Start a run, SIGKILL it after its first checkpoint, resume, and finish at the right step."""
    out = tmp_path / "run"
    args = [str(tiny_llama), str(CHAT), "-o", str(out), "--max-steps", "40", "--save-steps", "4", "--limit", "80", "--max-seq-len", "96", "--lr", "3e-3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "finetune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpts = work_dir(out) / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = [p for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if ckpts.exists() else []
            if done:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before a checkpoint: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # nothing half-written
    res = CliRunner().invoke(cli, ["finetune", *args, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["global_step"] == 40
    assert r["resumed_from_step"] >= 4 and r["resumed_from_step"] % 4 == 0
    curve = json.loads((out / "loss_curve.json").read_text())
    assert curve[-1]["step"] == 40 and curve[0]["step"] == 1  # history carried over from the checkpoint


def test_deepspeed_presets_and_user_config(tmp_path):
    from edgetune.finetune.deepspeed import resolve_config

    z2, z3, off = resolve_config("zero2"), resolve_config("zero3"), resolve_config("offload")
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # complete adapter on save
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z2["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it from --batch-size
    for name in ("zero2", "zero3", "offload"):  # the shipped examples are what the presets generate
        assert json.loads((ROOT / "examples" / "deepspeed" / f"{name}.json").read_text()) == resolve_config(name)
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 8}')
    with pytest.raises(BadInput, match="zero_optimization"):
        resolve_config(str(bad))
    with pytest.raises(BadInput, match="neither a preset nor a file"):
        FinetuneOptions(deepspeed="zero9").check()
    with pytest.raises(BadInput, match="cannot be combined"):
        FinetuneOptions(method="qlora", deepspeed="zero2").check()


def test_cli_config_file_and_flags(tiny_llama, tmp_path):
    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"options": {"max_steps": 2, "limit": 16, "max_seq_len": 192, "rank": 4}}))
    res = CliRunner().invoke(cli, ["finetune", str(tiny_llama), str(CHAT), "-o", str(tmp_path / "o"), "--config", str(cfg), "--rank", "2", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["global_step"] == 2
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 2  # the flag wins over the file


def test_a_failed_multi_process_run_names_its_cause_not_torchruns_banner():
    """torchrun ends a failed run with a summary banner; the one-line error showed its last line ('=====...') and the
    cause was lost (a CI run failed that way). The cause is the worker's last '...Error: ...' line."""
    from edgetune.finetune.deepspeed import failure_cause

    out = "\n".join([
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "worker.py", line 9, in <module>',
        "[rank1]: RuntimeError: The server socket has failed to listen on any local network address.",
        "E1206 17:40:01 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 1) local_rank: 1",
        "Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "edgetune.finetune.worker FAILED",
        "------------------------------------------------------------",
        "Root Cause (first observed failure):",
        "============================================================",
    ])
    assert failure_cause(out) == "[rank1]: RuntimeError: The server socket has failed to listen on any local network address."
    assert failure_cause("killed\n=====\n-----\n") == "killed"
    assert failure_cause("=====\n") is None


def test_the_data_is_checked_before_the_model_is_imported(tmp_path, monkeypatch):
    """A missing or malformed data file fails at once: before the (half-minute) import of a GGUF model. The model
    here is a damaged GGUF, so reaching the import at all would fail on the model instead."""
    import edgetune.finetune.train as train

    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"not a gguf")
    imported = []
    monkeypatch.setattr(train, "materialize", lambda m: imported.append(m) or pytest.fail("the model was imported first"))
    with pytest.raises(BadInput, match="data file not found"):
        finetune(damaged, tmp_path / "missing.jsonl", tmp_path / "out", options=_opts())
    (tmp_path / "eval.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(BadInput, match=r"eval\.jsonl:1"):
        finetune(damaged, tmp_path / "train.jsonl", tmp_path / "out", options=_opts(eval_data=str(tmp_path / "eval.jsonl")))
    assert imported == [] and not (tmp_path / "out").exists()
