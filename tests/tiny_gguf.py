"""Tiny GGUF files written with the `gguf` package: a 2-layer Llama whose tensors use the GGML types
edgetune transcodes (and, on request, one it refuses), loadable by transformers' GGUF loader.

Types gguf-py can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are made from random float weights with
``gguf.quants.quantize``; the K-quants (Q4_K, Q5_K, Q6_K) and refused types (Q2_K) are random raw
blocks of the right byte layout with small finite fp16 super-block scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# layer -> module -> GGML type; layer 0 mixes types inside the packed q/k/v MatMul
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q5_0", "ffn_down": "Q5_1"},
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q8_0", "ffn_gate": "F16", "ffn_up": "F32", "ffn_down": "Q4_K"},
]


def _raw_blocks(rng, type_name: str, rows: int, cols: int) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    nb = rows * cols // bs
    b = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    f16 = lambda lo, hi: rng.uniform(lo, hi, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)  # noqa: E731
    if type_name in ("Q4_K", "Q5_K"):
        b[:, 0:2], b[:, 2:4] = f16(2e-4, 6e-4), f16(2e-4, 6e-4)
    elif type_name == "Q6_K":
        b[:, 208:210] = f16(2e-4, 6e-4)
    elif type_name == "Q2_K":
        b[:, 80:82], b[:, 82:84] = f16(1e-3, 3e-3), f16(1e-3, 3e-3)
    else:
        raise ValueError(type_name)
    return b.reshape(rows, -1)


def tensor_data(rng, type_name: str, w: np.ndarray):
    """(data, raw_dtype) for GGUFWriter.add_tensor of a float [rows, cols] weight in ``type_name``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return w.astype(np.float32), None
    if type_name == "F16":
        return w.astype(np.float16), None
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return quantize(w.astype(np.float32), t), t
    return _raw_blocks(rng, type_name, *w.shape), t


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _writer(path: Path, arch: str, tokenizer_dir: Path, extra_tokens: tuple[str, ...] = (), *, name: str | None = None,
            rope_dims: int = HIDDEN // HEADS):
    """A GGUFWriter with the shared hyper-parameters and the vocabulary of ``tokenizer_dir`` (a ByteLevel
    BPE; ``extra_tokens`` appended as special tokens); returns (writer, vocabulary size)."""
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    specials = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    for t in extra_tokens:
        if t not in vocab:
            specials[t] = len(tokens)
            tokens.append(t)
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"tiny-{arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(rope_dims)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_pad_token_id(specials["<|im_end|>"])
    w.add_unk_token_id(specials["<|endoftext|>"])
    w.add_add_bos_token(False)
    return w, n_vocab


def _finish(w, path: Path) -> Path:
    """The final norm, then header, metadata and tensors written out."""
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _adder(w, rng):
    """``add(name, type, shape, scale=0.05, n_head=None)``: a random tensor written in a GGUF type as llama.cpp stores
    it (``n_head``: q/k rows permuted as llama.cpp's llama converter permutes them)."""

    def add(name: str, type_name: str, shape: tuple[int, int], scale: float = 0.05, n_head: int | None = None):
        x = rng.standard_normal(shape).astype(np.float32) * scale
        if n_head:
            x = _permute(x, n_head)
        data, raw = tensor_data(rng, type_name, x)
        w.add_tensor(name, data, raw_dtype=raw)

    return add


def write_tiny_llama_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0, embedding_type: str = "Q4_1",
                          override: dict[str, str] | None = None) -> Path:
    """A tied-embedding 2-layer Llama GGUF with the tokenizer of ``tokenizer_dir`` (a ByteLevel BPE)."""
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "llama", tokenizer_dir)

    add = _adder(w, rng)

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", embedding_type, (n_vocab, HIDDEN), 0.5)
    for i, types in enumerate(LAYER_TYPES):
        types = {**types, **(override or {})}
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", types["attn_q"], (HIDDEN, HIDDEN), n_head=HEADS)
        add(f"blk.{i}.attn_k.weight", types["attn_k"], (KV_HEADS * head_dim, HIDDEN), n_head=KV_HEADS)
        add(f"blk.{i}.attn_v.weight", types["attn_v"], (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", types["attn_output"], (HIDDEN, HIDDEN))
        add(f"blk.{i}.ffn_gate.weight", types["ffn_gate"], (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", types["ffn_up"], (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", types["ffn_down"], (HIDDEN, FFN))
    return _finish(w, path)


# the special tokens transformers' GGUF Phi-3 tokenizer converter adds: in the vocabulary, so their ids stay inside it
PHI3_SPECIALS = ("</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                 "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


def write_tiny_phi3_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0, qkv_type: str = "Q4_K",
                         gate_up_type: str = "Q5_0") -> Path:
    """A 2-layer Phi-3 GGUF as llama.cpp's converter writes one: q/k/v fused in ``attn_qkv``, gate/up in
    ``ffn_up`` (gate rows first), an untied ``output`` head; head_dim 64, GQA 4:2."""
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "phi3", tokenizer_dir, PHI3_SPECIALS)
    head_dim = HIDDEN // HEADS

    add = _adder(w, rng)

    add("token_embd.weight", "Q8_0", (n_vocab, HIDDEN), 0.5)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(f"blk.{i}.attn_qkv.weight", qkv_type, (HIDDEN + 2 * KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", "Q4_0", (HIDDEN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", gate_up_type, (2 * FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", "Q6_K", (HIDDEN, FFN))
    add("output.weight", "Q8_0", (n_vocab, HIDDEN))
    return _finish(w, path)


def write_tiny_qwen3_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0, head_dim: int = 128) -> Path:
    """A 2-layer Qwen3 GGUF whose head_dim (``attention.key_length``) is not hidden / heads, with q/k norms."""
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "qwen3", tokenizer_dir)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)

    add = _adder(w, rng)

    add("token_embd.weight", "Q8_0", (n_vocab, HIDDEN), 0.5)
    for i in range(LAYERS):
        for norm, width in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", head_dim), ("attn_k_norm", head_dim)):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", "Q4_0", (HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_k.weight", "Q4_0", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_v.weight", "Q4_0", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", "Q4_0", (HIDDEN, HEADS * head_dim))
        add(f"blk.{i}.ffn_gate.weight", "Q4_0", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", "Q4_0", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", "Q4_0", (HIDDEN, FFN))
    return _finish(w, path)


def write_tiny_mistral_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0, head_dim: int = 128,
                            name: str = "Mistral Nemo Instruct 2407") -> Path:
    """A 2-layer Mistral GGUF as llama.cpp's converter writes one: ``MistralForCausalLM`` is registered on its
    ``LlamaModel``, so the architecture is ``llama`` (q/k rows permuted, no sliding window) with an untied
    ``output`` head, and head_dim (``rope.dimension_count`` / ``attention.key_length``) 128 != hidden / heads,
    as Mistral-Nemo's (5120 / 32 = 160, head_dim 128)."""
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "llama", tokenizer_dir, name=name, rope_dims=head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)

    add = _adder(w, rng)

    add("token_embd.weight", "Q4_K", (n_vocab, HIDDEN), 0.5)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", "Q4_K", (HEADS * head_dim, HIDDEN), n_head=HEADS)
        add(f"blk.{i}.attn_k.weight", "Q4_K", (KV_HEADS * head_dim, HIDDEN), n_head=KV_HEADS)
        add(f"blk.{i}.attn_v.weight", "Q6_K", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", "Q4_K", (HIDDEN, HEADS * head_dim))
        add(f"blk.{i}.ffn_gate.weight", "Q4_K", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", "Q4_K", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", "Q6_K", (HIDDEN, FFN))
    add("output.weight", "Q6_K", (n_vocab, HIDDEN))
    return _finish(w, path)


def write_tiny_qwen2_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer Qwen2 GGUF as llama.cpp's converter writes one: q/k/v with F32 biases (``attn_q.bias`` ...),
    no q/k permutation, a tied head (Qwen2.5-0.5B / 1.5B); head_dim 64, GQA 4:2."""
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "qwen2", tokenizer_dir)
    head_dim = HIDDEN // HEADS

    add = _adder(w, rng)

    add("token_embd.weight", "Q8_0", (n_vocab, HIDDEN), 0.5)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        for proj, rows in (("q", HEADS * head_dim), ("k", KV_HEADS * head_dim), ("v", KV_HEADS * head_dim)):
            add(f"blk.{i}.attn_{proj}.weight", "Q5_0" if proj == "v" else "Q4_K", (rows, HIDDEN))
            w.add_tensor(f"blk.{i}.attn_{proj}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
        add(f"blk.{i}.attn_output.weight", "Q4_0", (HIDDEN, HIDDEN))
        add(f"blk.{i}.ffn_gate.weight", "Q4_1", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", "Q4_1", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", "Q6_K", (HIDDEN, FFN))
    return _finish(w, path)


def write_tiny_phi4_mini_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0, rotary: float = 0.75) -> Path:
    """A 2-layer Phi-4-mini-layout GGUF as llama.cpp's converter writes one (``Phi3MiniModel``, since its
    Phi-4-mini support): architecture ``phi3`` with fused ``attn_qkv`` / ``ffn_up``, a GPT-2 BPE vocabulary,
    a tied head (no ``output``), ``rope.dimension_count`` the rotary part of head_dim only (partial rotary:
    ``int(0.75 * hidden) // heads``), LongRoPE as ``rope_factors_long`` / ``rope_factors_short`` tensors of
    rope_dims / 2 factors with ``rope.scaling.original_context_length`` and ``rope.scaling.attn_factor``, and
    ``attention.sliding_window`` 0 (what tells Phi-4 from Phi-3 there)."""
    import math

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    rope_dims = int(rotary * HIDDEN) // HEADS
    ctx, orig_ctx = 512, 256
    w, n_vocab = _writer(path, "phi3", tokenizer_dir, name="Phi 4 Mini Instruct", rope_dims=rope_dims)
    w.add_rope_scaling_orig_ctx_len(orig_ctx)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(ctx / orig_ctx) / math.log(orig_ctx)))
    w.add_sliding_window(0)

    add = _adder(w, rng)

    add("token_embd.weight", "Q8_0", (n_vocab, HIDDEN), 0.5)
    w.add_tensor("rope_factors_long.weight", np.array([2.0 + i / rope_dims for i in range(rope_dims // 2)], np.float32))
    w.add_tensor("rope_factors_short.weight", np.array([1.0 + i / (2 * rope_dims) for i in range(rope_dims // 2)], np.float32))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(f"blk.{i}.attn_qkv.weight", "Q4_K", (HIDDEN + 2 * KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", "Q4_0", (HIDDEN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", "Q5_0", (2 * FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", "Q6_K", (HIDDEN, FFN))
    return _finish(w, path)


# Llama 3.2's rope scaling (rope_type llama3: factor 32, low/high_freq_factor 1/4), with the original context
# shortened from 8192 to 64 so that a test context of a few hundred tokens (max_position_embeddings 512, the
# tiny GGUFs' context_length) runs far past it: at head_dim 64 and rope_theta 10000, 5 frequencies are smoothed
# and 23 divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama_cpp_rope_freqs(rope_params: dict, base: float, dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for a llama3 rope: ``LlamaModel.generate_extra_tensors``
    of convert_hf_to_gguf.py (llama-cpp-python 0.3.36's vendored llama.cpp, conversion/llama.py), verbatim in
    its float32 torch arithmetic."""
    import math

    import torch

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    factor = rope_params.get("factor", 8.0)
    low_freq_factor = rope_params.get("low_freq_factor", 1.0)
    high_freq_factor = rope_params.get("high_freq_factor", 4.0)
    old_context_len = rope_params.get("original_max_position_embeddings", 8192)

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


LLAMA3_TYPES = {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q5_0", "attn_output": "Q4_1", "ffn_gate": "Q8_0", "ffn_up": "Q5_1",
                "ffn_down": "Q4_0"}


def write_tiny_llama3_gguf(path: Path, source: Path, *, seed: int = 0, rope: dict | None = LLAMA3_ROPE) -> Path:
    """A 2-layer Llama 3.2-layout model as an HF folder ``source`` (its tokenizer, config and safetensors: the
    model the GGUF came from) and the GGUF llama.cpp's converter makes of it at ``path``: tied head, head_dim 64,
    GQA 4:2, q/k rows permuted, ``rope.freq_base`` and context length from the config, and for a llama3 rope
    (``rope``) the ``rope_freqs`` tensor and nothing else about it (no rope.scaling.* key). The linears are
    quantized (types gguf-py can quantize: LLAMA3_TYPES, Q8_0 embedding) and the source model holds their
    dequantized values, so it is exactly the model the GGUF stores. ``rope=None``: no rope scaling (SmolLM2)."""
    import gguf
    import torch
    import transformers
    from gguf.quants import dequantize, quantize

    from tiny_models import build_bpe_tokenizer

    source.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer(source)
    head_dim = HIDDEN // HEADS
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=head_dim, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(seed)
    w, n_vocab = _writer(path, "llama", source, name="Llama 3.2 1B Instruct" if rope else "SmolLM2 135M Instruct")
    assert n_vocab == cfg.vocab_size

    def add(name: str, param, type_name: str, n_head: int | None = None, scale: float = 0.05):
        x = rng.standard_normal(tuple(param.shape)).astype(np.float32) * scale
        t = gguf.GGMLQuantizationType[type_name]
        q = quantize(x, t)
        deq = dequantize(q, t).reshape(x.shape)
        if n_head:  # quantized along the rows' input dimension: permuting rows commutes with it
            q = quantize(_permute(x, n_head), t)
            assert np.array_equal(dequantize(q, t).reshape(x.shape), _permute(deq, n_head))
        with torch.no_grad():
            param.copy_(torch.from_numpy(deq))
        w.add_tensor(name, q, raw_dtype=t)

    def norm(name: str, param):
        x = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        with torch.no_grad():
            param.copy_(torch.from_numpy(x))
        w.add_tensor(name, x)

    add("token_embd.weight", model.model.embed_tokens.weight, "Q8_0", scale=0.5)
    if rope:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(rope, 10000.0, head_dim))
    for i, layer in enumerate(model.model.layers):
        types = LLAMA3_TYPES
        norm(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        norm(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        a, m = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_q.weight", a.q_proj.weight, types["attn_q"], n_head=HEADS)
        add(f"blk.{i}.attn_k.weight", a.k_proj.weight, types["attn_k"], n_head=KV_HEADS)
        add(f"blk.{i}.attn_v.weight", a.v_proj.weight, types["attn_v"])
        add(f"blk.{i}.attn_output.weight", a.o_proj.weight, types["attn_output"])
        add(f"blk.{i}.ffn_gate.weight", m.gate_proj.weight, types["ffn_gate"])
        add(f"blk.{i}.ffn_up.weight", m.up_proj.weight, types["ffn_up"])
        add(f"blk.{i}.ffn_down.weight", m.down_proj.weight, types["ffn_down"])
    assert torch.equal(model.model.norm.weight, torch.ones(HIDDEN))  # _finish writes output_norm as ones
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(source, safe_serialization=True)
    return _finish(w, path)
