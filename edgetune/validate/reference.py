"""Reference packs: the fp32 reference's numbers, computed once (on the host) and stored.

A pack is a folder with ``reference.json`` (metadata, texts, prompts) and ``reference.npz``
(arrays; read with ``np.load(allow_pickle=False)``). The device compares an export against a
pack without the reference model, torch or transformers.

Sources:
* an HF folder (``config.json`` + safetensors): computed with torch/transformers (host only);
* an onnxruntime-genai export or an encoder export (e.g. the fp32 export): computed with the
  device runner;
* an existing pack folder: loaded.

Decoder pack arrays: ``ids`` (evaluation tokens), ``nll`` (per scored token), ``top_ids`` /
``top_logp`` (top-k next-token log-probs per scored token), ``prompt_ids``/``prompt_offsets``,
``golden_ids``/``golden_offsets`` (greedy outputs), ``tricky_ids``/``tricky_offsets``; with task
data (gold answers) also ``task_prompt_*`` / ``task_answer_*`` (the reference's greedy answers;
examples, gold and answer texts in ``meta['task']``).
Encoder pack arrays: ``pred`` (index into ``labels``), ``tricky_ids``/``tricky_offsets``, ``ids``/``ids_offsets``.
Question-answering pack: ``answer_start`` / ``answer_end`` (the reference's answer spans, characters);
examples, answers, scores and the window sizes in ``meta``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, require

SCHEMA_VERSION = 1
PACK_JSON = "reference.json"
PACK_NPZ = "reference.npz"

# Strings where tokenizers commonly disagree: unicode, whitespace runs, special tokens, digits.
TRICKY = [
    "héllo wörld, naïve café, Ærøskøbing",
    "你好，世界。こんにちは 안녕하세요",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "numbers 0123456789 3.14159 1,000,000",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|> [CLS] [SEP] </s> <s>",
    "code: def f(x):\n    return x**2  # comment",
    "URL https://example.com/a?b=c&d=e",
]

GENERATION_PROMPTS = 4  # task requests used for generation agreement when no prompts are given
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colors.",
    "Explain what a CPU does in one sentence.",
]


@dataclass
class Pack:
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def ragged(self, name: str) -> list[np.ndarray]:
        data, off = self.arrays[f"{name}_ids"], self.arrays[f"{name}_offsets"]
        return [data[off[i] : off[i + 1]] for i in range(len(off) - 1)]

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / PACK_NPZ, **self.arrays)
        (folder / PACK_JSON).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n")
        return folder


def _ragged(seqs) -> tuple[np.ndarray, np.ndarray]:
    seqs = [np.asarray(s, dtype=np.int64).ravel() for s in seqs]
    off = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    data = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return data.astype(np.int64), off


def is_pack(path: str | os.PathLike) -> bool:
    return (Path(path) / PACK_JSON).is_file() and (Path(path) / PACK_NPZ).is_file()


def load_pack(folder: str | os.PathLike) -> Pack:
    folder = Path(folder)
    if not is_pack(folder):
        raise BadInput(f"{folder} is not a reference pack (needs {PACK_JSON} and {PACK_NPZ})", hint="make one with edgetune validate --reference <fp32 model>")
    from ..device.files import read_json

    meta = read_json(folder / PACK_JSON, kind="reference pack")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise BadInput(f"{folder}: reference pack schema {meta.get('schema_version')} is not {SCHEMA_VERSION}", hint="rebuild the pack")
    from ..errors import reading

    with reading(folder / PACK_NPZ, "reference pack (.npz)"), np.load(folder / PACK_NPZ, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}  # a truncated or damaged file is exit 2 naming it
    return Pack(meta, arrays)


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_kind(path: str | os.PathLike) -> str:
    p = Path(path)
    if is_pack(p):
        return "pack"
    if (p / "genai_config.json").is_file() or (p / "model" / "genai_config.json").is_file():
        return "genai"
    if (p / "model.onnx").is_file() or (p / "model" / "model.onnx").is_file():
        return "onnx-encoder"
    if (p / "seq2seq.json").is_file() or (p / "model" / "seq2seq.json").is_file():
        return "onnx-seq2seq"
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf"
    raise BadInput(f"reference {p} is not an HF folder, an ONNX export or a reference pack", hint="give the fp32 model folder")


def vocab_size(source) -> int | None:
    """The vocabulary size of a decoder reference read from its config (HF folder or genai export), or None."""
    p = Path(source)
    kind = source_kind(p)
    if kind == "genai":
        from ..device.llm import find_model_folder, genai_config

        v = genai_config(find_model_folder(p))["model"].get("vocab_size")
    elif kind == "hf":
        from ..device.files import read_json

        cfg = read_json(p / "config.json", kind="config")
        v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    else:
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def pack_vocab(pack: "Pack") -> tuple[int | None, int]:
    """(the vocabulary size a decoder pack records, or None; the largest token id it holds + 1)."""
    top = 0
    for name, arr in pack.arrays.items():
        if arr.size and (name == "ids" or name == "top_ids" or name.endswith("_ids")):
            top = max(top, int(arr.max()) + 1)
    v = pack.meta.get("vocab_size")
    return (v if isinstance(v, int) and not isinstance(v, bool) else None), top


# ---------------------------------------------------------------- decoder

def _decoder_meta(source, text, window, stride, method, topk, max_new_tokens, prompts, how) -> dict:
    from ..artifacts import package_versions

    return {
        "schema_version": SCHEMA_VERSION, "kind": "decoder", "source": str(source), "computed_with": how,
        "text": text, "text_sha256": text_sha(text), "window": window, "stride": stride, "method": method,
        "topk": topk, "max_new_tokens": max_new_tokens, "prompts": prompts, "tricky": TRICKY,
        "versions": package_versions(),
    }


def _score_into(ids, windows_, logits_fn, topk):
    from ..device import metrics as M

    nll, tids, tlp = [], [], []
    for w in windows_:
        lg = logits_fn(ids[w[0] : w[1]])
        rows, tg = M.window_targets(ids, w)
        nll.append(M.nll(lg[rows], tg))
        i, v = M.topk(lg[rows], topk)
        tids.append(i)
        tlp.append(v)
    return (np.concatenate(nll).astype(np.float64), np.concatenate(tids).astype(np.int32), np.concatenate(tlp).astype(np.float32))


def build_decoder_reference(source, text: str, *, window: int, stride: int | None, method: str = "sliding",
                            topk: int = 64, max_new_tokens: int = 32, prompts: list | None = None,
                            eval_tokens: int | None = None, task: list[dict[str, Any]] | None = None) -> Pack:
    """A decoder pack; with ``task`` (examples with gold answers) also the reference's greedy answers."""
    from ..device import metrics as M

    if not prompts and task:
        # generation agreement on the data's own requests (in-domain), not on generic questions whose
        # near ties a fine-tuned model has no reason to keep
        prompts = [e["prompt"] for e in task if e["chat"]][:GENERATION_PROMPTS] or None
    prompts = prompts or DEFAULT_PROMPTS
    kind = source_kind(source)
    if kind == "genai":
        from ..device import llm as L

        m = L.load(source)
        vocab = m.vocab_size
        ids = L.encode(m, text)
        if eval_tokens:
            ids = ids[:eval_tokens]
        logits_fn = lambda x: L.logits(m, x)  # noqa: E731
        prompt_ids = [L.prompt_ids(m, p) for p in prompts]
        golden = [L.generate_ids(m, p, max_new_tokens) for p in prompt_ids]
        tricky = [L.encode(m, s) for s in TRICKY]
        how = "onnxruntime-genai"
    elif kind == "hf":
        torch = require("torch", purpose="computing the reference with PyTorch")
        from ..model_input import load_causal_lm, load_tokenizer

        tok = load_tokenizer(source)
        model = load_causal_lm(source).eval()
        vocab = int(model.get_output_embeddings().weight.shape[0])
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
        if eval_tokens:
            ids = ids[:eval_tokens]

        def logits_fn(x):
            with torch.inference_mode():
                return model(torch.from_numpy(np.asarray(x, dtype=np.int64))[None]).logits[0].float().numpy()

        prompt_ids = []
        for p in prompts:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            if tok.chat_template:
                prompt_ids.append(np.asarray(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False), dtype=np.int64).ravel())
            else:
                prompt_ids.append(np.asarray(tok("\n".join(m["content"] for m in msgs))["input_ids"], dtype=np.int64))
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        golden = []
        for p in prompt_ids:
            with torch.inference_mode():
                out = model.generate(torch.from_numpy(p)[None], max_new_tokens=max_new_tokens, do_sample=False,
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long), pad_token_id=next(iter(eos), 0))
            new = [int(t) for t in out[0, len(p):]]
            golden.append([t for t in new[: next((i for i, t in enumerate(new) if t in eos), len(new))]])
        tricky = [np.asarray(tok(s)["input_ids"], dtype=np.int64) for s in TRICKY]
        how = "torch"
    else:
        raise BadInput(f"reference {source} is not a decoder model", hint="give the fp32 HF folder or fp32 export of the same model")
    if len(ids) < 2:
        raise BadInput("the evaluation text has fewer than 2 tokens", hint="give a longer --data file")
    ws = M.windows(len(ids), window, stride, method)
    nll, tids, tlp = _score_into(ids, ws, logits_fn, topk)
    arrays = {"ids": ids.astype(np.int64), "nll": nll, "top_ids": tids, "top_logp": tlp}
    for name, seqs in (("prompt", prompt_ids), ("golden", golden), ("tricky", tricky)):
        arrays[f"{name}_ids"], arrays[f"{name}_offsets"] = _ragged(seqs)
    meta = _decoder_meta(source, text, window, stride, method, topk, max_new_tokens,
                         [p if isinstance(p, str) else p for p in prompts], how)
    meta["n_tokens"] = int(len(ids))
    meta["vocab_size"] = vocab
    meta["perplexity"] = M.perplexity(nll)
    pack = Pack(meta, arrays)
    if task:
        # free this reference model before task_answers loads its own: two copies at once were 12.4 GiB for a
        # 1.5B fp32 merge (31 GB at 3.8B)
        model = m = logits_fn = None  # noqa: F841
        import gc

        gc.collect()
        add_task(pack, task, task_answers(source, task))
    return pack


