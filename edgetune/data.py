"""Reading data sets: JSONL, CSV, TSV, Parquet and plain text, with line-exact errors.

Pure Python (no torch): the device-side validator reads data sets with it too.

Record formats, detected from the fields of the first record (or forced with ``fmt``):

=================== ==================================================
``text``            ``{"text": ...}`` or a plain ``.txt`` file
``prompt_completion`` ``{"prompt": ..., "completion": ...}``
``messages``        ``{"messages": [{"role": ..., "content": ...}, ...]}``
``classification``  ``{"text": ..., "label": ...}`` (CSV/TSV columns too)
``tokens``          ``{"tokens": [...], "tags": [...]}`` (token classification)
``qa``              ``{"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}``
                    (SQuAD; ``answers`` may also be a list of ``{"text", "answer_start"}``)
``translation``     ``{"source": ..., "target": ...}`` (sequence-to-sequence pairs)
=================== ==================================================

A malformed line raises :class:`BadInput` naming the file and line number.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput, MissingDependency

FORMATS = ("text", "prompt_completion", "messages", "classification", "tokens", "qa", "translation")
_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Dataset:
    path: Path
    format: str
    records: list[dict[str, Any]]
    # original 1-based line numbers (or row numbers) of each record, for error messages
    lines: list[int]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels (classification) or tags (tokens)."""
        if self.format == "classification":
            return sorted({str(r["label"]) for r in self.records})
        if self.format == "tokens":
            return sorted({str(t) for r in self.records for t in r["tags"]})
        return []


def _bad(path: Path, line: int | None, problem: str, hint: str) -> BadInput:
    where = f"{path}:{line}" if line else str(path)
    return BadInput(f"{where}: {problem}", hint=hint)


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise BadInput naming file:line:column."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _bad(p, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {col}: {exc.reason})",
                   "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(path, n, f"not valid JSON ({exc.msg} at column {exc.colno})", "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise _bad(path, n, f"expected a JSON object, got {type(obj).__name__}", "one JSON object per line")
        yield n, obj


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import io

    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        header = next(reader, None)
        if not header:
            return
        header = [h.strip() for h in header]
        for row in reader:
            n = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise _bad(path, n, f"has {len(row)} columns, the header has {len(header)} ({', '.join(header)})", "fix the row or quote the field")
            yield n, dict(zip(header, row))


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency("reading Parquet needs pyarrow", hint="pip install pyarrow") from None
    for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield n, row


def _iter_text(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # a plain text file is one record: the whole text (chunked later by the consumer)
    yield 1, {"text": read_utf8(path)}


def detect_format(record: dict[str, Any]) -> str | None:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"tokens", "tags"} <= keys:
        return "tokens"
    if {"question", "context"} <= keys:
        return "qa"
    if {"source", "target"} <= keys:
        return "translation"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _check(path: Path, n: int, rec: dict[str, Any], fmt: str) -> dict[str, Any]:
    def need_str(field: str) -> str:
        v = rec.get(field)
        if not isinstance(v, str) or not v.strip():
            raise _bad(path, n, f"field '{field}' must be a non-empty string", f"every '{fmt}' record needs '{field}'")
        return v

    if fmt == "text":
        return {"text": need_str("text")}
    if fmt == "prompt_completion":
        return {"prompt": need_str("prompt"), "completion": need_str("completion")}
    if fmt == "classification":
        label = rec.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise _bad(path, n, "field 'label' is missing or empty", "every classification record needs 'text' and 'label'")
        return {"text": need_str("text"), "label": label.strip() if isinstance(label, str) else label}
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad(path, n, "field 'messages' must be a non-empty list", "use [{\"role\": \"user\", \"content\": \"...\"}, ...]")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise _bad(path, n, f"message {i} needs a role in {sorted(_ROLES)} and a string content", "fix the message")
        return {"messages": msgs}
    if fmt == "tokens":
        toks, tags = rec.get("tokens"), rec.get("tags")
        if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags) or not toks:
            raise _bad(path, n, "'tokens' and 'tags' must be non-empty lists of equal length", "one tag per token")
        return {"tokens": [str(t) for t in toks], "tags": [str(t) for t in tags]}
    if fmt == "qa":
        return {"question": need_str("question"), "context": need_str("context"),
                "answers": _qa_answers(path, n, rec.get("answers"), rec["context"])}
    if fmt == "translation":
        return {"source": need_str("source"), "target": need_str("target")}
    raise BadInput(f"unknown data format '{fmt}'", hint=f"choose one of: {', '.join(FORMATS)}")


_QA_HINT = ('SQuAD form: "answers": {"text": ["..."], "answer_start": [N]} (or [{"text": "...", "answer_start": N}]) '
            "where context[N:N+len(text)] == text")


def _qa_answers(path: Path, n: int, answers: Any, context: str) -> list[dict[str, Any]]:
    """The gold answers of a SQuAD record as [{"text", "answer_start"}], each checked against the context."""
    if isinstance(answers, dict):
        t, s = answers.get("text"), answers.get("answer_start")
        if not isinstance(t, list) or not isinstance(s, list) or len(t) != len(s):
            raise _bad(path, n, "'answers' needs lists 'text' and 'answer_start' of equal length", _QA_HINT)
        answers = [{"text": a, "answer_start": b} for a, b in zip(t, s)]
    if not isinstance(answers, list) or not answers:
        raise _bad(path, n, "'answers' is missing or empty (unanswerable questions are not supported)", _QA_HINT)
    out = []
    for i, a in enumerate(answers):
        text = a.get("text") if isinstance(a, dict) else None
        start = a.get("answer_start") if isinstance(a, dict) else None
        if not isinstance(text, str) or not text.strip() or isinstance(start, bool) or not isinstance(start, int):
            raise _bad(path, n, f"answer {i} needs a non-empty string 'text' and an integer 'answer_start'", _QA_HINT)
        if not 0 <= start <= len(context) - len(text) or context[start : start + len(text)] != text:
            raise _bad(path, n, f"answer {i} {text[:40]!r} is not at character {start} of the context "
                                f"(found {context[max(0, start):max(0, start) + len(text)][:40]!r})", _QA_HINT)
        out.append({"text": text, "answer_start": start})
    return out


