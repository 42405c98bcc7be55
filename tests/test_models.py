"""Model inputs: HF folders, GGUF import and tokenizer normalization, refusals."""

from __future__ import annotations

import json

import pytest

from edgetune.errors import BadInput
from edgetune.model_input import inspect, materialize, normalize_tokenizer


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


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_a_bf16_checkpoint_is_its_fp32_model_bit_for_bit_at_half_the_memory(family, tmp_path):
    """The reference behind the export's graph proof and validate: a bf16 checkpoint keeps its bf16 weights and
    computes in fp32 module by module (a 3.8B model: 7.9 GB, not 15.7); the logits are the full fp32 load's exactly.
    Gemma's embedding scale is a buffer made in the stored dtype: it falls back to the full fp32 load."""
    import torch
    import transformers

    from edgetune.model_input import load_causal_lm
    from test_families import build_family

    src = build_family(family, tmp_path / "src")
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    lean = load_causal_lm(tmp_path / "bf16").eval()
    assert next(lean.parameters()).dtype == (torch.float32 if family == "gemma2" else torch.bfloat16)
    ids = torch.randint(0, full.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = full(input_ids=ids).logits, lean(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert next(lean.parameters()).dtype == next(iter(lean.state_dict().values())).dtype  # the stored weights are back