# ---------------------------------------------------------------- encoder

def build_token_reference(source, words: list[list[str]]) -> Pack:
    """Reference tags per word for a token classifier (first sub-token of each word)."""
    from ..artifacts import package_versions

    kind = source_kind(source)
    if kind == "onnx-encoder":
        from ..device import encoder as E

        enc = E.load(source)
        tags = E.token_classify(enc, words)
        labels = enc.labels
        how = "onnxruntime"
    elif kind == "hf":
        torch = require("torch", purpose="computing the reference with PyTorch")
        transformers = require("transformers")
        tok = transformers.AutoTokenizer.from_pretrained(str(source))
        model = transformers.AutoModelForTokenClassification.from_pretrained(str(source), use_safetensors=True).eval()
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        tags = []
        for ws in words:
            b = tok(ws, is_split_into_words=True, truncation=True, max_length=512, return_tensors="pt")
            with torch.inference_mode():
                pred = model(**b).logits[0].argmax(-1).tolist()
            t, seen = ["O"] * len(ws), set()
            for pos, w in enumerate(b.word_ids(0)):
                if w is not None and w not in seen:
                    seen.add(w)
                    t[w] = labels[pred[pos]]
            tags.append(t)
        how = "torch"
    else:
        raise BadInput(f"reference {source} is not an encoder model", hint="give the fp32 HF folder or fp32 export")
    index = {lab: i for i, lab in enumerate(labels)}
    arrays = {}
    arrays["tags_ids"], arrays["tags_offsets"] = _ragged([[index.get(t, -1) for t in ts] for ts in tags])
    joined = ["\x01".join(ws) for ws in words]
    meta = {"schema_version": SCHEMA_VERSION, "kind": "encoder", "task": "token-classification", "source": str(source),
            "computed_with": how, "labels": labels, "words": words, "text_sha256": text_sha("\x00".join(joined)),
            "versions": package_versions()}
    return Pack(meta, arrays)


