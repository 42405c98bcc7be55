"""The device tokenizer (onnxruntime-genai) encodes like transformers, or the export refuses in seconds (exit 2).

onnxruntime-genai 0.18's ``Tokenizer.encode`` adds no special tokens unless told, while transformers' ``encode``
adds what the post-processor says (Gemma: a BOS). The device asks for them on plain text and leaves them out
on chat-template text (the template writes its BOS itself), like transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import json

import pytest

from edgetune.errors import BadInput
from tiny_models import build_bpe_tokenizer, build_unigram_tokenizer

pytest.importorskip("onnxruntime_genai")


def _bos_tokenizer(out):
    """A BPE tokenizer whose post-processor adds a BOS (like Gemma's)."""
    from tokenizers import Tokenizer, processors

    build_bpe_tokenizer(out)
    tj = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = tj.token_to_id("<|im_start|>")
    tj.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
                                                      special_tokens=[("<|im_start|>", bos)])
    tj.save(str(out / "tokenizer.json"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return bos


def test_device_adds_the_bos_transformers_adds(tmp_path):
    import onnxruntime_genai as og
    import transformers

    from edgetune.device.llm import tokenize
    from edgetune.tokenizer_parity import check_tokenizer_files

    bos = _bos_tokenizer(tmp_path)
    rec = check_tokenizer_files(tmp_path)  # no config.json yet (as at GGUF import): a minimal genai_config
    assert rec["mismatches"] == 0
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"type": "llama", "vocab_size": 512, "context_length": 64,
                                                                       "bos_token_id": bos, "eos_token_id": 2, "pad_token_id": 2,
                                                                       "decoder": {"filename": "model.onnx"}}}))
    tok = og.Tokenizer(str(tmp_path))
    text = "turn on the lights"
    assert [int(i) for i in tokenize(tok, text)] == ref.encode(text) and ref.encode(text)[0] == bos
    assert [int(i) for i in tokenize(tok, text, special=False)] == ref.encode(text, add_special_tokens=False)


def test_unigram_tokenizer_is_refused_before_any_weight_work(tmp_path):
    from edgetune.tokenizer_parity import check_tokenizer_files

    build_unigram_tokenizer(tmp_path)
    with pytest.raises(BadInput, match="cannot read the Unigram tokenizer.json"):
        check_tokenizer_files(tmp_path)


def test_an_export_onnxruntime_cannot_load_is_edgetunes_bug(tmp_path):
    """A graph edgetune wrote that onnxruntime-genai refuses is exit 4 (a bug to report), not exit 1 (a missed budget,
    which build scripts read as a quality verdict), and its hint no longer sends the user after a builder case that
    edgetune already works around."""
    from edgetune.errors import INTERNAL, UnloadableGraph
    from edgetune.tokenizer_parity import check_tokenizer

    build_bpe_tokenizer(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"type": "llama", "vocab_size": 512, "context_length": 64,
                                                                       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                                                       "decoder": {"filename": "model.onnx", "head_size": 16,
                                                                                   "hidden_size": 64, "num_attention_heads": 4,
                                                                                   "num_hidden_layers": 1, "num_key_value_heads": 4}}}))
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(UnloadableGraph, match="the export does not load in onnxruntime-genai") as exc:
        check_tokenizer(tmp_path, tmp_path)
    assert exc.value.exit_code == INTERNAL and "please report it" in exc.value.hint and "--int4-symmetric" not in exc.value.hint
