"""Decoder LLMs on the device: an onnxruntime-genai folder, its tokenizer, generation and scoring.

Generation runs through onnxruntime-genai (what `edgetune run` ships). Scoring (logits of every
position, for perplexity/KL) runs the same ``model.onnx`` in a plain onnxruntime session with an
empty KV cache, because the genai generator only exposes the last position's logits.

Runtime LoRA adapters (``<name>.onnx_adapter`` next to the graph, from ``edgetune export --adapter``):
``load(folder, adapter=NAME)`` or ``set_adapter(llm, NAME)`` selects one; generation activates it on
each genai generator (``og.Adapters`` + ``set_active_adapter``), scoring passes it in the run options.
No adapter = the base model (the LoRA inputs default to zero-size tensors).

Device-only imports: onnxruntime, onnxruntime_genai, numpy.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import BadInput, MissingDependency
from .files import check_tokenizer, load_tokenizer, read_json
from .session import create_session, resolve_target

# onnxruntime-genai provider names for our target execution providers (cpu = none appended)
ADAPTER_SUFFIX = ".onnx_adapter"
_OG_PROVIDERS = {"cuda": "cuda", "dml": "dml", "openvino": "OpenVINO", "qnn": "QNN", "vitisai": "VitisAI", "webgpu": "WebGPU", "tensorrt": "NvTensorRtRtx"}


def _og():
    from ..errors import import_or_explain

    # "not installed" only when it is not; a broken install says "installed but cannot be imported: <reason>"
    return import_or_explain("onnxruntime_genai", dist="onnxruntime-genai", hint="pip install onnxruntime-genai")


@dataclass
class LLM:
    """A loaded decoder: ``model``/``tokenizer`` are onnxruntime-genai objects."""

    folder: Path
    model: Any
    tokenizer: Any
    config: dict
    target: Any = None
    load_time_s: float = 0.0
    providers: list[str] = field(default_factory=list)
    adapter: str | None = None  # the active runtime LoRA adapter (None = base model)
    adapter_files: dict[str, Path] = field(default_factory=dict)
    _session: Any = None
    _og_adapters: Any = None
    _og_loaded: set = field(default_factory=set)
    _ort_adapters: dict = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.config["model"].get("eos_token_id")
        return list(eos) if isinstance(eos, list) else [eos]

    @property
    def vocab_size(self) -> int:
        return int(self.config["model"]["vocab_size"])

    @property
    def context_length(self) -> int:
        return int(self.config["model"].get("context_length", 2048))


def find_model_folder(path: str | Path) -> Path:
    """An export folder with genai_config.json, or the model/ folder of a bundle."""
    p = Path(path)
    if (p / "genai_config.json").is_file():
        return p
    if (p / "manifest.json").is_file() and (p / "model" / "genai_config.json").is_file():
        return p / "model"
    raise BadInput(f"{p} is not an onnxruntime-genai model folder (no genai_config.json)", hint="give an `edgetune export` output or a bundle")


def adapter_files(folder: str | Path) -> dict[str, Path]:
    """Runtime LoRA adapters shipped with a model folder: name -> ``<name>.onnx_adapter``."""
    folder = find_model_folder(folder)
    return {p.name[: -len(ADAPTER_SUFFIX)]: p for p in sorted(folder.glob("*" + ADAPTER_SUFFIX)) if p.is_file()}


def set_adapter(llm: LLM, name: str | None) -> None:
    """Make ``name`` the active LoRA adapter of ``llm`` (None: the base model)."""
    if name is None:
        llm.adapter = None
        return
    path = llm.adapter_files.get(name)
    if path is None:
        have = ", ".join(sorted(llm.adapter_files))
        raise BadInput(f"adapter '{name}' is not in {llm.folder}",
                       hint=f"available: {have}" if have else "this model was exported without --adapter (edgetune export BASE --adapter DIR)")
    if name not in llm._og_loaded:
        og = _og()
        if llm._og_adapters is None:
            llm._og_adapters = og.Adapters(llm.model)
        try:
            llm._og_adapters.load(str(path), name)
        except Exception as exc:
            raise BadInput(f"onnxruntime-genai could not load adapter {path.name}: {str(exc).splitlines()[0][:200]}",
                           hint="the adapter does not belong to this model; re-export both together") from exc
        llm._og_loaded.add(name)
    llm.adapter = name


def context_length(folder: str | Path) -> int:
    """The context (tokens) of a genai folder, from genai_config.json, without loading the model."""
    folder = find_model_folder(folder)
    return int(genai_config(folder)["model"].get("context_length", 2048))


def genai_config(folder: Path) -> dict:
    """``genai_config.json`` of a genai folder, parsed defensively (BadInput naming the file)."""
    cfg = read_json(folder / "genai_config.json", kind="genai_config", object_keys=("model",))
    m = cfg["model"]
    for key in ("vocab_size", "context_length"):
        if key in m and (not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] <= 0):
            raise BadInput(f"{folder / 'genai_config.json'}: model.{key} is {m[key]!r}, not a positive integer",
                           hint="the file is damaged or was modified; re-export the model (or copy the bundle again)")
    if not isinstance(m.get("decoder"), dict):
        raise BadInput(f"{folder / 'genai_config.json'}: genai_config file has no 'model.decoder' object",
                       hint="the file is damaged or was modified; re-export the model (or copy the bundle again)")
    return cfg


def check_prompt_length(folder: str | Path, prompts, max_new_tokens: int = 0, *, system: str | None = None) -> None:
    """Bound prompts before they reach native code: BadInput (exit 2) when a prompt's tokens (plus
    ``max_new_tokens``) do not fit the context.

    Counted with the `tokenizers` library on the folder's tokenizer.json, before onnxruntime-genai
    loads the model: onnxruntime-genai 0.15.2 crashes (SIGSEGV in og.Model) in `edgetune run -p`
    with a ~100,000-character prompt, so the check must not need an og.Model. The chat template
    adds a few tokens more; generate_ids checks the exact count again.
    """
    folder = find_model_folder(folder)
    ctx = context_length(folder)
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return
    tok = load_tokenizer(tj)
    for p in prompts:
        text = p if isinstance(p, str) else "\n".join(str(m.get("content", "")) for m in p)
        if system:
            text = system + "\n" + text
        n = len(tok.encode(text, add_special_tokens=False).ids)
        if n >= ctx or n + max_new_tokens > ctx:
            plus = f" + --max-tokens {max_new_tokens}" if n < ctx else ""
            raise BadInput(f"prompt ({n} tokens{plus}) exceeds the context ({ctx} tokens) of {folder.parent.name if folder.name == 'model' else folder.name}",
                           hint=f"shorten the prompt to fewer than {max(1, ctx - max_new_tokens)} tokens or lower --max-tokens")


def load(folder: str | Path, target: Any = None, *, adapter: str | None = None) -> LLM:
    """Load a genai folder with the target's execution provider and session options (and a LoRA adapter)."""
    og = _og()
    folder = find_model_folder(folder)
    t = resolve_target(target)
    config = genai_config(folder)
    check_tokenizer(folder)  # onnxruntime-genai parses it again in native code: refuse a bad one first
    t0 = time.perf_counter()
    cfg = og.Config(str(folder))
    # the providers are the target's, not the folder's: a folder exported for an NPU (genai_config names
    # OpenVINO, VitisAI, QNN) loads on this CPU for the host's checks (target None) and cross-builds
    cfg.clear_providers()
    providers = ["cpu"]
    if t is not None:
        ep = t.runtime.execution_provider
        if ep != "cpu":
            name = _OG_PROVIDERS.get(ep, ep)
            cfg.append_provider(name)
            for k, v in t.runtime.provider_options.items():
                cfg.set_provider_option(name, str(k), str(v))
            providers = [name, "cpu"]
        so: dict[str, Any] = {}
        if t.session.intra_op_threads:
            so["intra_op_num_threads"] = t.session.intra_op_threads
        if t.session.inter_op_threads:
            so["inter_op_num_threads"] = t.session.inter_op_threads
        if so:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
    try:
        model = og.Model(cfg)
    except Exception as exc:
        if providers[0] != "cpu":
            raise MissingDependency(f"onnxruntime-genai could not use execution provider '{providers[0]}' (target '{t.name}'): {exc}",
                                    hint="install the onnxruntime-genai build for this accelerator, or pick a CPU target") from exc
        raise BadInput(f"onnxruntime-genai could not load {folder}: {exc}", hint="re-export the model") from exc
    tokenizer = og.Tokenizer(model)
    llm = LLM(folder=folder, model=model, tokenizer=tokenizer, config=config, target=t,
              load_time_s=time.perf_counter() - t0, providers=providers, adapter_files=adapter_files(folder))
    set_adapter(llm, adapter)
    return llm