def build_encoder_reference(source, texts: list[str], labels_true: list[str] | None = None) -> Pack:
    from ..artifacts import package_versions

    kind = source_kind(source)
    if kind == "onnx-encoder":
        from ..device import encoder as E

        enc = E.load(source)
        lg = E.logits(enc, texts)
        labels = enc.labels or [str(i) for i in range(lg.shape[-1])]
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(enc.folder / "tokenizer.json"))
        raw.no_padding()
        raw.enable_truncation(512)
        tok_ids = [np.asarray(e.ids) for e in raw.encode_batch(TRICKY)]
        data_ids = [np.asarray(e.ids) for e in raw.encode_batch(texts)]
        how = "onnxruntime"
    elif kind == "hf":
        torch = require("torch", purpose="computing the reference with PyTorch")
        transformers = require("transformers")
        tok = transformers.AutoTokenizer.from_pretrained(str(source))
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(source), use_safetensors=True).eval()
        out = []
        for i in range(0, len(texts), 16):
            b = tok(texts[i : i + 16], padding=True, truncation=True, max_length=512, return_tensors="pt")
            with torch.inference_mode():
                out.append(model(**b).logits.float().numpy())
        lg = np.concatenate(out)
        labels = [str(model.config.id2label[i]) for i in range(lg.shape[-1])]
        tok_ids = [np.asarray(tok(s, truncation=True, max_length=512)["input_ids"]) for s in TRICKY]
        data_ids = [np.asarray(tok(s, truncation=True, max_length=512)["input_ids"]) for s in texts]
        how = "torch"
    else:
        raise BadInput(f"reference {source} is not an encoder model", hint="give the fp32 HF folder or fp32 export")
    arrays = {"pred": lg.argmax(-1).astype(np.int64)}
    arrays["tricky_ids"], arrays["tricky_offsets"] = _ragged(tok_ids)
    arrays["data_ids"], arrays["data_offsets"] = _ragged(data_ids)
    meta = {"schema_version": SCHEMA_VERSION, "kind": "encoder", "source": str(source), "computed_with": how,
            "labels": labels, "texts": texts, "text_sha256": text_sha("\x00".join(texts)), "tricky": TRICKY,
            "versions": package_versions()}
    if labels_true is not None:
        from ..device.metrics import accuracy, macro_f1

        pred = [labels[i] for i in arrays["pred"]]
        meta["accuracy"] = accuracy(labels_true, pred)
        meta["f1"] = macro_f1(labels_true, pred)
    return Pack(meta, arrays)


