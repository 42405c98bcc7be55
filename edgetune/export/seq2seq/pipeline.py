"""`export` of a translation model (Marian, T5 family): encoder + decoder-with-past ONNX graphs, proven, int8.

Steps, each in the stage's temp folder (nothing is left that looks complete on failure):

1. tokenizer check: the device reads ``tokenizer.json`` only (``tokenizers``). T5 ships one; most
   Marian (opus-mt) releases have only SentencePiece files (``source.spm``/``target.spm`` + ``vocab.json``)
   and transformers 5.25 has no converter for them (``MarianTokenizer`` is the slow SentencePiece class,
   not in ``convert_slow_tokenizer``): such a folder is refused with exit 2 naming the fix.
2. fp32 graphs with ``torch.onnx`` (``edgetune.export.seq2seq.torch_export``).
3. the proof: greedy translation through the graphs (``edgetune.device.seq2seq``, the device's own code)
   equals PyTorch's greedy ``generate`` token for token on held sources, and every step's logits match
   PyTorch's teacher-forced logits within ``PARITY_TOLERANCE``; a float graph that fails is exit 1.
4. ``int8``: onnxruntime dynamic int8 (QOperator, MatMulInteger) on both graphs, measured with the same
   proof against PyTorch (recorded, not a gate: int8 may pick another token on a near tie).

The record's ``results`` has ``kind: "seq2seq"``, ``task: "translation"``, the special ids, prefix and
lengths (also written to ``seq2seq.json`` for the device), ``parity`` and ``int8_parity``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ... import console
from ...artifacts import stage_output
from ...errors import BadInput, CheckFailed

PRECISIONS = ("fp32", "int8-dynamic")
ALIASES = {"int8": "int8-dynamic"}
PARITY_TOLERANCE = 1e-3  # |onnx - torch| / max(1, |logit|) on every decoder step, fp32
PROOF_NEW_TOKENS = 24
HELD_SOURCES = ("The house is small.", "Where is the station?", "We read a book together and drink coffee in the morning.",
                "Numbers: 1, 2, 3.")
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


def _size_mb(p: Path) -> float:
    return round(p.stat().st_size / 2**20, 3)


def read_prefix(folder: Path) -> str:
    """The task prefix the adapter was trained with (``edgetune.json`` of a merged folder, or ``seq2seq_prefix.txt``)."""
    from ...artifacts import read_record

    rec = read_record(folder) or {}
    for key in ("results", "options"):
        p = (rec.get(key) or {}).get("source_prefix")
        if isinstance(p, str):
            return p
    f = folder / "source_prefix.txt"
    return f.read_text(encoding="utf-8") if f.is_file() else ""


def export_seq2seq(model_dir: str | os.PathLike, out: str | os.PathLike, *, target, precision: str | None = None,
                   task: str | None = None, prefix: str | None = None, max_new_tokens: int = 128) -> Path:
    """Export the Marian/T5 folder ``model_dir`` to ``out`` for ``target`` (fp32 or int8 dynamic); returns ``out``."""
    from ...device import seq2seq as S
    from ..encoder import quantize
    from ...model_input import check_seq2seq_tokenizer, inspect
    from ...plan import encoder_precision
    from ...targets import resolve
    from . import torch_export

    target = resolve(target)
    info = inspect(model_dir)
    torch_export.check_architecture(info.config, info.path)
    if task not in (None, "translation"):
        raise BadInput(f"task '{task}' does not apply to a {info.model_type} sequence-to-sequence model", hint="use --task translation or omit it")
    precision = ALIASES.get(precision or "", precision)
    if precision is None:
        precision = encoder_precision(target)
        precision = precision if precision in PRECISIONS else "int8-dynamic"
    if precision not in PRECISIONS:
        raise BadInput(f"precision '{precision}' is not available for translation models",
                       hint=f"choose one of: {', '.join(PRECISIONS)} (int8 = dynamic int8 of both graphs)")
    if target.graph.static_shapes:
        raise BadInput(f"target {target.name} wants static shapes; the translation graphs have a growing decoder cache",
                       hint="export for a CPU/GPU profile with dynamic shapes (e.g. cpu-x86)")
    check_seq2seq_tokenizer(info.path, info.config)
    prefix = read_prefix(info.path) if prefix is None else prefix
    int8 = quantize.Int8Options.from_target(target)
    options = {"target": target.model_dump(mode="json", exclude={"source", "description", "budgets"}),
               "precision": precision, "task": "translation", "prefix": prefix, "max_new_tokens": max_new_tokens,
               "int8": int8.__dict__}
    with console.step(f"export translation {info.path.name} -> {precision} for {target.name}"), \
            stage_output(out, "export", inputs={"model": info.path}, options=options) as run:
        res = run.results
        model = torch_export.load(info.path)
        cfg = model.config
        gen = getattr(model, "generation_config", None)
        suppress = sorted({int(w[0]) for w in (getattr(gen, "bad_words_ids", None) or []) if len(w) == 1})
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 512)
        facts = {"task": "translation", "model_type": info.model_type, "prefix": prefix,
                 "decoder_start_token_id": int(start), "eos_token_id": int(cfg.eos_token_id), "pad_token_id": int(cfg.pad_token_id),
                 "suppress_token_ids": suppress, "max_source_tokens": max_pos, "max_new_tokens": int(max_new_tokens),
                 "layers": torch_export.layout(cfg).layers}
        res.update(kind="seq2seq", precision=precision, target=target.name, opset=target.graph.opset,
                   execution_provider=target.runtime.execution_provider, static_shapes=False, **facts)
        fp32 = run.dir / "fp32"
        fp32.mkdir()
        with console.step("torch.onnx export (encoder, decoder with past)"):
            res["exporter"] = torch_export.export_graphs(model, fp32, opset=target.graph.opset)
        _write_side_files(info.path, fp32, facts)
        tr = S.load(fp32)
        sources = [tr.source_ids(t) for t in HELD_SOURCES]
        res["tokenizer_parity"] = _tokenizer_parity(info.path, tr, prefix)
        with console.step("proof vs PyTorch greedy generate"):
            parity = torch_export.prove(model, fp32, sources, max_new_tokens=PROOF_NEW_TOKENS, suppress=suppress,
                                        tolerance=PARITY_TOLERANCE)
        res["parity"] = {**parity, "sources": list(HELD_SOURCES)}
        if not parity["passed"]:
            raise CheckFailed(f"the fp32 translation graphs disagree with PyTorch (tokens {parity['same_tokens']}/{parity['sources']} "
                              f"equal, max relative logit diff {parity['max_rel_logit_diff']:.3g})",
                              hint="report this as a bug with the model", result=parity)
        res["fp32_size_mb"] = round(sum(_size_mb(fp32 / g) for g in S.GRAPHS), 3)
        if precision == "fp32":
            for name in os.listdir(fp32):
                shutil.move(str(fp32 / name), str(run.dir / name))
        else:
            with console.step("int8 dynamic (encoder, decoder)"):
                for g in S.GRAPHS:
                    res.setdefault("quantization", {})[g] = quantize.quantize_dynamic_int8(fp32 / g, run.dir / g, int8)
                _write_side_files(info.path, run.dir, facts)
                res["int8_parity"] = torch_export.prove(model, run.dir, sources, max_new_tokens=PROOF_NEW_TOKENS,
                                                        suppress=suppress, tolerance=PARITY_TOLERANCE)
        shutil.rmtree(fp32, ignore_errors=True)
        res["size_mb"] = round(sum(_size_mb(run.dir / g) for g in S.GRAPHS), 3)
    return Path(out)


def _tokenizer_parity(folder: Path, tr, prefix: str) -> dict[str, Any]:
    """The device's tokenizer.json encodes the held sources (with the prefix) as transformers' tokenizer does, both
    sides; a difference is exit 1: the proof runs both models on the device's ids, so it would not show."""
    from ...errors import require

    transformers = require("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bad = []
    for t in HELD_SOURCES:
        if tr.source_ids(t) != list(tok(prefix + t, truncation=True, max_length=int(tr.config["max_source_tokens"]))["input_ids"]):
            bad.append(("source", t))
        if tr.target_tokenizer.encode(t).ids != list(tok(text_target=t)["input_ids"]):
            bad.append(("target", t))
    if bad:
        raise CheckFailed(f"the tokenizer.json the device uses encodes the {bad[0][0]} side of {bad[0][1]!r} differently from "
                          f"transformers' {type(tok).__name__}",
                          hint="ship a tokenizer.json made from the model's own tokenizer (tokenizer.save_pretrained)")
    return {"texts": len(HELD_SOURCES), "sides": ["source", "target"], "mismatches": 0}


def _write_side_files(src: Path, dst: Path, facts: dict[str, Any]) -> None:
    """tokenizer.json (+ config/tokenizer side files) and seq2seq.json next to the graphs."""
    from ...device.seq2seq import CONFIG

    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    if (src / "target_tokenizer.json").is_file():
        shutil.copyfile(src / "target_tokenizer.json", dst / "target_tokenizer.json")
    for name in TOKENIZER_SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    (dst / CONFIG).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
