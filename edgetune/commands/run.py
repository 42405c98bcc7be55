"""`edgetune run BUNDLE`: minimal inference from a bundle, with the device-only install.

Imports only onnxruntime(-genai), numpy and tokenizers (through edgetune.device), never
torch or transformers. The bundle is verified against its manifest first (and with ``--key``
against the signer's public key: an unsigned or otherwise signed bundle is refused).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import console
from ..cli import common_options
from ..errors import BadInput


def _utf8(ctx: click.Context, param: click.Parameter, value):
    """Refuse text arguments that are not UTF-8: Python decodes such argv bytes to lone surrogates
    (surrogateescape), which the tokenizer rejects with a TypeError deep inside (exit 4)."""
    for i, text in enumerate(value if isinstance(value, tuple) else (value,) if value is not None else (), 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            ch = ord(text[exc.start])
            byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"character U+{ch:04X}"
            which = f" #{i}" if isinstance(value, tuple) and len(value) > 1 else ""
            raise BadInput(f"{param.opts[0]}{which} is not valid UTF-8 text ({byte} at character {exc.start})",
                           hint="pass UTF-8 text (check the terminal's or the script's encoding, e.g. LANG=C.UTF-8)") from None
    return value


def _text(ctx: click.Context, param: click.Parameter, value):
    """A text to run (a prompt, a text, a question, a context): UTF-8 and not blank. An empty one is nearly always
    an unset shell variable (`-p "$PROMPT"`), and the model would answer its chat template alone with made-up output."""
    _utf8(ctx, param, value)
    for i, text in enumerate(value, 1):
        if not text.strip():
            which = f" #{i}" if len(value) > 1 else ""
            raise BadInput(f"{param.opts[0]}{which} is empty", hint="pass the text to run (an unset shell variable gives an empty one)")
    return value


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", "prompts", multiple=True, callback=_text, help="LLM: a prompt to answer (repeatable).")
@click.option("--chat", is_flag=True, help="LLM: interactive chat on stdin (history kept; empty line or EOF ends).")
@click.option("--raw", is_flag=True, help="LLM: no chat template, continue the prompt text as is.")
@click.option("--system", default=None, callback=_utf8, help="LLM: a system message for --prompt/--chat.")
@click.option("--text", "-x", "texts", multiple=True, callback=_text,
              help="Encoder: a text to classify or tag; translation: a text to translate (repeatable); none: one per stdin line "
                   "(translation: plain lines or JSONL {\"source\": ...}).")
@click.option("--question", "-Q", "questions", multiple=True, callback=_text,
              help="Question-answering encoder: a question (repeatable); none: JSONL {\"question\", \"context\"} per stdin line.")
@click.option("--context", "-c", "contexts", multiple=True, callback=_text,
              help="Question-answering encoder: the text the answer is taken from (one for all questions, or one per --question).")
@click.option("--adapter", "-a", default=None, help="LLM: a runtime LoRA adapter shipped in the bundle, by name (<name>.onnx_adapter).")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1), help="LLM and translation: new tokens at most.")
@click.option("--verify/--no-verify", "check", default=True, show_default=True, help="Check the bundle against its manifest first.")
@click.option("--key", "key", type=click.Path(path_type=Path), default=None,
              help="Trusted Ed25519 public key: run only a bundle signed with it (unsigned or another key: exit 2).")
@common_options
def run(bundle: Path, prompts: tuple[str, ...], chat: bool, raw: bool, system: str | None, texts: tuple[str, ...],
        questions: tuple[str, ...], contexts: tuple[str, ...], adapter: str | None, max_tokens: int, check: bool,
        key: Path | None) -> None:
    """Run the model of BUNDLE (folder or .tar.gz): generate/chat for LLMs, classify, tag or answer for encoders."""
    from contextlib import ExitStack

    from ..bundle import read_manifest
    from .bundle_input import check as verify, unpack
    from ..errors import BadInput

    if key is not None:
        if not check:
            raise BadInput("--key and --no-verify contradict each other", hint="drop --no-verify: a signature proves nothing unless the files are checked")
        from ..signing import load_public_key

        key = load_public_key(key)  # before an archive is unpacked
    with ExitStack() as stack:
        folder = unpack(bundle, stack)
        if check:
            verify(folder, key)
        manifest = read_manifest(folder)
        from ..manifest_paths import resolve

        target = resolve(folder, manifest, "target.file", "target.toml")  # never a path outside the bundle, even with --no-verify
        resolve(folder, manifest, "model_dir", "model")
        target_arg = str(target) if target.is_file() else None
        kind = manifest.get("kind")
        if kind == "decoder":
            if texts or questions or contexts:
                raise BadInput("--text/--question/--context are for encoder bundles; this bundle is an LLM", hint="use --prompt or --chat")
            _run_llm(folder, target_arg, prompts, chat, raw, system, max_tokens, adapter)
        elif kind == "encoder":
            if prompts or chat or adapter:
                raise BadInput("--prompt/--chat/--adapter are for LLM bundles; this bundle is an encoder", hint="use --text")
            if manifest.get("task") == "question-answering":
                if texts:
                    raise BadInput("--text is for classifiers and taggers; this bundle answers questions", hint="use --question and --context")
                _run_qa(folder, target_arg, list(questions), list(contexts))
            else:
                if questions or contexts:
                    raise BadInput(f"--question/--context are for question-answering bundles; this one is {manifest.get('task') or 'a classifier'}",
                                   hint="use --text")
                _run_encoder(folder, target_arg, list(texts))
        elif kind == "seq2seq":
            if prompts or chat or adapter or questions or contexts:
                raise BadInput("--prompt/--chat/--adapter/--question/--context do not apply to a translation bundle", hint='use -x "text"')
            _run_translation(folder, target_arg, list(texts), max_tokens)
        else:
            raise BadInput(f"{bundle}: unknown bundle kind '{kind}'", hint="rebuild the bundle with this edgetune")


def _run_llm(folder: Path, target: str | None, prompts, chat: bool, raw: bool, system: str | None, max_tokens: int,
             adapter: str | None = None) -> None:
    from ..device import llm as dev
    from ..errors import BadInput

    if not prompts and not chat:
        raise BadInput("nothing to run", hint="give --prompt TEXT (repeatable) or --chat")
    dev.check_prompt_length(folder / "model", prompts, max_tokens, system=system)  # before any native code sees them
    m = dev.load(folder / "model", target, adapter=adapter)
    with_adapter = f" with adapter {adapter}" if adapter else ""
    console.log(f"[run] loaded {folder.name}{with_adapter} in {m.load_time_s:.2f}s on {', '.join(m.providers)}")
    stream = None if console.MODE.json else (lambda piece: console.out(piece, end=""))

    def one(messages_or_text) -> dict:
        t0 = time.perf_counter()
        ids = dev.prompt_ids(m, messages_or_text, chat=not raw)
        pieces: list[str] = []
        ts = m.tokenizer.create_stream()

        def on_token(tok: int) -> None:
            piece = ts.decode(tok)
            pieces.append(piece)
            if stream:
                stream(piece)

        out_ids = dev.generate_ids(m, ids, max_tokens, on_token=on_token)
        dt = time.perf_counter() - t0
        if stream:
            console.out()
        return {"output": dev.decode(m, out_ids), "prompt_tokens": int(len(ids)), "new_tokens": len(out_ids),
                "seconds": round(dt, 3), "tokens_per_s": round(len(out_ids) / dt, 1) if dt > 0 else None}

    results = []
    if chat:
        history = [{"role": "system", "content": system}] if system else []
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            r = one(history if not raw else line)
            history.append({"role": "assistant", "content": r["output"]})
            results.append({"prompt": line, **r})
    for p in prompts:
        msg = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        results.append({"prompt": p, **one(p if raw else msg)})
    if console.MODE.json:
        console.emit({"bundle": str(folder), "kind": "decoder", "adapter": adapter, "load_s": round(m.load_time_s, 3),
                      "providers": list(m.providers), "results": results})
    for r in results:
        console.log(f"[run] {r['new_tokens']} tokens in {r['seconds']:.2f}s ({r['tokens_per_s']} tok/s)")


def _run_encoder(folder: Path, target: str | None, texts: list[str]) -> None:
    from ..device import encoder as dev
    from ..errors import BadInput

    if not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise BadInput("nothing to classify", hint="give --text TEXT (repeatable) or lines on stdin")
    enc = dev.load(folder / "model", target)
    if enc.task not in ("sequence-classification", "token-classification", "classification"):
        raise BadInput(f"this bundle's encoder has no task head ({enc.task}): nothing to classify or tag",
                       hint="export a model fine-tuned for sequence or token classification")
    t0 = time.perf_counter()
    if enc.task == "token-classification":
        rows = [{"text": t, "entities": ents} for t, ents in zip(texts, dev.tag_entities(enc, texts))]
        human = lambda r: "\n".join(  # noqa: E731
            f"{x['text']}\n" + "".join(f"  {e['label']}\t{e['score']:.3f}\t{e['start']}:{e['end']}\t{e['text']}\n" for e in x["entities"])
            + ("" if x["entities"] else "  (no entities)\n") for x in r["results"]).rstrip("\n")
    else:
        rows = [{"text": t, "label": lab, "probability": round(p, 4)} for t, (lab, p) in zip(texts, dev.classify(enc, texts))]
        human = lambda r: "\n".join(f"{x['label']}\t{x['probability']:.3f}\t{x['text']}" for x in r["results"])  # noqa: E731
    dt = time.perf_counter() - t0
    console.log(f"[run] {len(texts)} text(s) in {dt * 1000:.1f} ms")
    console.emit({"bundle": str(folder), "kind": "encoder", "task": enc.task, "results": rows}, human, summary=False)


def _qa_pairs(questions: list[str], contexts: list[str]) -> list[tuple[str, str]]:
    """(question, context) pairs from the options, or from JSONL on stdin; bad input is exit 2 before any model is loaded."""
    import json

    if questions or contexts:
        if not questions or not contexts:
            raise BadInput("--question needs --context (and --context needs --question)", hint='e.g. -Q "Who?" -c "Anna wrote it."')
        if len(contexts) == 1:
            contexts = contexts * len(questions)
        if len(contexts) != len(questions):
            raise BadInput(f"{len(questions)} --question but {len(contexts)} --context", hint="give one --context for all questions, or one per question")
        pairs = list(zip(questions, contexts))
    else:
        pairs = []
        for n, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"stdin:{n}: not valid JSON ({exc.msg} at column {exc.colno})",
                               hint='one {"question": ..., "context": ...} object per line') from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec[k].strip() for k in ("question", "context")):
                raise BadInput(f"stdin:{n}: needs non-empty string fields 'question' and 'context'",
                               hint='one {"question": ..., "context": ...} object per line')
            pairs.append((rec["question"], rec["context"]))
    if not pairs:
        raise BadInput("nothing to answer", hint="give --question and --context, or JSONL {question, context} lines on stdin")
    for i, (q, c) in enumerate(pairs, 1):
        if not q.strip() or not c.strip():
            raise BadInput(f"question/context #{i} is empty", hint="give non-empty texts")
    return pairs


def _run_qa(folder: Path, target: str | None, questions: list[str], contexts: list[str]) -> None:
    from ..device import encoder as dev
    from ..device import qa

    pairs = _qa_pairs(questions, contexts)
    enc = dev.load(folder / "model", target)
    t0 = time.perf_counter()
    rows = []
    for q, c in pairs:
        a = qa.answer(enc, q, c)
        rows.append({"question": q, "answer": a["answer"], "score": round(a["score"], 4), "start": a["start"], "end": a["end"],
                     "windows": a["windows"]})
    dt = time.perf_counter() - t0
    console.log(f"[run] {len(rows)} question(s) in {dt * 1000:.1f} ms")
    human = lambda r: "\n".join(  # noqa: E731
        f"{x['question']}\n  {x['answer']}\t{x['score']:.3f}\t{x['start']}:{x['end']}" for x in r["results"])
    console.emit({"bundle": str(folder), "kind": "encoder", "task": enc.task, "results": rows}, human, summary=False)


def _translation_sources(texts: list[str]) -> list[str]:
    """The texts to translate: --text, else stdin lines (plain text, or JSONL with a "source" field)."""
    import json

    if texts:
        out = texts
    else:
        out = []
        for n, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInput(f"stdin:{n}: not valid JSON ({exc.msg} at column {exc.colno})",
                                   hint='one {"source": ...} object per line, or plain text lines') from None
                if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
                    raise BadInput(f"stdin:{n}: needs a string field 'source'", hint='one {"source": ...} object per line')
                out.append(rec["source"])
            else:
                out.append(line.rstrip("\n"))
    if not out:
        raise BadInput("nothing to translate", hint='give -x "text", or lines on stdin')
    for i, t in enumerate(out, 1):
        if not t.strip():
            raise BadInput(f"text #{i} is empty", hint="give non-empty texts")
    return out


def _run_translation(folder: Path, target: str | None, texts: list[str], max_tokens: int) -> None:
    from ..device import seq2seq

    sources = _translation_sources(texts)
    tr = seq2seq.load(folder / "model", target)
    t0 = time.perf_counter()
    rows = []
    for src, r in zip(sources, tr.translate(sources, max_new_tokens=max_tokens)):
        rows.append({"source": src, "translation": r["translation"], "tokens": len(r["ids"]), "truncated": r["truncated"]})
    dt = time.perf_counter() - t0
    console.log(f"[run] {len(rows)} text(s) in {dt * 1000:.1f} ms")
    human = lambda r: "\n".join(x["translation"] + ("  [cut at --max-tokens]" if x["truncated"] else "") for x in r["results"])  # noqa: E731
    console.emit({"bundle": str(folder), "kind": "seq2seq", "task": "translation", "results": rows}, human, summary=False)