def build_qa_reference(source, examples: list[dict[str, Any]], *, max_length: int, stride: int) -> Pack:
    """The reference's answer spans for SQuAD records, with the device's windows and span decoding.

    From an HF folder the start/end logits come from PyTorch (``AutoModelForQuestionAnswering``) on
    exactly the windows the device builds (``device.qa.windows`` with the model's own tokenizer.json),
    and the spans are decoded by the same numpy code (``device.qa.best_span``): a graph whose logits
    match PyTorch gives the same answers.
    """
    from ..artifacts import package_versions
    from ..device import qa as Q

    kind = source_kind(source)
    answers = []
    if kind == "onnx-encoder":
        from ..device import encoder as E

        enc = E.load(source)
        answers = [Q.answer(enc, e["question"], e["context"], max_length=max_length, stride=stride) for e in examples]
        how = "onnxruntime"
    elif kind == "hf":
        torch = require("torch", purpose="computing the reference with PyTorch")
        transformers = require("transformers")
        tok = transformers.AutoTokenizer.from_pretrained(str(source))
        if not getattr(tok, "is_fast", False):
            raise BadInput(f"reference {source} has no fast tokenizer (tokenizer.json)", hint="save the tokenizer with tokenizer.json")
        raw = tok.backend_tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(
            str(source), use_safetensors=True, attn_implementation="eager", dtype=torch.float32).eval()
        names = set(inspect_forward(model))
        for e in examples:
            wins = Q.windows(raw, e["question"], e["context"], max_length=max_length, stride=stride)
            f = Q.feeds(wins, length=max(len(w.ids) for w in wins), pad_id=pad_id)
            with torch.inference_mode():
                out = model(**{k: torch.from_numpy(v) for k, v in f.items() if k in names})
            answers.append(Q.best_span(out.start_logits.float().numpy(), out.end_logits.float().numpy(), wins, e["context"]))
        how = "torch"
    else:
        raise BadInput(f"reference {source} is not an encoder model", hint="give the fp32 HF folder or fp32 export")
    arrays = {"answer_start": np.array([a["start"] for a in answers], np.int64),
              "answer_end": np.array([a["end"] for a in answers], np.int64)}
    joined = ["\x01".join([e["question"], e["context"]]) for e in examples]
    meta = {"schema_version": SCHEMA_VERSION, "kind": "encoder", "task": "question-answering", "source": str(source),
            "computed_with": how, "max_length": int(max_length), "stride": int(stride),
            "examples": [{"question": e["question"], "context": e["context"], "answers": e["answers"]} for e in examples],
            "answers": [{"answer": a["answer"], "start": a["start"], "end": a["end"], "score": a["score"]} for a in answers],
            "text_sha256": text_sha("\x00".join(joined)), "versions": package_versions()}
    return Pack(meta, arrays)


