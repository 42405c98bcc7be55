"""`make bench`: the LLM section's inputs: the evaluation text (the tinyshakespeare tail, benchmarks.texts' "seen"
text), the calibration file (its head, the only "tune" text, checked against every judge text) and the fp32
reference pack (PyTorch) the exports are scored against."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import texts
from .common import key, log

TEXT = texts.SHAKESPEARE  # the bench's text roles (tune / seen / judge): benchmarks.texts


def eval_text(s: dict) -> tuple[str | None, str]:
    """The tinyshakespeare tail (texts.py: the "seen" text, recipes were tuned on it), cut to what the scored tokens need."""
    split = texts.shakespeare_split(TEXT)
    if split is None:
        return None, f"{TEXT} not present: perplexity/KL/top-1 skipped (the data lives in ../shared/data next to the repository)"
    _, tail, start = split
    cut = tail.find("\n", s["eval_tokens"] * 8)  # ~3.5 characters per token here; ample margin, checked below
    return (tail[:cut] if cut > 0 else tail), f"last 10% of tinyshakespeare.txt (from character {start}; seen: recipes were tuned on it)"


def calibration_file(root: Path) -> Path | None:
    """Calibration text for algorithms that need it (AWQ, GPTQ-like, --recipe auto, mixed): the head of tinyshakespeare
    (texts.py's only "tune" text), never a scored one; checked against every judge text before it is handed on."""
    split = texts.shakespeare_split(TEXT)
    if split is None:
        return None
    paras = [p.strip() for p in split[0].split("\n\n") if len(p.strip()) > 200][:128]
    out = root / "calibration.jsonl"
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    return texts.check_calibration_file(out)


def reference_pack(hf: Path, text: str, s: dict, root: Path, fresh: bool) -> Path:
    from edgetune import console
    from edgetune.validate.reference import build_decoder_reference, is_pack, text_sha

    k = key({"model": hf.name, "text": text_sha(text), **{n: s[n] for n in ("eval_tokens", "window", "stride", "method", "topk", "generation_tokens")}})
    pack_dir = root / "reference" / f"pack-{k}"
    if not fresh and is_pack(pack_dir):
        return pack_dir
    console.configure(quiet=True)
    t0 = time.perf_counter()
    pack = build_decoder_reference(hf, text, window=s["window"], stride=s["stride"], method=s["method"], topk=s["topk"],
                                   max_new_tokens=s["generation_tokens"], eval_tokens=s["eval_tokens"])
    if pack.meta["n_tokens"] < s["eval_tokens"]:
        log(f"note: the evaluation text gave {pack.meta['n_tokens']} tokens (< {s['eval_tokens']})")
    shutil.rmtree(pack_dir, ignore_errors=True)
    pack.save(pack_dir)
    log(f"fp32 reference (PyTorch): PPL {pack.meta['perplexity']:.3f} on {pack.meta['n_tokens']} tokens in {time.perf_counter() - t0:.0f} s")
    return pack_dir
