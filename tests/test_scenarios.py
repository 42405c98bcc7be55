"""Scenarios a user brings that edgetune refuses up front (exit 2 in seconds, never exit 4 after training).

- classification with a decoder (``--task seq-cls`` / text+label data on a Llama-layout model): its
  classification head does not export to onnxruntime-genai, so `finetune` refuses it and names the chat form;
- chat ('messages') data on a base model without a chat template: `finetune` and `build` refuse it before
  the first training step;
- extractive question answering (SQuAD records) on a decoder: refused at `finetune`, like classification
  (the encoder pipeline for it is tested in tests/test_qa.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edgetune.cli import main
from test_build import TRAIN, write_config


def _cli(args: list[str], capsys) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--json"])
    return exc.value.code, json.loads(capsys.readouterr().out)


def _base_model_without_chat_template(tiny_llama: Path, dest: Path) -> Path:
    shutil.copytree(tiny_llama, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(tc))
    return dest


def test_decoder_classification_is_refused_at_finetune_naming_the_chat_form(tiny_llama, tmp_path, capsys):
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in
                            [("win a prize", "spam"), ("lunch at noon", "ham")] * 4))
    for extra in ([], ["--task", "seq-cls"]):
        t0 = time.perf_counter()
        code, err = _cli(["finetune", str(tiny_llama), str(data), "-o", str(tmp_path / "ad"), "--max-steps", "1", *extra], capsys)
        assert code == 2, err
        assert "seq-cls fine-tuning of a decoder (llama) is not supported" in err["error"]
        assert "chat messages with the label as the assistant's answer" in err["hint"]
        assert time.perf_counter() - t0 < 60 and not (tmp_path / "ad").exists() and not (tmp_path / "ad.work").exists()


def test_chat_data_on_a_base_model_is_refused_before_training(tiny_llama, tmp_path, capsys):
    base = _base_model_without_chat_template(tiny_llama, tmp_path / "base")
    code, err = _cli(["finetune", str(base), str(TRAIN), "-o", str(tmp_path / "ad"), "--max-steps", "1"], capsys)
    assert code == 2 and "has no chat template" in err["error"] and "prompt/completion" in err["hint"], err
    assert not (tmp_path / "ad.work").exists()
    # prompt/completion data on the same base model is accepted by the check
    from edgetune.data import load_dataset
    from edgetune.finetune.train import check_model_and_data
    from edgetune.model_input import inspect

    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Turn on the lights", "completion": " ok"}) + "\n")
    assert check_model_and_data("auto", load_dataset(pc), inspect(base)) == "causal-lm"
    assert check_model_and_data("auto", load_dataset(TRAIN), inspect(tiny_llama)) == "causal-lm"


def test_build_checks_the_model_against_the_data_before_the_first_stage(tiny_llama, tmp_path, capsys):
    """`build` used to find a base model without a chat template only at the finetune stage, minutes in."""
    base = _base_model_without_chat_template(tiny_llama, tmp_path / "base")
    cfg = write_config(tmp_path / "b", base)
    code, err = _cli(["build", str(cfg), "--quiet"], capsys)
    assert code == 2 and "has no chat template" in err["error"], err
    assert not (tmp_path / "b" / "out" / ".work" / "adapter").exists()
    assert not list((tmp_path / "b" / "out" / ".work").glob("adapter*"))


def test_squad_records_are_read_as_question_answering_and_refused_on_a_decoder(tiny_llama, tmp_path, capsys):
    """SQuAD records were refused outright before issue 29; now they are the qa format (tests/test_qa.py has the
    whole pipeline), and a decoder is still refused: its span head would not export to onnxruntime-genai."""
    from edgetune.data import load_dataset

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where?", "context": "In Paris.", "answers": {"text": ["Paris"], "answer_start": [3]}}) + "\n")
    assert load_dataset(qa).format == "qa"
    code, err = _cli(["finetune", str(tiny_llama), str(qa), "-o", str(tmp_path / "ad"), "--max-steps", "1"], capsys)
    assert code == 2 and "qa fine-tuning of a decoder (llama) is not supported" in err["error"], err
    assert "chat messages" in err["hint"] and not (tmp_path / "ad.work").exists()


def test_an_encoder_head_edgetune_does_not_export_is_refused_not_dropped(tiny_bert, tmp_path):
    """A head edgetune has no export for (here masked LM) is refused: exporting the body as feature-extraction would
    drop it silently (a question-answering head was once exported that way and its bundle crashed in run)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from edgetune.export.encoder.pipeline import export_encoder
    from edgetune.errors import BadInput

    src = tmp_path / "mlm"
    shutil.copytree(tiny_bert, src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    cfg = BertConfig.from_pretrained(tiny_bert)
    cfg.architectures = ["BertForMaskedLM"]
    torch.manual_seed(0)
    BertForMaskedLM(cfg).eval().save_pretrained(src, safe_serialization=True)
    with pytest.raises(BadInput, match=r"head \(BertForMaskedLM\) is not one edgetune exports") as exc:
        export_encoder(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    assert "--task feature-extraction" in exc.value.hint and not (tmp_path / "out").exists()
    body = export_encoder(src, tmp_path / "body", target="cpu-x86", precision="fp32", task="feature-extraction")  # on purpose
    assert json.loads((body / "edgetune.json").read_text())["results"]["task"] == "feature-extraction"


def test_a_question_answering_head_is_exported_with_its_span_outputs(tmp_path):
    """Issue 29: the QA head used to be refused here; now it exports as question-answering (start/end logits)."""
    import onnx

    from edgetune.export.encoder.pipeline import export_encoder
    from tiny_models import build_tiny_bert_qa

    src = build_tiny_bert_qa(tmp_path / "qa")
    out = export_encoder(src, tmp_path / "out", target="cpu-x86", precision="fp32")
    assert json.loads((out / "edgetune.json").read_text())["results"]["task"] == "question-answering"
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == ["start_logits", "end_logits"]
