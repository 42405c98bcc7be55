"""Model inputs: HF folders, GGUF import and tokenizer normalization, refusals."""

from __future__ import annotations

import json

import pytest

from edgetune.errors import BadInput
from edgetune.models import inspect, materialize, normalize_tokenizer


def test_tiny_models_are_recognized(tiny_llama, tiny_phi3, tiny_bert):
    assert inspect(tiny_llama).kind == "decoder"
    assert inspect(tiny_phi3).model_type == "phi3"
    assert inspect(tiny_bert).kind == "encoder"


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(BadInput, match="safetensors only"):
        inspect(tmp_path)


def test_unsupported_architecture_names_supported(tmp_path, tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    with pytest.raises(BadInput) as e:
        inspect(tmp_path)
    assert "mamba" in str(e.value) and "llama" in str(e.value) and e.value.exit_code == 2


def test_missing_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        materialize(tmp_path / "nope")


def test_normalize_tokenizer_fixes_gguf_style_json(tmp_path, tiny_llama):
    """Reproduce what transformers writes for a GGUF BPE tokenizer, then normalize it."""
    from tokenizers import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).is_file():  # transformers 5 no longer writes special_tokens_map.json
            (tmp_path / name).write_text((tiny_llama / name).read_text())
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|im_start|>", add_bos_token=True, tokenizer_class="LlamaTokenizer")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))

    broken = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "héllo wörld 🙂"
    assert broken.decode(broken.encode(text).ids) != text  # the SP-style decoder mangles it

    eos_id = Tokenizer.from_file(str(tiny_llama / "tokenizer.json")).token_to_id("<|im_end|>")
    changed = normalize_tokenizer(tmp_path, special={"eos_token_id": eos_id, "add_bos_token": False})
    assert any("byte_fallback" in c for c in changed) and any("eos_token" in c for c in changed)
    fixed = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert fixed.decode(fixed.encode(text).ids) == text
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is False


@pytest.mark.slow
def test_smollm2_gguf_materializes_with_clean_tokenizer(smollm2_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    info = inspect(smollm2_dir)
    assert info.model_type == "llama" and info.config["eos_token_id"] == 2
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert hf.eos_token == "<|im_end|>"
    for s in ["What is the capital of France?", "  héllo wörld 你好 🙂\n\ttabs", "<|im_start|>user\nHi<|im_end|>\n"]:
        ids = hf(s)["input_ids"]
        assert ids == raw.encode(s).ids and -1 not in ids
        assert hf.decode(ids) == s