def inspect_forward(model) -> list[str]:
    """The keyword inputs of a PyTorch model's forward (token_type_ids only where it takes them)."""
    import inspect as _inspect

    params = _inspect.signature(model.forward).parameters
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]


# ---------------------------------------------------------------- task answers (greedy, gold-capped)

TASK_BATCH = 8  # prompts per batched PyTorch generate call (left padding)


def answer_cap(gold_tokens: int) -> int:
    """New-token cap of one task example: the gold's length plus slack (1.5x + 8). A longer
    answer is wrong for exact match anyway, and the cap keeps reference and device runs cheap."""
    return int(gold_tokens * 1.5) + 8


def task_answers(source, examples: list[dict[str, Any]], *, batch_size: int = TASK_BATCH) -> dict[str, Any]:
    """Greedy answers of ``source`` (HF folder: PyTorch, batched with left padding; genai export:
    onnxruntime-genai, one by one) to task examples (:func:`edgetune.data.task_examples`).

    Returns ``{"prompt_ids": [...], "answer_ids": [...], "answers": [...], "caps": [...], "computed_with"}``.
    Prompt ids: the chat template with the generation prompt for chat examples, the raw prompt
    (no special tokens, as fine-tuning renders it) otherwise.
    """
    kind = source_kind(source)
    if kind == "genai":
        from ..device import llm as L

        m = L.load(source)
        prompt_ids = [L.prompt_ids(m, e["prompt"], chat=e["chat"]) for e in examples]
        caps = [answer_cap(len(L.encode(m, e["gold"], special=False))) for e in examples]
        answer_ids = [L.generate_ids(m, p, c) for p, c in zip(prompt_ids, caps)]
        answers = [L.decode(m, a) for a in answer_ids]
        return {"prompt_ids": prompt_ids, "answer_ids": answer_ids, "answers": answers, "caps": caps, "computed_with": "onnxruntime-genai"}
    if kind != "hf":
        raise BadInput(f"task answers need an HF folder or a genai export, got {source}", hint="give the fp32 model folder")
    torch = require("torch", purpose="computing reference answers with PyTorch")
    from ..model_input import load_causal_lm, load_tokenizer

    tok = load_tokenizer(source)
    model = load_causal_lm(source).eval()
    prompt_ids = []
    for e in examples:
        if e["chat"] and tok.chat_template:
            ids = tok.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        elif e["chat"]:
            ids = tok("\n".join(m["content"] for m in e["prompt"]), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(e["prompt"], add_special_tokens=False)["input_ids"]
        prompt_ids.append(np.asarray(ids, dtype=np.int64).ravel())
    caps = [answer_cap(len(tok(e["gold"], add_special_tokens=False)["input_ids"])) for e in examples]
    eos = model.generation_config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    answer_ids: list[list[int]] = [[] for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch: little padding
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every prompt ends at the last column
            n = len(prompt_ids[i])
            ids[r, width - n :] = torch.from_numpy(prompt_ids[i])
            mask[r, width - n :] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(caps[i] for i in idx), do_sample=False,
                                 num_beams=1, pad_token_id=pad, eos_token_id=eos or None)
        for r, i in enumerate(idx):
            new = [int(t) for t in out[r, width:]]
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            answer_ids[i] = new[: min(stop, caps[i])]
    answers = [tok.decode(a, skip_special_tokens=False) for a in answer_ids]
    return {"prompt_ids": prompt_ids, "answer_ids": answer_ids, "answers": answers, "caps": caps, "computed_with": "torch"}


def add_task(pack: Pack, examples: list[dict[str, Any]], got: dict[str, Any]) -> Pack:
    """Store task examples and the reference's answers in a decoder pack (``meta['task']``,
    arrays ``task_prompt_*`` and ``task_answer_*``)."""
    pack.meta["task"] = {
        "computed_with": got["computed_with"],
        "examples": [{"prompt": e["prompt"], "chat": e["chat"], "gold": e["gold"], "answer": a, "max_new_tokens": int(c)}
                     for e, a, c in zip(examples, got["answers"], got["caps"])],
    }
    pack.arrays["task_prompt_ids"], pack.arrays["task_prompt_offsets"] = _ragged(got["prompt_ids"])
    pack.arrays["task_answer_ids"], pack.arrays["task_answer_offsets"] = _ragged(got["answer_ids"])
    return pack
