"""Records -> token features: chat template, loss on the answer only, packing, labels.

Causal LM features are ``{"input_ids", "labels"}`` where a label of -100 is ignored by
the loss: with ``loss_on_answer_only`` only the assistant turns (messages) or the
completion (prompt/completion) are learned. Classification features carry ``labels``
as class ids; token classification labels the first sub-token of each word.
"""

from __future__ import annotations

from typing import Any

from .. import console
from ..data import Dataset
from ..errors import BadInput

IGNORE = -100


def _answer_spans_messages(tok, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; char spans of every assistant turn."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(prefix):
            return full, []  # the template is not prefix-stable; caller falls back to full loss
        spans.append((len(prefix), len(upto)))
    return full, spans


def _render(tok, rec: dict[str, Any], fmt: str) -> tuple[str, list[tuple[int, int]] | None]:
    """Text of one record and its answer spans (None: learn every token)."""
    if fmt == "messages":
        if not getattr(tok, "chat_template", None):
            raise BadInput("the model's tokenizer has no chat template, so 'messages' data cannot be rendered", hint="use prompt/completion or text data, or a chat model")
        text, spans = _answer_spans_messages(tok, rec["messages"])
        return text, spans or None
    if fmt == "prompt_completion":
        eos = tok.eos_token or ""
        text = rec["prompt"] + rec["completion"] + eos
        return text, [(len(rec["prompt"]), len(text))]
    return rec["text"] + (tok.eos_token or ""), None


def causal_features(tok, ds: Dataset, *, max_seq_len: int, loss_on_answer_only: bool, packing: bool) -> list[dict[str, list[int]]]:
    feats: list[dict[str, list[int]]] = []
    fallback = 0
    for rec in ds.records:
        text, spans = _render(tok, rec, ds.format)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if loss_on_answer_only and spans:
            labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _e) in zip(ids, enc["offset_mapping"])]
        else:
            if loss_on_answer_only and ds.format == "messages":
                fallback += 1
            labels = list(ids)
        feats.append({"input_ids": ids, "labels": labels})
    if fallback:
        console.warn(f"{fallback} conversation(s): chat template is not prefix-stable, so their loss covers every token")
    if packing or ds.format == "text":
        # concatenate then cut into blocks of max_seq_len (a long .txt file becomes many samples)
        if packing:
            flat_ids = [t for f in feats for t in f["input_ids"]]
            flat_lab = [t for f in feats for t in f["labels"]]
            groups = [(flat_ids, flat_lab)]
        else:
            groups = [(f["input_ids"], f["labels"]) for f in feats]
        out = []
        for ids, labels in groups:
            for i in range(0, len(ids), max_seq_len):
                block_ids, block_lab = ids[i : i + max_seq_len], labels[i : i + max_seq_len]
                if len(block_ids) >= 2 and any(t != IGNORE for t in block_lab[1:]):
                    out.append({"input_ids": block_ids, "labels": block_lab})
        feats = out
    else:
        n_all = len(feats)
        feats = [{"input_ids": f["input_ids"][:max_seq_len], "labels": f["labels"][:max_seq_len]} for f in feats]
        feats = [f for f in feats if any(t != IGNORE for t in f["labels"][1:])]
        if 0 < len(feats) < n_all:
            console.warn(f"{ds.path}: {n_all - len(feats)} of {n_all} samples have no answer tokens within --max-seq-len {max_seq_len} and are skipped")
    if not feats:
        raise BadInput(f"{ds.path}: no trainable tokens after tokenization", hint="raise --max-seq-len or check that answers are not empty")
    return feats


def classification_features(tok, ds: Dataset, label2id: dict[str, int], *, max_seq_len: int) -> list[dict[str, Any]]:
    enc = tok([r["text"] for r in ds.records], truncation=True, max_length=max_seq_len)
    out = []
    for i, rec in enumerate(ds.records):
        label = str(rec["label"])
        if label not in label2id:
            raise BadInput(f"{ds.path}:{ds.lines[i]}: label '{label}' does not occur in the training data", hint=f"known labels: {', '.join(label2id)}")
        item = {k: enc[k][i] for k in enc.keys()}
        item["labels"] = label2id[label]
        out.append(item)
    return out


def token_features(tok, ds: Dataset, label2id: dict[str, int], *, max_seq_len: int) -> list[dict[str, Any]]:
    if not getattr(tok, "is_fast", False):
        raise BadInput("token classification needs a fast tokenizer (word ids)", hint="use a model with tokenizer.json")
    out = []
    for i, rec in enumerate(ds.records):
        enc = tok(rec["tokens"], is_split_into_words=True, truncation=True, max_length=max_seq_len)
        labels, prev = [], None
        for w in enc.word_ids():
            if w is None or w == prev:
                labels.append(IGNORE)
            else:
                tag = rec["tags"][w]
                if tag not in label2id:
                    raise BadInput(f"{ds.path}:{ds.lines[i]}: tag '{tag}' does not occur in the training data", hint=f"known tags: {', '.join(label2id)}")
                labels.append(label2id[tag])
            prev = w
        item = dict(enc)
        item["labels"] = labels
        out.append(item)
    return out