def tokenize(tokenizer, text: str, *, special: bool = True) -> np.ndarray:
    """``text`` encoded by an onnxruntime-genai tokenizer the way transformers encodes it.

    ``special``: add the special tokens the tokenizer's post-processor adds (Gemma's BOS), as
    ``tokenizer.encode(text)`` does in transformers; off for text a chat template rendered (the template
    writes its BOS itself; transformers' ``apply_chat_template`` encodes with ``add_special_tokens=False``).
    onnxruntime-genai 0.18's ``Tokenizer.encode`` adds none unless told (``add_special_tokens``), so a
    model whose tokenizer adds a BOS (every Gemma) was fed text without it.
    """
    try:
        tokenizer.update_options(add_special_tokens="true" if special else "false")
    except (AttributeError, RuntimeError):  # a runtime without the option: it never adds special tokens
        pass
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def encode(llm: LLM, text: str, *, special: bool = True) -> np.ndarray:
    """Token ids of ``text`` with the device tokenizer (onnxruntime-genai), as transformers' ``encode``
    gives them (``special``: see :func:`tokenize`)."""
    return tokenize(llm.tokenizer, text, special=special)


def decode(llm: LLM, ids) -> str:
    if len(ids) == 0:  # onnxruntime-genai 0.15.2: Tokenizer.decode([]) died with SIGFPE (0.18 returns "")
        return ""
    return llm.tokenizer.decode(np.asarray(ids, dtype=np.int32))


