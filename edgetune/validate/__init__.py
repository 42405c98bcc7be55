"""The validate stage: accuracy vs a reference, tokenizer parity, latency and memory, budgets.

``validate(model, target=..., reference=..., data=..., out=...)`` writes a report folder
(``report.json`` with ``schema_version``, ``report.md``, PNG plots, the reference pack under
``reference/`` so the device can re-run without the reference model) and returns the report.
A missed budget or a failed check raises :class:`CheckFailed` (exit 1) after the report is written.

With a stored reference pack this module imports only the device stack (onnxruntime(-genai),
numpy, tokenizers); torch is needed only to compute a reference from an HF folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifacts, console
from ..errors import BadInput, CheckFailed
from ..targets import resolve

DEFAULTS: dict[str, Any] = {
    "window": 512,          # perplexity window (tokens); capped at the model's context length
    "stride": None,         # sliding stride; default window // 2
    "method": "sliding",    # or "chunked" (llama.cpp's llama-perplexity)
    "eval_tokens": 2048,    # tokens of the data scored (from its start)
    "topk": 64,             # reference top-k stored for KL
    "max_tokens": 32,       # new tokens per prompt (generation agreement) and decode length (latency)
    "prompt_tokens": 128,   # prompt length of the latency run
    "repeats": 5,
    "warmup": 1,
    "batch": 1,
    "latency": True,
    "task_examples": None,  # use only the first N examples with gold answers (None: all)
    "failing_examples": 5,  # failing task examples listed side by side in the report
    # The target's execution provider missing on this machine: True = fatal (exit 3); False = a
    # cross-build: accuracy on the CPU provider with the same graph, latency "not measured".
    "require_device": True,
}
# The smallest value each numeric option takes (checked up front by the CLI, validate() and the build
# config): `--repeats 0 --max-tokens 0` once ran four minutes before the latency run failed.
MINIMUM: dict[str, int] = {"window": 2, "stride": 1, "eval_tokens": 2, "topk": 1, "max_tokens": 1, "prompt_tokens": 1,
                           "repeats": 1, "warmup": 0, "batch": 1, "task_examples": 1, "failing_examples": 0}


def check_numbers(opts: dict[str, Any], *, where: str = "validate option ") -> None:
    """BadInput (exit 2) naming the first numeric option below its minimum (``MINIMUM``)."""
    for key, low in MINIMUM.items():
        value = opts.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise BadInput(f"{where}{key} = {value} is below its minimum {low}",
                           hint=f"give {key.replace('_', '-')} >= {low}")


def _provider_available(t) -> bool:
    import onnxruntime as ort

    return t.ort_providers[0] in ort.get_available_providers()


def _cpu_stand_in(t):
    """The target with its execution provider replaced by the CPU one (same graph, session options)."""
    rt = t.runtime.model_copy(update={"execution_provider": "cpu", "fallback_providers": [], "provider_options": {}})
    return t.model_copy(update={"runtime": rt})


def model_kind(folder: Path) -> tuple[str, Path]:
    """('decoder'|'encoder'|'seq2seq', model folder) of an export or bundle folder."""
    p = Path(folder)
    if not p.exists():
        raise BadInput(f"model not found: {p}", hint="give an export folder or a bundle folder")
    for cand in (p, p / "model"):
        if (cand / "genai_config.json").is_file():
            return "decoder", cand
        if (cand / "seq2seq.json").is_file():
            return "seq2seq", cand
        if (cand / "model.onnx").is_file():
            return "encoder", cand
    raise BadInput(f"{p} is neither an onnxruntime-genai export, an encoder export nor a bundle", hint="run edgetune export first")


def _read_text(data) -> str:
    from ..data import load_dataset, texts

    ds = load_dataset(data)
    return "\n\n".join(texts(ds))


def _read_prompts(path) -> list:
    p = Path(path)
    if not p.is_file():
        from ..errors import not_a_file

        raise not_a_file(p, "prompts file", hint="one prompt per line (.txt) or JSONL with 'prompt' or 'messages'")
    if p.suffix.lower() == ".txt":
        from ..data import read_utf8

        out = [line.strip() for line in read_utf8(p).splitlines() if line.strip()]
    else:
        from ..data import load_dataset

        ds = load_dataset(p)
        out = [r.get("messages") or r.get("prompt") or r.get("text") for r in ds.records]
    if not out:
        raise BadInput(f"no prompts in {p}", hint="add at least one prompt")
    return out


def _first_mismatch(where: str, texts: list[str], ref: list, dev: list) -> tuple[int, dict | None]:
    bad, first = 0, None
    for text, a, b in zip(texts, ref, dev):
        a, b = [int(x) for x in a], [int(x) for x in b]
        if a != b:
            bad += 1
            if first is None:
                i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                first = {"where": where, "text": text, "position": i, "reference": a[max(0, i - 4) : i + 8], "device": b[max(0, i - 4) : i + 8]}
    return bad, first


def reference_source(reference) -> Path:
    """The folder a reference is computed from. Accepts what `edgetune export` accepts (a model alias,
    a .gguf file, an HF folder; the first two materialized to a cached HF folder, host only) plus an
    ONNX export or a stored reference pack."""
    from ..model_input import ALIASES

    text = str(reference)
    src = Path(text).expanduser()
    if (not src.exists() and text in ALIASES) or (src.is_file() and src.suffix == ".gguf"):
        from ..model_input import materialize

        with console.step(f"materialize reference {src.name}"), console.results_only_stdout():
            return Path(materialize(text).path)
    if not src.exists():
        raise BadInput(f"reference not found: {src}",
                       hint=f"give the fp32 model (alias {', '.join(ALIASES)}, .gguf or HF folder), an fp32 export or a reference pack")
    return src


def _same_vocab(model_vocab: int | None, ref_vocab: int | None, src, *, at_least: int = 0) -> None:
    """BadInput naming both sizes when the reference's vocabulary is not the model's (its ids would index
    past the model's embedding: exit 4 "index out of range" before this check)."""
    if not model_vocab:
        return
    if ref_vocab is not None and ref_vocab != model_vocab:
        what = f"{ref_vocab} tokens"
    elif at_least > model_vocab:
        what = f"at least {at_least} tokens"
    else:
        return
    raise BadInput(f"reference {src} has a vocabulary of {what}, the model one of {model_vocab} tokens: they are not the same model family",
                   hint="validate against the model this one was made from (its fp32 merged or base model, or that model's reference pack)")


def _get_pack(reference, kind, *, text, texts, labels, prompts, opts, window, task=None, vocab=None, qa=None, mt=None):
    from . import reference as R

    if reference is None:
        return None
    src = reference_source(reference)
    if R.is_pack(src):
        pack = R.load_pack(src)
        if pack.kind != kind:
            raise BadInput(f"reference pack {src} is for a {pack.kind}, the model is an {kind}", hint="use the matching reference")
        if qa is not None and pack.meta.get("task") != "question-answering":
            raise BadInput(f"reference pack {src} is not for a question-answering model", hint="use the matching reference")
        if kind == "decoder":
            stored, top = R.pack_vocab(pack)
            _same_vocab(vocab, stored, src, at_least=top)
        return pack
    if kind == "decoder":
        _same_vocab(vocab, R.vocab_size(src), src)
    with console.step(f"reference ({R.source_kind(src)})"):
        if kind == "decoder":
            if text is None:
                raise BadInput("validating an LLM against a reference model needs --data (a text or JSONL file)", hint="e.g. --data eval.txt")
            return R.build_decoder_reference(src, text, window=window, stride=opts["stride"], method=opts["method"], topk=opts["topk"],
                                             max_new_tokens=opts["max_tokens"], prompts=prompts, eval_tokens=opts["eval_tokens"],
                                             task=task)
        if kind == "seq2seq":
            from . import translation as VT
            from ..device import seq2seq as S

            examples, folder, target = mt
            if examples is None:
                raise BadInput("validating a translation model against a reference needs --data with source/target pairs",
                               hint='JSONL {"source": ..., "target": ...}')
            return VT.build_reference(src, examples, S.load(folder, target))
        if qa is not None:
            examples, max_length, stride = qa
            if examples is None:
                raise BadInput("validating a question-answering model against a reference needs --data with SQuAD records",
                               hint='JSONL {"question", "context", "answers": {"text": [...], "answer_start": [...]}}')
            return R.build_qa_reference(src, examples, max_length=max_length, stride=stride)
        if texts is None:
            raise BadInput("validating an encoder against a reference needs --data with labelled examples", hint="JSONL/CSV/TSV with text and label")
        if texts and isinstance(texts[0], list):
            return R.build_token_reference(src, texts)
        return R.build_encoder_reference(src, texts, labels)


def _decoder(folder, target, pack, text, opts, report, series, task=None):
    from ..device import llm as L
    from ..device import metrics as M

    m = L.load(folder, target)
    report["runtime"]["providers"] = m.providers
    window = min(opts["window"], m.context_length)
    acc: dict[str, Any] = {}
    if pack is None:
        if text is None:
            return
        # no reference: the model's own perplexity on the data (its tokenizer's ids)
        ids = L.encode(m, text)[: opts["eval_tokens"]]
        nll = []
        for w in M.windows(len(ids), window, opts["stride"], opts["method"]):
            rows, tg = M.window_targets(ids, w)
            nll.append(M.nll(L.logits(m, ids[w[0] : w[1]])[rows], tg))
        acc["perplexity"] = M.perplexity(np.concatenate(nll))
        acc["tokens"] = int(len(ids))
        report["accuracy"] = acc
        _task_decoder(m, None, task, opts, report)
        return
    meta, ids = pack.meta, pack.arrays["ids"]
    if text is not None and _text_sha(text) != meta["text_sha256"]:
        raise BadInput("--data is not the text the reference pack was made from", hint="omit --data to use the pack's text")
    text = meta["text"]
    # tokenizer parity: the device tokenizer vs the reference tokenizer's stored ids
    dev_ids = L.encode(m, text)[: len(ids)]
    bad_d, first_d = _first_mismatch("data", [text], [ids], [dev_ids])
    dev_tricky = [L.encode(m, s) for s in meta["tricky"]]
    bad_t, first_t = _first_mismatch("tricky strings", meta["tricky"], pack.ragged("tricky"), dev_tricky)
    report["tokenizer"] = {"checked": 1 + len(meta["tricky"]), "mismatches": bad_d + bad_t, "first_mismatch": first_d or first_t}
    # scoring on the reference's tokens, same windows
    ws = M.windows(len(ids), meta["window"], meta["stride"], meta["method"])
    figures, per_token = M.score_windows(ids, ws, lambda x: L.logits(m, x), pack.arrays["top_ids"], pack.arrays["top_logp"],
                                         pack.arrays["nll"], wrap=lambda it: console.progress(it, desc="scoring"))
    acc.update({**figures, "method": meta["method"], "window": meta["window"], "stride": meta["stride"], "kl_topk": meta["topk"]})
    series.update(nll_model=per_token["nll_model"], nll_reference=pack.arrays["nll"], kl=per_token["kl"])
    # greedy generation agreement on the prompts (golden outputs from the reference)
    agree, exact, gens = [], 0, []
    for i, (p, g) in enumerate(zip(pack.ragged("prompt"), pack.ragged("golden"))):
        got = L.generate_ids(m, p, int(meta["max_new_tokens"]))
        a = M.prefix_agreement([int(x) for x in g], got)
        agree.append(a)
        exact += int(a == 1.0 and len(got) == len(g))
        gens.append({"prompt": meta["prompts"][i] if i < len(meta["prompts"]) else None, "agreement": a,
                     "golden": L.decode(m, g), "output": L.decode(m, got)})
    if agree:
        acc["generation_agreement"] = float(np.mean(agree))
        acc["generation_exact_match"] = exact / len(agree)
    report["accuracy"] = acc
    report["generations"] = gens
    _task_decoder(m, pack, task, opts, report)


def _failing(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` examples the model gets wrong; regressions (reference right) first."""
    wrong = [r for r in rows if not r["model_correct"]]
    wrong.sort(key=lambda r: (not r.get("reference_correct", False), r["index"]))
    return wrong[:n]


def _task_shape(metric: str, ref: dict | None, model: dict, failing: list[dict], **extra) -> dict:
    """The ``report['task']`` block, the same for LLMs and encoders: reference, model, drop, failing examples."""
    out = {"metric": metric, "examples": model.get("examples"), "reference": ref, "model": model,
           "drop": None if ref is None or ref.get(metric) is None or model.get(metric) is None else ref[metric] - model[metric],
           "failing_examples": failing}
    out.update(extra)
    return out


def _task_decoder(m, pack, task, opts, report) -> None:
    """Greedy answers of the model to examples with gold answers, scored vs the gold and vs the
    reference's stored answers (same prompt token ids as the reference; parity checked)."""
    from ..device import llm as L
    from ..device import metrics as M

    stored = (pack.meta.get("task") if pack is not None else None) or None
    if stored is not None:
        examples = stored["examples"]
        if task is not None and [e["gold"] for e in task] != [e["gold"] for e in examples]:
            raise BadInput("--data's gold answers are not those the reference pack was made from", hint="omit --data to use the pack's examples")
        ref_prompts = pack.ragged("task_prompt")
    elif task:
        examples = [dict(e, max_new_tokens=None) for e in task]
        ref_prompts = None
    else:
        return
    dev_prompts, caps = [], []
    for e in examples:
        dev_prompts.append(L.prompt_ids(m, e["prompt"], chat=e["chat"]))
        caps.append(e.get("max_new_tokens") or _cap(m, e["gold"]))
    bad_p = first_p = None
    if ref_prompts is not None:
        texts = [json.dumps(e["prompt"], ensure_ascii=False) if e["chat"] else e["prompt"] for e in examples]
        bad_p, first_p = _first_mismatch("task prompts (chat template)", texts, ref_prompts, dev_prompts)
        tok = report.setdefault("tokenizer", {"checked": 0, "mismatches": 0, "first_mismatch": None})
        tok["checked"] += len(examples)
        tok["mismatches"] += bad_p
        tok["first_mismatch"] = tok.get("first_mismatch") or first_p
    # generate from the reference's prompt ids (what it answered to); parity above says whether the device's own agree
    prompts = ref_prompts if ref_prompts is not None else dev_prompts
    answers = []
    for p, c in console.progress(list(zip(prompts, caps)), desc="task answers"):
        answers.append(L.decode(m, L.generate_ids(m, [int(x) for x in p], int(c))))
    golds = [e["gold"] for e in examples]
    sm = M.task_scores(golds, answers)
    sr = M.task_scores(golds, [e["answer"] for e in examples]) if stored is not None else None
    rows = []
    for i, e in enumerate(examples):
        row = {"index": i, "prompt": _prompt_text(e), "gold": e["gold"], "model": answers[i], "model_correct": bool(sm["correct"][i])}
        if sr is not None:
            row.update(reference=e["answer"], reference_correct=bool(sr["correct"][i]))
        rows.append(row)
    metric = sm["metric"]
    strip = lambda d: None if d is None else {k: v for k, v in d.items() if k != "correct"}  # noqa: E731
    extra = {"prompt_mismatches": bad_p}
    if sr is not None:
        extra["answer_agreement"] = sum(M.exact_match(e["answer"], a) for e, a in zip(examples, answers)) / len(examples)
    report["task"] = _task_shape(metric, strip(sr), strip(sm), _failing(rows, int(opts["failing_examples"])), **extra)
    acc = report.setdefault("accuracy", {})
    acc.update({"task_metric": metric, "task_examples": sm["examples"], "task_accuracy": sm["task_accuracy"],
                "task_exact_match": sm["exact_match"], "task_valid_format": sm["valid_format"], "task_token_f1": sm["token_f1"]})
    if sr is not None:
        acc.update({"reference_task_accuracy": sr["task_accuracy"], "reference_task_exact_match": sr["exact_match"],
                    "reference_task_valid_format": sr["valid_format"], "reference_task_token_f1": sr["token_f1"],
                    "task_accuracy_drop": sr["task_accuracy"] - sm["task_accuracy"], "task_answer_agreement": extra["answer_agreement"]})


def _cap(m, gold: str) -> int:
    from ..device import llm as L
    from .reference import answer_cap

    return answer_cap(len(L.encode(m, gold, special=False)))


def _prompt_text(e: dict) -> str:
    """The last user turn of a chat prompt (what a person reads), or the raw prompt."""
    if not e["chat"]:
        return e["prompt"]
    users = [m["content"] for m in e["prompt"] if m["role"] == "user"]
    return users[-1] if users else e["prompt"][-1]["content"]


def _text_sha(text: str) -> str:
    from .reference import text_sha

    return text_sha(text)


def _encoder(folder, target, pack, texts, labels, report, series, qa_examples=None):
    from tokenizers import Tokenizer

    from ..device import encoder as E
    from ..device import metrics as M

    enc = E.load(folder, target)
    report["runtime"]["providers"] = enc.session.get_providers()
    if enc.task == "question-answering":
        if texts is not None:
            raise BadInput("a question-answering model needs SQuAD records (question, context, answers)",
                           hint='give JSONL {"question", "context", "answers": {"text": [...], "answer_start": [...]}}')
        return _qa_encoder(enc, pack, qa_examples, report)
    if qa_examples is not None:
        raise BadInput(f"SQuAD records given for a {enc.task} model", hint="give the data this model was trained for")
    if enc.task == "token-classification":
        return _token_encoder(enc, pack, texts, labels, report)
    if enc.task not in ("classification", "sequence-classification") and (pack is not None or texts is not None):
        raise BadInput(f"accuracy validation of '{enc.task}' encoders is not supported (classification and token classification are)",
                       hint="run without --data/--reference for latency only")
    if texts is not None and texts and isinstance(texts[0], list):
        raise BadInput("token-tagged data (tokens/tags) given for a sequence classifier", hint="give text + label examples")
    if pack is None and texts is None:
        return
    if pack is not None:
        if texts is None:
            texts = pack.meta["texts"]
        elif _text_sha("\x00".join(texts)) != pack.meta["text_sha256"]:
            raise BadInput("--data is not the data the reference pack was made from", hint="omit --data to use the pack's texts")
        raw = Tokenizer.from_file(str(enc.folder / "tokenizer.json"))
        raw.no_padding()
        raw.enable_truncation(512)
        bad_d, first_d = _first_mismatch("data", texts, pack.ragged("data"), [e.ids for e in raw.encode_batch(texts)])
        bad_t, first_t = _first_mismatch("tricky strings", pack.meta["tricky"], pack.ragged("tricky"), [e.ids for e in raw.encode_batch(pack.meta["tricky"])])
        report["tokenizer"] = {"checked": len(texts) + len(pack.meta["tricky"]), "mismatches": bad_d + bad_t, "first_mismatch": first_d or first_t}
    pred = [lab for lab, _ in E.classify(enc, texts)]
    acc: dict[str, Any] = {"examples": len(texts)}
    if labels is not None:
        acc["accuracy"] = 100.0 * M.accuracy(labels, pred)
        acc["f1"] = M.macro_f1(labels, pred)
    if pack is not None:
        ref = [pack.meta["labels"][i] for i in pack.arrays["pred"]]
        acc["agreement_with_reference"] = M.accuracy(ref, pred)
        if labels is not None:
            acc["reference_accuracy"] = 100.0 * M.accuracy(labels, ref)
            acc["reference_f1"] = M.macro_f1(labels, ref)
            acc["accuracy_drop"] = acc["reference_accuracy"] - acc["accuracy"]
    report["accuracy"] = acc
    if labels is not None:
        ref = [pack.meta["labels"][i] for i in pack.arrays["pred"]] if pack is not None else None
        rows = [{"index": i, "prompt": texts[i], "gold": labels[i], "model": pred[i], "model_correct": pred[i] == labels[i],
                 **({"reference": ref[i], "reference_correct": ref[i] == labels[i]} if ref is not None else {})} for i in range(len(texts))]
        mfig = {"examples": len(texts), "accuracy": acc["accuracy"], "f1": acc["f1"]}
        rfig = {"examples": len(texts), "accuracy": acc["reference_accuracy"], "f1": acc["reference_f1"]} if ref is not None else None
        report["task"] = _task_shape("accuracy", rfig, mfig, _failing(rows, int(report["options"]["failing_examples"])),
                                     answer_agreement=acc.get("agreement_with_reference"))


def _token_encoder(enc, pack, words, gold, report):
    from ..device import encoder as E
    from ..device import metrics as M

    if words is not None and words and not isinstance(words[0], list):
        raise BadInput("a token classifier needs token-tagged data ({\"tokens\": [...], \"tags\": [...]})", hint="give JSONL with tokens and tags")
    if pack is not None:
        if pack.meta.get("task") != "token-classification":
            raise BadInput("the reference pack is not for a token classifier", hint="use the matching reference")
        if words is None:
            words = pack.meta["words"]
    if words is None:
        return
    pred = E.token_classify(enc, words)
    acc: dict[str, Any] = {"examples": len(words)}
    if gold is not None:
        acc["accuracy"] = 100.0 * M.entity_f1(gold, pred)  # entity F1 in %, so accuracy_drop is in points
        acc["entity_f1"] = M.entity_f1(gold, pred)
    if pack is not None:
        labels = pack.meta["labels"]
        ref = [[labels[i] if i >= 0 else "O" for i in seq] for seq in pack.ragged("tags")]
        flat_r = [t for s in ref for t in s]
        flat_p = [t for s in pred for t in s]
        acc["agreement_with_reference"] = M.accuracy(flat_r, flat_p)
        acc["entity_f1_vs_reference"] = M.entity_f1(ref, pred)  # the reference's entities taken as gold
        if gold is not None:
            acc["reference_entity_f1"] = M.entity_f1(gold, ref)
            acc["reference_accuracy"] = 100.0 * acc["reference_entity_f1"]
            acc["accuracy_drop"] = acc["reference_accuracy"] - acc["accuracy"]
    acc["metric"] = "entity_f1"
    report["accuracy"] = acc
    if gold is not None:
        def ents(tags):  # the spans of one sentence, readable
            return ", ".join(f"{t}:{' '.join(ws[a:b])}" for t, a, b in sorted(M.entities(tags), key=lambda x: x[1])) or "-"

        rows = []
        for i, (ws, g, p) in enumerate(zip(words, gold, pred)):
            row = {"index": i, "prompt": " ".join(ws), "gold": ents(g), "model": ents(p), "model_correct": M.entities(g) == M.entities(p)}
            if pack is not None:
                row.update(reference=ents(ref[i]), reference_correct=M.entities(g) == M.entities(ref[i]))
            rows.append(row)
        # figures in % (entity F1 x 100) so the drop is in points, as for sequence classifiers
        mfig = {"examples": len(words), "accuracy": acc["accuracy"], "entity_f1": acc["entity_f1"]}
        rfig = {"examples": len(words), "accuracy": acc["reference_accuracy"], "entity_f1": acc["reference_entity_f1"]} if pack is not None else None
        report["task"] = _task_shape("accuracy", rfig, mfig, _failing(rows, int(report["options"]["failing_examples"])),
                                     answer_agreement=acc.get("agreement_with_reference"))


def _qa_encoder(enc, pack, examples, report):
    """SQuAD exact match and F1 of the model's answers (and the reference's), and how often both answer the same span."""
    from ..device import metrics as M
    from ..device import qa as Q

    if pack is not None and examples is None:
        examples = pack.meta["examples"]
    if examples is None:
        return
    if pack is not None and len(pack.meta["examples"]) != len(examples) or pack is not None and any(
            (a["question"], a["context"]) != (b["question"], b["context"]) for a, b in zip(pack.meta["examples"], examples)):
        raise BadInput("--data is not the data the reference pack was made from", hint="omit --data to use the pack's examples")
    length, stride = Q.window_sizes(Q.max_length_of(enc))
    if pack is not None:  # the reference's windows, when the graph takes them
        length = min(int(pack.meta["max_length"]), enc.sequence_length or int(pack.meta["max_length"]))
        stride = int(pack.meta["stride"]) if length == int(pack.meta["max_length"]) else Q.window_sizes(length)[1]
    got = [Q.answer(enc, e["question"], e["context"], max_length=length, stride=stride) for e in console.progress(examples, desc="answers")]
    golds = [[a["text"] for a in e["answers"]] for e in examples]
    preds = [g["answer"] for g in got]
    sm = M.qa_scores(golds, preds)
    acc: dict[str, Any] = {"metric": "f1", "examples": len(examples), "exact_match": sm["exact_match"], "f1": sm["f1"],
                           "accuracy": sm["f1"], "max_length": length, "stride": stride,
                           "windows": sum(g["windows"] for g in got)}
    ref = None
    if pack is not None:
        ref = pack.meta["answers"]
        sr = M.qa_scores(golds, [r["answer"] for r in ref])
        same = [(r["start"], r["end"]) == (g["start"], g["end"]) for r, g in zip(ref, got)]
        acc.update(reference_exact_match=sr["exact_match"], reference_f1=sr["f1"], reference_accuracy=sr["f1"],
                   accuracy_drop=sr["f1"] - sm["f1"], agreement_with_reference=sum(same) / len(same),
                   reference_windows={"max_length": pack.meta["max_length"], "stride": pack.meta["stride"]})
    report["accuracy"] = acc
    rows = []
    for i, (e, g, gold) in enumerate(zip(examples, got, golds)):
        row = {"index": i, "prompt": e["question"], "gold": " | ".join(gold), "model": g["answer"], "model_score": round(g["score"], 4),
               "model_correct": bool(M.squad_exact(gold, g["answer"]))}
        if ref is not None:
            row.update(reference=ref[i]["answer"], reference_correct=bool(M.squad_exact(gold, ref[i]["answer"])))
        rows.append(row)
    mfig = {"examples": len(examples), "accuracy": sm["f1"], "exact_match": sm["exact_match"], "f1": sm["f1"]}
    rfig = ({"examples": len(examples), "accuracy": acc["reference_f1"], "exact_match": acc["reference_exact_match"],
             "f1": acc["reference_f1"]} if ref is not None else None)
    report["task"] = _task_shape("accuracy", rfig, mfig, _failing(rows, int(report["options"]["failing_examples"])),
                                 answer_agreement=acc.get("agreement_with_reference"), answers=rows)


def _checks(report, target) -> list[dict]:
    from ..device.report import check

    b = target.budgets
    acc, lat = report.get("accuracy") or {}, report.get("latency") or {}
    out = []
    tok = report.get("tokenizer")
    if tok is not None:
        fm = tok.get("first_mismatch")
        out.append(check("tokenizer_parity", tok["mismatches"], 0, "==",
                         detail=None if not fm else f"first difference in {fm['where']} at token {fm['position']}: {fm['text'][:40]!r}"))

    def p50(key):
        s = lat.get(key)
        return s.get("p50") if s else None

    kind = report["model"]["kind"]
    pairs = [
        ("perplexity_increase_pct", acc.get("perplexity_increase_pct"), b.max_perplexity_increase_pct, "<="),
        ("kl_divergence", acc.get("kl_divergence"), b.max_kl_divergence, "<="),
        ("top1_agreement", acc.get("top1_agreement"), b.min_top1_agreement, ">="),
        ("generation_agreement", acc.get("generation_agreement"), b.min_generation_agreement, ">="),
        ("accuracy_drop", acc.get("accuracy_drop"), b.max_accuracy_drop, "<="),
        ("task_accuracy_drop", acc.get("task_accuracy_drop"), b.max_task_accuracy_drop, "<="),
        ("task_accuracy", acc.get("task_accuracy"), b.min_task_accuracy, ">="),
        ("size_mb", lat.get("size_mb") if lat else report["model"].get("size_mb"), b.max_size_mb, "<="),
        ("peak_memory_mb", lat.get("peak_memory_mb"), b.max_peak_memory_mb, "<="),
        ("load_time_s", lat.get("load_time_s"), b.max_load_time_s, "<="),
        ("time_to_first_token_ms", p50("time_to_first_token_ms"), b.max_time_to_first_token_ms, "<="),
        ("decode_tokens_per_s", p50("decode_tokens_per_s"), b.min_decode_tokens_per_s, ">="),
        ("p90_ms", (lat.get("latency_ms") or {}).get("p90"), b.max_p90_ms, "<="),
    ]
    for name, value, limit, op in pairs:
        if limit is None:
            continue
        if value is None:
            # a budget that does not apply to this kind of model, or a figure not measured in this run
            if (kind in ("encoder", "seq2seq") and name in ("perplexity_increase_pct", "kl_divergence", "top1_agreement", "generation_agreement",
                                               "time_to_first_token_ms", "decode_tokens_per_s", "task_accuracy_drop", "task_accuracy")) or \
               (kind == "decoder" and name in ("accuracy_drop", "p90_ms")):
                continue
            report.setdefault("not_measured", []).append(name)
            continue
        c = check(name, value, limit, op, detail=_task_detail(report, name))
        if name == "perplexity_increase_pct":
            _mark_noise(c, acc.get("perplexity_increase_se_pct"))
        out.append(c)
    return out


def _mark_noise(c: dict, se: float | None) -> None:
    """Flag a perplexity verdict that the scored text cannot decide: the increase lies within two of
    its standard errors (over scoring windows, :func:`edgetune.device.metrics.increase_se_pct`)
    of the budget, so another text of the same kind may well flip it. The verdict stands (a
    budget is a budget); the flag says to score more text before trusting it either way."""
    if not isinstance(se, (int, float)) or se <= 0 or abs(c["limit"] - c["value"]) >= 2 * se:
        return
    c["within_noise"] = True
    c["detail"] = (f"{c['value']:+.2f}% ±{se:.2f} (one standard error) is within two standard errors of the limit "
                   f"{c['limit']}: the verdict could go the other way on other text; score more (--eval-tokens) to decide")


def _task_detail(report, name) -> str | None:
    if name not in ("task_accuracy_drop", "task_accuracy"):
        return None
    t = report.get("task") or {}
    ref, model, metric = t.get("reference") or {}, t.get("model") or {}, t.get("metric")
    if not model:
        return None
    s = f"{metric}: model {model.get(metric, 0):.1f}%"
    if ref.get(metric) is not None:
        s += f", reference {ref[metric]:.1f}%"
    f = t.get("failing_examples") or []
    if f:
        s += f"; first failing: {f[0]['prompt'][:40]!r} -> {str(f[0]['model'])[:40]!r}"
    return s


def validate(model, *, target, reference=None, data=None, out=None, prompts=None, shown_as: str | None = None, **options) -> dict:
    """Validate ``model`` (export or bundle) on this machine against ``target``; returns the report. ``shown_as``: the
    path the report names (the archive a bundle was unpacked from into a temporary ``model``)."""
    from ..device.measure import size_on_disk_mb
    from ..device.report import SCHEMA_VERSION, write

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise BadInput(f"unknown validate option(s): {', '.join(sorted(unknown))}", hint=f"known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    check_numbers(opts)
    if opts["method"] not in ("sliding", "chunked"):
        raise BadInput(f"unknown perplexity method '{opts['method']}'", hint="use sliding or chunked")
    if opts["stride"] is None and opts["method"] == "sliding":
        opts["stride"] = opts["window"] // 2
    if opts["window"] < 2 or (opts["stride"] is not None and not 1 <= opts["stride"] <= opts["window"]):
        raise BadInput(f"invalid window/stride {opts['window']}/{opts['stride']}", hint="need window >= 2 and 1 <= stride <= window")
    t = resolve(target)
    device = {"execution_provider": t.runtime.execution_provider, "available": True, "accuracy_on": t.ort_providers[0], "latency": "measured"}
    t_run = t
    if not _provider_available(t):
        if opts["require_device"]:
            from ..device.session import providers

            providers(t)  # raises MissingDependency (exit 3) naming the provider
        t_run = _cpu_stand_in(t)
        device.update(available=False, accuracy_on="CPUExecutionProvider", latency="not measured")
        console.warn(f"execution provider {t.ort_providers[0]} (target '{t.name}') is not on this machine: cross-build, "
                     "accuracy validated with the same graph on the CPU provider, on-device latency not measured "
                     "(--require-device makes this fatal)")
    kind, folder = model_kind(Path(model))
    if kind == "decoder":
        from ..device.llm import genai_config

        gcfg = genai_config(folder)["model"]
        ctx = gcfg.get("context_length") or opts["window"]
        if opts["window"] > ctx:
            opts["window"] = int(ctx)
            opts["stride"] = min(opts["stride"] or ctx // 2, ctx)
    out = Path(out) if out else Path(model).resolve().parent / f"{Path(model).resolve().name}.validation"
    text = texts = labels = task = qa_examples = mt_examples = None
    if data is not None:
        if kind == "seq2seq":
            from ..data import load_dataset
            from .translation import examples_of

            mt_examples = examples_of(load_dataset(data))
        elif kind == "decoder":
            from ..data import load_dataset, task_examples

            ds = load_dataset(data)
            text = _read_text(data)
            task = task_examples(ds) or None
            if task and opts["task_examples"]:
                task = task[: int(opts["task_examples"])]
        else:
            from ..data import load_dataset

            ds = load_dataset(data)
            if ds.format == "classification":
                texts = [r["text"] for r in ds.records]
                labels = [str(r["label"]) for r in ds.records]
            elif ds.format == "tokens":  # token classification: words and their tags
                texts = [r["tokens"] for r in ds.records]
                labels = [r["tags"] for r in ds.records]
            elif ds.format == "qa":  # extractive question answering: SQuAD records
                qa_examples = ds.records
            else:
                raise BadInput(f"{data}: encoder validation needs labelled examples (text + label, tokens + tags, or SQuAD "
                               f"question/context/answers), got '{ds.format}'",
                               hint="give a classification or token-tagged data set")
    prompt_list = _read_prompts(prompts) if prompts else None
    record = artifacts.read_record(folder) or {}
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": shown_as or str(model), "folder": str(folder), "kind": kind, "size_mb": size_on_disk_mb(folder),
                  "precision": (record.get("results") or {}).get("precision")},
        "target": {"name": t.name, "source": t.source, "execution_provider": t.runtime.execution_provider},
        "reference": None,
        "runtime": {"providers": []},
        "device": device,
        "options": opts,
        "machine": artifacts.machine_info(),
        "versions": artifacts.package_versions(),
    }
    qa = None
    if kind == "encoder" and (qa_examples is not None or reference is not None):
        from ..device import encoder as E

        enc_facts = E.load(folder, t_run)  # a question-answering reference is computed on this model's windows
        if enc_facts.task == "question-answering":
            from ..device import qa as Q

            qa = (qa_examples, *Q.window_sizes(Q.max_length_of(enc_facts)))
        del enc_facts
    series: dict[str, Any] = {}
    with artifacts.stage_output(out, "validate", inputs={"model": folder, "reference": reference, "data": data, "prompts": prompts},
                                options={**opts, "target": t.name}) as run:
        pack = _get_pack(reference, kind, text=text, texts=texts, labels=labels, prompts=prompt_list, opts=opts, window=opts["window"], task=task,
                         vocab=gcfg.get("vocab_size") if kind == "decoder" else None, qa=qa, mt=(mt_examples, folder, t_run))
        if pack is not None:
            if not (reference and Path(reference, "reference.json").is_file()):
                pack.save(run.dir / "reference")
            report["reference"] = {"source": str(reference), "computed_with": pack.meta.get("computed_with"),
                                   "pack": str(out / "reference") if not Path(reference, "reference.json").is_file() else str(reference)}
        with console.step("accuracy"):
            if kind == "decoder":
                _decoder(folder, t_run, pack, text, opts, report, series, task)
            elif kind == "seq2seq":
                from .translation import evaluate

                rows, mfig, rfig = evaluate(folder, t_run, pack, mt_examples, report)
                report["task"] = _task_shape("chrf", rfig, mfig, _failing(rows, int(report["options"]["failing_examples"])),
                                             answer_agreement=report["accuracy"].get("agreement_with_reference"), answers=rows)
            else:
                _encoder(folder, t_run, pack, texts, labels, report, series, qa_examples)
        mt_latency = report.pop("translation_latency", None)
        if not device["available"]:
            report["latency"] = None
        elif kind == "seq2seq":  # per sentence (encoder once + greedy steps), measured while translating the data
            report["latency"] = {**mt_latency, "size_mb": report["model"]["size_mb"]} if opts["latency"] else None
        elif opts["latency"]:
            from ..device.bench import run_in_subprocess

            with console.step("latency"):
                report["latency"] = run_in_subprocess(folder, t.source, kind=kind, prompt_tokens=opts["prompt_tokens"], max_tokens=opts["max_tokens"],
                                                      repeats=opts["repeats"], warmup=opts["warmup"], batch=opts["batch"])
        report["checks"] = _checks(report, t)
        report["passed"] = all(c["passed"] for c in report["checks"])
        report["failed"] = [c["name"] for c in report["checks"] if not c["passed"]]
        report["report_dir"] = str(out)
        write(run.dir, report, series)
        run.results.update({"passed": report["passed"], "failed": report["failed"], "kind": kind,
                            **{k: v for k, v in (report.get("accuracy") or {}).items() if isinstance(v, (int, float))}})
    if not report["passed"]:
        raise CheckFailed(f"validation failed: {', '.join(report['failed'])} (report: {out / 'report.md'})", result=report)
    return report
