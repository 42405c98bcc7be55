"""`edgetune run BUNDLE`: minimal inference from a bundle, with the device-only install.

Imports only onnxruntime(-genai), numpy and tokenizers (through edgetune.device), never
torch or transformers. The bundle is verified against its manifest first.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click

from .. import console
from ..cli import common_options


def _open(path: Path, stack) -> Path:
    from ..archive import extract, is_archive, single_root

    if is_archive(path):
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetune-run-"))
        return single_root(extract(path, Path(tmp) / "bundle"))
    return path


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", "prompts", multiple=True, help="LLM: a prompt to answer (repeatable).")
@click.option("--chat", is_flag=True, help="LLM: interactive chat on stdin (history kept; empty line or EOF ends).")
@click.option("--raw", is_flag=True, help="LLM: no chat template, continue the prompt text as is.")
@click.option("--system", default=None, help="LLM: a system message for --prompt/--chat.")
@click.option("--text", "-x", "texts", multiple=True, help="Encoder: a text to classify (repeatable); none: one per stdin line.")
@click.option("--adapter", "-a", default=None, help="LLM: a runtime LoRA adapter shipped in the bundle, by name (<name>.onnx_adapter).")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1), help="LLM: new tokens at most.")
@click.option("--verify/--no-verify", "check", default=True, show_default=True, help="Check the bundle against its manifest first.")
@common_options
def run(bundle: Path, prompts: tuple[str, ...], chat: bool, raw: bool, system: str | None, texts: tuple[str, ...],
        adapter: str | None, max_tokens: int, check: bool) -> None:
    """Run the model of BUNDLE (folder or .tar.gz): generate/chat for LLMs, classify for encoders."""
    from contextlib import ExitStack

    from ..bundle import read_manifest, verify_or_raise
    from ..errors import BadInput

    with ExitStack() as stack:
        folder = _open(bundle, stack)
        if check:
            res = verify_or_raise(folder)
            console.log(f"[verify] ok: {res['files_checked']} files match the manifest")
        manifest = read_manifest(folder)
        target = folder / (manifest.get("target") or {}).get("file", "target.toml")
        target_arg = str(target) if target.is_file() else None
        kind = manifest.get("kind")
        if kind == "decoder":
            if texts:
                raise BadInput("--text is for encoder bundles; this bundle is an LLM", hint="use --prompt or --chat")
            _run_llm(folder, target_arg, prompts, chat, raw, system, max_tokens, adapter)
        elif kind == "encoder":
            if prompts or chat or adapter:
                raise BadInput("--prompt/--chat/--adapter are for LLM bundles; this bundle is an encoder", hint="use --text")
            _run_encoder(folder, target_arg, list(texts))
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
        console.emit({"bundle": str(folder), "kind": "decoder", "adapter": adapter, "results": results})
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
    t0 = time.perf_counter()
    preds = dev.classify(enc, texts)
    dt = time.perf_counter() - t0
    rows = [{"text": t, "label": lab, "probability": round(p, 4)} for t, (lab, p) in zip(texts, preds)]
    console.log(f"[run] {len(texts)} text(s) in {dt * 1000:.1f} ms")
    console.emit({"bundle": str(folder), "kind": "encoder", "results": rows},
                 lambda r: "\n".join(f"{x['label']}\t{x['probability']:.3f}\t{x['text']}" for x in r["results"]), summary=False)