def prompt_ids(llm: LLM, prompt_or_messages: str | list[dict], *, chat: bool = True) -> np.ndarray:
    """Ids of a prompt; with ``chat`` a string becomes one user message and the chat template applies."""
    # prompts are encoded as fine-tuning renders them and the reference's task prompts are: without special tokens
    if isinstance(prompt_or_messages, str) and not chat:
        return encode(llm, prompt_or_messages, special=False)
    messages = [{"role": "user", "content": prompt_or_messages}] if isinstance(prompt_or_messages, str) else prompt_or_messages
    template = _chat_template(llm.folder)
    if template is None:
        # no template: plain concatenation of contents
        return encode(llm, "\n".join(m["content"] for m in messages), special=False)
    try:
        text = llm.tokenizer.apply_chat_template(template_str=template, messages=json.dumps(messages), add_generation_prompt=True)
    except Exception as exc:  # onnxruntime-genai raises a RuntimeError with the template engine's multi-line message
        detail = " ".join(str(exc).split())[:200]
        raise BadInput(f"{llm.folder}: the chat template cannot be rendered ({detail})",
                       hint="the bundle's chat template is broken or hostile; rebuild it from a model whose template renders, or use --raw") from exc
    return encode(llm, text, special=False)  # the template wrote the special tokens (BOS) itself


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        tpl = read_json(cfg, kind="tokenizer_config").get("chat_template")
        if isinstance(tpl, str):
            return tpl
    return None


def kv_capacity(llm: LLM, length: int) -> int:
    """The KV buffer a generator of ``length`` tokens needs: at least the sliding window, where there is one.

    onnxruntime-genai 0.18 builds sliding-window layers whose GroupQueryAttention refuses a KV cache shorter
    than the window ("KV cache capacity (51) must be at least local_window_size (2047)"), and with a shared
    past/present buffer the cache is ``max_length`` long. So a Phi-3-mini (window 2047), Mistral (4096) or
    Gemma (512-4096) prompt shorter than its window needs the buffer of the window; the loops that use the
    generator stop at their own token count, so the longer ``max_length`` changes no output.
    """
    window = llm.config["model"]["decoder"].get("sliding_window") or {}
    if not window.get("window_size") or not window.get("layers", True):
        return int(length)
    return max(int(length), min(int(window["window_size"]), llm.context_length))


def _generator(llm: LLM, max_length: int, *, min_length: int = 0):
    og = _og()
    params = og.GeneratorParams(llm.model)
    opts: dict[str, Any] = {"max_length": kv_capacity(llm, max_length), "do_sample": False, "top_k": 1}
    if min_length:
        opts["min_length"] = int(min_length)
    params.set_search_options(**opts)
    gen = og.Generator(llm.model, params)
    if llm.adapter:
        gen.set_active_adapter(llm._og_adapters, llm.adapter)
    return gen