def load_dataset(path: str | os.PathLike, *, fmt: str | None = None, limit: int | None = None) -> Dataset:
    """Read and check every record; raise BadInput for a missing/empty file or a bad line."""
    p = Path(path)
    if not p.is_file():
        from .errors import not_a_file

        raise not_a_file(p, "data file")
    if p.stat().st_size == 0:
        raise BadInput(f"data file is empty: {p}", hint="give a file with at least one record")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        it = _iter_jsonl(p)
    elif suffix == ".csv":
        it = _iter_delimited(p, ",")
    elif suffix == ".tsv":
        it = _iter_delimited(p, "\t")
    elif suffix == ".parquet":
        it = _iter_parquet(p)
    elif suffix in (".txt", ".text", ".md"):
        it = _iter_text(p)
    else:
        raise BadInput(f"unsupported data file type '{suffix}' ({p})", hint="use .jsonl, .csv, .tsv, .parquet or .txt")
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for n, rec in it:
        if fmt is None:
            fmt = detect_format(rec)
            if fmt is None:
                raise _bad(p, n, f"cannot tell the record format from fields {sorted(rec)}", f"use fields of one of: {', '.join(FORMATS)}")
        records.append(_check(p, n, rec, fmt))
        lines.append(n)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise BadInput(f"data file has no records: {p}", hint="give a file with at least one record")
    return Dataset(path=p, format=fmt or "text", records=records, lines=lines)


def split(ds: Dataset, eval_fraction: float = 0.1, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic shuffled train/eval split (at least one eval record when possible)."""
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(idx) * eval_fraction)) if len(idx) > 1 and eval_fraction > 0 else 0
    ev, tr = idx[:n_eval], idx[n_eval:]

    def take(ids: list[int]) -> Dataset:
        return Dataset(ds.path, ds.format, [ds.records[i] for i in ids], [ds.lines[i] for i in ids])

    return take(tr), take(ev)


def texts(ds: Dataset) -> list[str]:
    """Plain strings of a data set (for perplexity/calibration): text, prompt+completion, contents."""
    out: list[str] = []
    for r in ds.records:
        if "text" in r:
            out.append(r["text"])
        elif "prompt" in r:
            out.append(r["prompt"] + r["completion"])
        elif "messages" in r:
            out.append("\n".join(m["content"] for m in r["messages"]))
        elif "tokens" in r:
            out.append(" ".join(r["tokens"]))
        elif "question" in r:
            out.append(r["question"] + "\n" + r["context"])
        elif "source" in r:
            out.append(r["source"])
    return out


def task_examples(ds: Dataset) -> list[dict[str, Any]]:
    """Examples with a gold answer: chat ``messages`` whose last turn is the assistant's (the
    prompt is every turn before it, rendered with the chat template) and prompt/completion pairs
    (the prompt is used as raw text, as fine-tuning does). Empty when the data has no gold answers.

    Each: ``{"prompt": str | list[message], "chat": bool, "gold": str}``.
    """
    out: list[dict[str, Any]] = []
    if ds.format == "messages":
        for r in ds.records:
            msgs = r["messages"]
            if len(msgs) >= 2 and msgs[-1]["role"] == "assistant":
                out.append({"prompt": msgs[:-1], "chat": True, "gold": msgs[-1]["content"]})
    elif ds.format == "prompt_completion":
        out = [{"prompt": r["prompt"], "chat": False, "gold": r["completion"]} for r in ds.records]
    return out


def content_key(rec: dict[str, Any]) -> str:
    """What makes two examples the same input, for held-out checks: the model's input with case
    and whitespace folded (chat turns before the last assistant answer, the prompt, the text, the
    words); labels and answers are left out, since the same input with another label is still seen."""
    def fold(s: str) -> str:
        return " ".join(str(s).lower().split())

    if "messages" in rec:
        msgs = rec["messages"]
        if len(msgs) >= 2 and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return "m:" + json.dumps([[m["role"], fold(m["content"])] for m in msgs], ensure_ascii=False)
    if "prompt" in rec:
        return "p:" + fold(rec["prompt"])
    if "tokens" in rec:
        return "w:" + fold(" ".join(rec["tokens"]))
    if "question" in rec:
        return "q:" + fold(rec["question"]) + "\x00" + fold(rec["context"])
    if "source" in rec:
        return "s:" + fold(rec["source"])
    return "t:" + fold(rec.get("text", ""))


def parse_rows(spec: str) -> tuple[int, int | None]:
    """'a-b' / 'a-' / 'a' (records, 1-based, inclusive) -> (start index, end index or None)."""
    text = str(spec).strip()
    a, sep, b = text.partition("-")
    try:
        start = int(a)
        end = (int(b) if b.strip() else None) if sep else start
    except ValueError:
        raise BadInput(f"rows = {spec!r} is not a record range", hint="use 'FIRST-LAST' (1-based, inclusive), e.g. '1501-2000', or '1501-' for the rest") from None
    if start < 1 or (end is not None and end < start):
        raise BadInput(f"rows = {spec!r} is not a valid range", hint="records count from 1 and FIRST <= LAST")
    return start - 1, end


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSONL atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, p)
    return p
