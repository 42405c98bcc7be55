"""`validate` for translation exports: chrF and BLEU (sacrebleu) vs the gold targets and vs the reference.

The model (``edgetune.device.seq2seq``: greedy decoding over its ONNX graphs) translates every source of
the data (``{"source", "target"}`` records). The reference is PyTorch's greedy ``generate`` of an HF
folder (the fp32 merged model) or the device decoding of another export (int8 measured against fp32),
run on **the same source token ids** (the validated model's tokenizer.json and prefix) and new-token caps (twice
the gold target's tokens + 8, see :func:`caps`), so a correct fp32
graph agrees token for token. The pack keeps the examples and the reference's ids and texts, so a device
re-validates a bundle without PyTorch.

``report["accuracy"]``: ``metric: "chrf"``, ``chrf`` / ``bleu`` vs gold, ``reference_chrf`` / ``reference_bleu``
vs gold, ``chrf_vs_reference`` / ``bleu_vs_reference`` (the reference's translations as the gold),
``agreement_with_reference`` (identical token sequences), ``token_agreement`` (positions where both
emitted the same token, over the longer sequence), ``accuracy`` = chrF and ``accuracy_drop`` = reference
chrF - model chrF (points, the profile's ``max_accuracy_drop`` budget).

sacrebleu is a host package (the ``host`` extra): a device validating a translation bundle needs it too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, require

SCHEMA_VERSION = 1


def examples_of(ds) -> list[dict[str, str]]:
    if ds.format != "translation":
        raise BadInput(f"{ds.path}: a translation model is validated on source/target pairs, got '{ds.format}' records",
                       hint='give JSONL {"source": ..., "target": ...}')
    return [{"source": r["source"], "target": r["target"]} for r in ds.records]


def caps(translator, examples: list[dict[str, str]]) -> list[int]:
    """New-token cap per example: twice the gold target's tokens + 8 (at most the export's ``max_new_tokens``). A longer
    output is wrong anyway, and a model that never says end-of-sequence (a random one) stays cheap to validate."""
    top = int(translator.config["max_new_tokens"])
    return [min(top, 2 * len(translator.target_tokenizer.encode(e["target"]).ids) + 8) for e in examples]


def build_reference(source, examples: list[dict[str, str]], translator) -> Any:
    """The reference's greedy translations of ``examples`` on ``translator``'s source ids (a Pack)."""
    from ..artifacts import package_versions
    from ..device import seq2seq as S
    from .reference import SCHEMA_VERSION as PACK_SCHEMA
    from .reference import Pack, _ragged, source_kind, text_sha

    ids = [translator.source_ids(e["source"]) for e in examples]
    limits = caps(translator, examples)
    if S.is_translation(source):
        ref = S.load(source)
        out = [ref.greedy_ids(i, max_new_tokens=c) for i, c in zip(ids, limits)]
        how = "onnxruntime"
    elif source_kind(source) == "hf":
        from ..export.seq2seq import torch_export as T

        model = T.load(Path(source))
        suppress = list(translator.config.get("suppress_token_ids") or [])
        out = [T.torch_greedy(model, [i], max_new_tokens=c, suppress=suppress)[0] for i, c in zip(ids, limits)]
        how = "torch"
    else:
        raise BadInput(f"reference {source} is not a translation model", hint="give the fp32 merged HF folder or an fp32 translation export")
    texts = [translator.detokenize(o) for o in out]
    data, off = _ragged(out)
    meta = {"schema_version": PACK_SCHEMA, "kind": "seq2seq", "task": "translation", "source": str(source), "computed_with": how,
            "caps": limits, "prefix": translator.config.get("prefix", ""), "examples": examples, "translations": texts,
            "text_sha256": text_sha("\x00".join(e["source"] for e in examples)), "versions": package_versions()}
    return Pack(meta, {"out_ids": data, "out_offsets": off})


def _scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    sacrebleu = require("sacrebleu", purpose="chrF/BLEU of translations")
    return {"chrf": round(float(sacrebleu.corpus_chrf(hyps, [refs]).score), 3),
            "bleu": round(float(sacrebleu.corpus_bleu(hyps, [refs]).score), 3)}


def _token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    return same / total if total else 1.0


def evaluate(folder: Path, target, pack, examples: list[dict[str, str]] | None, report: dict[str, Any]):
    """Translate, score and fill ``report`` (accuracy, per-sentence latency); returns (rows, model figures,
    reference figures or None) for the report's task block."""
    from .. import console
    from ..device import seq2seq as S

    tr = S.load(folder, target)
    report["runtime"]["providers"] = tr.encoder.get_providers()
    if pack is not None and examples is None:
        examples = pack.meta["examples"]
    if examples is None:
        raise BadInput("validating a translation model needs --data with source/target pairs (or a reference pack)",
                       hint='JSONL {"source": ..., "target": ...}')
    if pack is not None and [e["source"] for e in pack.meta["examples"]] != [e["source"] for e in examples]:
        raise BadInput("--data is not the data the reference pack was made from", hint="omit --data to use the pack's examples")
    limits = pack.meta["caps"] if pack is not None else caps(tr, examples)
    got, times = [], []
    for e, cap in zip(console.progress(examples, desc="translations"), limits):
        t0 = time.perf_counter()
        got.append(tr.translate([e["source"]], max_new_tokens=int(cap))[0])
        times.append((time.perf_counter() - t0) * 1000)
    hyps, golds = [g["translation"] for g in got], [e["target"] for e in examples]
    sm = _scores(hyps, golds)
    acc: dict[str, Any] = {"metric": "chrf", "examples": len(examples), **sm, "accuracy": sm["chrf"],
                           "truncated": sum(g["truncated"] for g in got), "prefix": tr.config.get("prefix", ""),
                           "new_token_caps": "2 x gold tokens + 8"}
    ref_texts = None
    if pack is not None:
        ref_ids = [list(map(int, r)) for r in pack.ragged("out")]
        ref_texts = pack.meta["translations"]
        sr = _scores(ref_texts, golds)
        vs = _scores(hyps, ref_texts)
        same = [g["ids"] == r for g, r in zip(got, ref_ids)]
        acc.update(reference_chrf=sr["chrf"], reference_bleu=sr["bleu"], reference_accuracy=sr["chrf"],
                   chrf_vs_reference=vs["chrf"], bleu_vs_reference=vs["bleu"],
                   accuracy_drop=round(sr["chrf"] - sm["chrf"], 3), agreement_with_reference=sum(same) / len(same),
                   token_agreement=round(_token_agreement([g["ids"] for g in got], ref_ids), 4))
    report["accuracy"] = acc
    rows = []
    for i, (e, g) in enumerate(zip(examples, got)):
        row = {"index": i, "prompt": e["source"], "gold": e["target"], "model": g["translation"],
               "model_correct": g["translation"].strip() == e["target"].strip()}
        if ref_texts is not None:
            row.update(reference=ref_texts[i], reference_correct=ref_texts[i].strip() == e["target"].strip())
        rows.append(row)
    mfig = {"examples": len(examples), "chrf": sm["chrf"], "bleu": sm["bleu"]}
    rfig = {"examples": len(examples), "chrf": acc["reference_chrf"], "bleu": acc["reference_bleu"]} if pack is not None else None
    arr = np.asarray(times)
    stats = {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}
    report["translation_latency"] = {"latency_ms": {**stats, "std": float(arr.std()), "n": len(times)},
                                     "load_time_s": round(tr.load_time_s, 3), "sentences": len(times)}
    return rows, mfig, rfig