def generate_ids(llm: LLM, ids, max_new_tokens: int = 128, *, ignore_eos: bool = False,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy continuation of ``ids``: the new token ids (stops at EOS unless ``ignore_eos``)."""
    ids = np.asarray(ids, dtype=np.int32)
    total = len(ids) + int(max_new_tokens)
    if total > llm.context_length:
        raise BadInput(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context ({llm.context_length} tokens)",
                       hint="shorten the prompt or lower --max-tokens")
    gen = _generator(llm, total, min_length=total if ignore_eos else 0)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        tok = int(gen.get_next_tokens()[0])
        if not ignore_eos and tok in llm.eos_token_ids:
            break
        out.append(tok)
        if on_token:
            on_token(tok)
    return out


def generate(llm: LLM, prompt_or_messages: str | list[dict], max_new_tokens: int = 128, *, chat: bool = True,
             stream: Callable[[str], None] | None = None) -> str:
    """Greedy generation from a prompt (or chat messages): the generated text.

    ``stream`` is called with each decoded piece as it is produced.
    """
    ids = prompt_ids(llm, prompt_or_messages, chat=chat)
    on_token = None
    if stream is not None:
        ts = llm.tokenizer.create_stream()
        on_token = lambda tok: stream(ts.decode(tok))  # noqa: E731
    return decode(llm, generate_ids(llm, ids, max_new_tokens, on_token=on_token))


# ---------------------------------------------------------------- scoring (full logits)

def session(llm: LLM):
    """A plain onnxruntime session on the decoder graph (created once)."""
    if llm._session is None:
        dec = llm.config["model"]["decoder"]
        if llm.adapter_files:
            # the LoRA inputs default to initializers; onnxruntime warns about each of them at load
            import onnxruntime as ort

            from .session import providers, session_options

            so = session_options(llm.target)
            so.log_severity_level = 3
            llm._session = ort.InferenceSession(str(llm.folder / dec["filename"]), sess_options=so, providers=providers(llm.target))
        else:
            llm._session = create_session(llm.folder / dec["filename"], llm.target)
    return llm._session


def _run_options(llm: LLM):
    """Run options that activate the selected LoRA adapter in a plain onnxruntime session (None: base)."""
    if not llm.adapter:
        return None
    import onnxruntime as ort

    if llm.adapter not in llm._ort_adapters:
        ad = ort.LoraAdapter()
        ad.Load(str(llm.adapter_files[llm.adapter]))
        llm._ort_adapters[llm.adapter] = ad
    ro = ort.RunOptions()
    ro.add_active_adapter(llm._ort_adapters[llm.adapter])
    return ro


def prefill_feeds(dec: dict, inputs: Iterable[tuple[str, bool]], ids) -> dict[str, np.ndarray]:
    """The inputs of one forward pass over ``ids`` from an empty cache, for a builder decoder graph whose
    genai_config decoder section is ``dec``; ``inputs``: the graph's (input name, is float16) pairs.

    onnxruntime-genai 0.18 builds sliding-window layers whose GroupQueryAttention wants a ring KV cache of
    at least the window (an empty past is refused): those layers get a zero cache of window_size, which
    the all-ones attention mask leaves unread (checked exact against PyTorch past the window). Used by the
    scorer (:func:`logits`) and by onnxruntime's GPTQ calibration (``export/decoder/quantize.py``)."""
    ids = np.asarray(ids, dtype=np.int64)[None, :]
    n = ids.shape[1]
    feeds: dict[str, np.ndarray] = {}
    window = dec.get("sliding_window") or {}
    sliding = set(window.get("layers") or ()) if window.get("window_size") else set()
    for name, fp16 in inputs:
        if name == dec["inputs"].get("input_ids", "input_ids"):
            feeds[name] = ids
        elif name == dec["inputs"].get("attention_mask", "attention_mask"):
            feeds[name] = np.ones((1, n), dtype=np.int64)
        elif name == dec["inputs"].get("position_ids", "position_ids"):
            feeds[name] = np.arange(n, dtype=np.int64)[None, :]
        elif name.startswith("past_key_values") or "past" in name:
            kv = dec.get("num_key_value_heads", dec["num_attention_heads"])
            layer = re.search(r"\d+", name)
            cap = window["window_size"] if layer and int(layer.group()) in sliding else 0
            feeds[name] = np.zeros((1, kv, cap, dec["head_size"]), dtype=np.float16 if fp16 else np.float32)
        else:
            raise BadInput(f"decoder input '{name}' is not understood by the scorer", hint="re-export with edgetune export")
    return feeds


def logits(llm: LLM, ids) -> np.ndarray:
    """Logits [len(ids), vocab] (float32) of one forward pass over ``ids`` from an empty cache."""
    sess = session(llm)
    dec = llm.config["model"]["decoder"]
    feeds = prefill_feeds(dec, [(i.name, "float16" in i.type) for i in sess.get_inputs()], ids)
    out_name = dec["outputs"].get("logits", "logits")
    (lg,) = sess.run([out_name], feeds, _run_options(llm))
    return np.asarray(lg[0], dtype=np.float32)


def cached_logits(llm: LLM, ids, prefill: int) -> np.ndarray:
    """Logits [len(ids) - prefill + 1, vocab] the way the device generates: ``ids[:prefill]`` appended at once
    (the last row is its last position's), then every further token appended alone, through the KV cache
    (onnxruntime-genai's generator, ring buffers of sliding-window layers included)."""
    ids = np.asarray(ids, dtype=np.int32)
    gen = _generator(llm, len(ids))
    gen.append_tokens(ids[:prefill])
    rows = [np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)]
    for tok in ids[prefill:]:
        gen.append_tokens(np.array([tok], dtype=np.int32))
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


def iter_window_logits(llm: LLM, ids, windows) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    """For each (start, end, score_from) window: the logits of ids[start:end]."""
    ids = np.asarray(ids, dtype=np.int64)
    for w in windows:
        start, end, _ = w
        yield w, logits(llm, ids[start:end])