def qa_features(tok, ds: Dataset, *, max_seq_len: int, doc_stride: int) -> list[dict[str, Any]]:
    """SQuAD records -> windows with ``start_positions`` / ``end_positions`` (HF's ``prepare_train_features``).

    The question is kept whole and the context is cut into windows of ``max_seq_len`` tokens that
    share ``doc_stride`` tokens (``truncation="only_second"``, overflowing tokens). Each window is
    labelled with the token span of the first gold answer, found from the fast tokenizer's offset
    mapping; a window that does not hold the whole answer points at [CLS] (index 0), as in SQuAD v2
    training. Padding is left to the collator.
    """
    if not getattr(tok, "is_fast", False):
        raise BadInput("question answering needs a fast tokenizer (offset mapping)", hint="use a model with tokenizer.json")
    if tok.padding_side != "right":
        raise BadInput("question answering needs a tokenizer that pads on the right", hint="use a BERT-family encoder")
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(ds.records):
        q_len = len(tok(rec["question"], add_special_tokens=False)["input_ids"])
        room = max_seq_len - q_len - tok.num_special_tokens_to_add(pair=True)
        if room <= doc_stride:
            raise BadInput(f"{ds.path}:{ds.lines[i]}: the question is {q_len} tokens, which leaves {max(room, 0)} of "
                           f"--max-seq-len {max_seq_len} for the context, not more than --doc-stride {doc_stride}",
                           hint="shorten the question, raise --max-seq-len or lower --doc-stride")
        enc = tok(rec["question"], rec["context"], truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        gold = rec["answers"][0]
        start_char, end_char = gold["answer_start"], gold["answer_start"] + len(gold["text"])
        for w in range(len(enc["input_ids"])):
            offsets, seq = enc["offset_mapping"][w], enc.sequence_ids(w)
            ctx = [k for k, sid in enumerate(seq) if sid == 1]
            first, last = ctx[0], ctx[-1]
            if offsets[first][0] > start_char or offsets[last][1] < end_char:
                sp = ep = 0  # the answer is not (wholly) in this window
            else:
                sp = first
                while sp <= last and offsets[sp][0] <= start_char:
                    sp += 1
                sp -= 1
                ep = last
                while ep >= first and offsets[ep][1] >= end_char:
                    ep -= 1
                ep += 1
            item = {k: list(enc[k][w]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            item.update(start_positions=sp, end_positions=ep)
            out.append(item)
    if not out:
        raise BadInput(f"{ds.path}: no question-answering windows", hint="check the data")
    return out


def seq2seq_features(tok, ds: Dataset, *, max_seq_len: int, prefix: str = "") -> list[dict[str, Any]]:
    """Translation pairs -> ``{"input_ids", "attention_mask", "labels"}`` for an encoder-decoder.

    The source is ``prefix + source`` (T5's task prefix; empty for Marian), the labels the target's ids
    (the tokenizer's ``text_target``: Marian's target vocabulary), both cut at ``max_seq_len`` and ending
    with the end-of-sequence token. The collator pads labels with -100, so padding is never learned; the
    model shifts the labels right into decoder inputs itself.
    """
    out: list[dict[str, Any]] = []
    for rec in ds.records:
        enc = tok(prefix + rec["source"], truncation=True, max_length=max_seq_len)
        labels = tok(text_target=rec["target"], truncation=True, max_length=max_seq_len)["input_ids"]
        out.append({"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]), "labels": list(labels)})
    return out


class Collator:
    """Pad a batch: input ids with the pad id, labels with -100 (lists; translation labels to their own longest);
    stack scalars (class ids, answer positions)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        out: dict[str, Any] = {}
        for key in batch[0]:
            if not isinstance(batch[0][key], list):
                out[key] = torch.tensor([b[key] for b in batch])
                continue
            fill = {"input_ids": self.pad_id, "labels": IGNORE}.get(key, 0)
            m = max(len(b[key]) for b in batch)  # each key to its own length: a translation's labels are not its input's
            out[key] = torch.tensor([list(b[key]) + [fill] * (m - len(b[key])) for b in batch])
        if "attention_mask" not in out:
            out["attention_mask"] = torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch])
        return out


def count_tokens(feats: list[dict[str, Any]]) -> int:
    return sum(len(f["input_ids"]) for f in feats)
