"""`merge`: fold a PEFT adapter into its base and prove the result behaves like base + adapter.

The gate compares the merged model with the unmerged PeftModel (what was trained) on
held-out inputs: max/mean absolute logit difference, KL(reference || merged) and top-1
agreement. Beyond tolerance -> CheckFailed (exit 1), with the figures in the error.

QLoRA adapters (trained on a bitsandbytes 4-bit base) are merged into the de-quantized
full-precision base like any LoRA; the gate then also measures the distance of the merged model
to what was actually trained, the 4-bit base + adapter (same quantization settings as in
training, read from the finetune record), under ``results.gate.vs_trained_4bit``. That distance
is the 4-bit quantization error of the base: informational unless a tolerance is given.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from . import artifacts, console
from .errors import BadInput, CheckFailed, require

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Turn on the kitchen lights at 7 pm.",
    "Once upon a time, in a small village by the sea,",
)
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def _logits(out):
    """The output the gate compares: ``logits``, or for a span head its start and end logits as two rows over positions."""
    if getattr(out, "logits", None) is None and getattr(out, "start_logits", None) is not None:
        import torch

        return torch.stack([out.start_logits, out.end_logits], dim=1)
    return out.logits


def read_adapter(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise BadInput(f"adapter not found: {adapter}", hint="give the folder written by edgetune finetune")
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise BadInput(f"{adapter} has no adapter_config.json", hint="give a PEFT adapter folder (save_pretrained output)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{cfg_path} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if not (adapter / "adapter_model.safetensors").is_file():
        raise BadInput(f"{adapter} has no adapter_model.safetensors",
                       hint="only safetensors adapters are loaded (pickled .bin files can run code); re-save with safe_serialization=True")
    try:
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise BadInput(f"{adapter / 'adapter_model.safetensors'} is not a readable safetensors file ({type(e).__name__})") from None
    task = cfg.get("task_type") or "CAUSAL_LM"
    if task not in TASK_CLASSES:
        raise BadInput(f"adapter task_type {task} is not supported", hint=f"supported: {', '.join(TASK_CLASSES)}")
    return cfg


def _inputs(tokenizer, task: str, gate_data: Path | None, limit: int = 16) -> list[str]:
    if gate_data is None:
        return list(DEFAULT_PROMPTS)
    from .data import load_dataset, texts

    return list(texts(load_dataset(gate_data)))[:limit]


def _seq2seq_encodings(tokenizer, model, gate_data: Path | None, prefix: str, limit: int = 16) -> list[dict]:
    """Teacher-forced gate inputs of a translation model: the (prefixed) source and, as decoder input, the
    start token + the target (gate data's translation pairs; else the default prompts as both sides)."""
    torch = require("torch")
    pairs = [(p, p) for p in DEFAULT_PROMPTS]
    if gate_data is not None:
        from .data import load_dataset, texts

        ds = load_dataset(gate_data)
        pairs = [(r["source"], r["target"]) for r in ds.records] if ds.format == "translation" else [(t, t) for t in texts(ds)]
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    out = []
    for src, tgt in pairs[:limit]:
        e = dict(tokenizer(prefix + src, return_tensors="pt", truncation=True, max_length=512))
        ids = tokenizer(text_target=tgt, truncation=True, max_length=512)["input_ids"]
        e["decoder_input_ids"] = torch.tensor([[int(start), *ids]])
        out.append(e)
    return out


QLORA_DEFAULTS = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def trained_quantization(adapter: Path, qlora: bool | None = None) -> dict[str, Any] | None:
    """The 4-bit settings an adapter was trained with, or None for an adapter trained on a float base.

    ``qlora`` None: decided by the finetune record (``edgetune.json`` / ``finetune_config.json``
    method ``qlora``); True: QLoRA, settings from the record when it has them, else nf4 +
    double quantization; False: never.
    """
    if qlora is False:
        return None
    opts: dict[str, Any] = (artifacts.read_record(adapter) or {}).get("options") or {}
    if not opts and (adapter / "finetune_config.json").is_file():
        try:
            opts = json.loads((adapter / "finetune_config.json").read_text()).get("options") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            opts = {}
    recorded = opts.get("method") == "qlora"
    if not recorded and not qlora:
        return None
    if not recorded:
        return {**QLORA_DEFAULTS, "source": "defaults (nf4, double quantization)"}
    cdt = opts.get("compute_dtype") or "auto"
    if cdt == "auto":  # what finetune resolves "auto" to, given its precision
        cdt = {"bf16": "bfloat16", "fp16": "float16"}.get(opts.get("precision"), "float32")
    return {"quant_type": opts.get("quant_type") or "nf4", "double_quant": bool(opts.get("double_quant", True)),
            "compute_dtype": cdt, "source": "finetune record"}


def compare_logits(reference, candidate) -> dict[str, float]:
    """Logit agreement of ``candidate`` with ``reference`` (two lists of [batch, seq, vocab] logits)."""
    torch = require("torch")
    diffs, kls, agree, n = [], [], 0, 0
    with torch.no_grad():
        for a, b in zip(reference, candidate):
            a, b = a.float(), b.float()
            d = (a - b).abs()
            diffs.append((d.max().item(), d.mean().item()))
            lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            kls.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            n += a.argmax(-1).numel()
    return {
        "max_abs_diff": max(x for x, _ in diffs),
        "mean_abs_diff": sum(y for _, y in diffs) / len(diffs),
        "kl": max(kls),
        "top1_agreement": agree / n,
        "inputs": len(reference),
    }


def gate_figures(reference, candidate, encodings) -> dict[str, float]:
    """Logit agreement of ``candidate`` with ``reference`` (two models) over a list of tokenized inputs."""
    torch = require("torch")
    with torch.no_grad():
        return compare_logits([_logits(reference(**e)) for e in encodings], [_logits(candidate(**e)) for e in encodings])


def vs_trained_4bit(cls, base_dir: Path, adapter: Path, quant: dict[str, Any], encodings, merged_logits, *,
                    kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures of the merged logits vs the 4-bit base + adapter (the model the adapter was trained as)."""
    torch = require("torch", purpose="QLoRA merge gate")
    transformers = require("transformers", purpose="QLoRA merge gate")
    peft = require("peft", purpose="QLoRA merge gate")
    require("bitsandbytes", purpose="QLoRA merge gate (the 4-bit base the adapter was trained on)")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                          bnb_4bit_use_double_quant=quant["double_quant"],
                                          bnb_4bit_compute_dtype=getattr(torch, quant["compute_dtype"]))
    on_gpu = torch.cuda.is_available()
    model = cls.from_pretrained(str(base_dir), quantization_config=bnb, dtype=torch.float32, use_safetensors=True,
                                device_map={"": 0 if on_gpu else "cpu"}, **(kwargs or {})).eval()
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    if not n4:
        raise CheckFailed("the 4-bit reference has no 4-bit layers (bitsandbytes did not quantize the base)",
                          hint="check the bitsandbytes install (python -m bitsandbytes)")
    model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        trained = [_logits(model(**{k: v.to(device) for k, v in e.items()})).float().cpu() for e in encodings]
    del model
    return {**compare_logits(trained, merged_logits), "linear4bit_layers": n4,
            "reference": f"{quant['quant_type']} 4-bit base (double quant {quant['double_quant']}, compute {quant['compute_dtype']}) + adapter",
            **{k: quant[k] for k in ("quant_type", "double_quant", "compute_dtype", "source")}}


def merge(base, adapter, out, *, dtype: str = "auto", gate_data=None, max_abs_diff: float = 1e-3,
          max_kl: float = 1e-4, min_top1: float = 0.99, qlora: bool | None = None,
          max_kl_vs_4bit: float | None = None, min_top1_vs_4bit: float | None = None) -> Path:
    from .model_input import materialize, stored_dtype

    adapter, out = Path(adapter), Path(out)
    cfg = read_adapter(adapter)
    base_dir = Path(base) if Path(base).is_dir() else Path(materialize(base).path)
    torch = require("torch", purpose="merge")
    transformers = require("transformers", purpose="merge")
    peft = require("peft", purpose="merge")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise BadInput(f"unknown dtype {dtype}", hint="use auto (the base's own), float32, float16 or bfloat16")
    task = cfg.get("task_type") or "CAUSAL_LM"
    # auto: the base's own dtype (a bf16 checkpoint merges into bf16, as peft's merge_and_unload does; an fp32 one,
    # e.g. a dequantized GGUF, stays fp32), so a 3.8B bf16 base never needs its 15.7 GB fp32 copy
    stored = stored_dtype(base_dir)
    requested, dtype = dtype, (dtype if dtype != "auto" else stored if stored in ("bfloat16", "float16") else "float32")
    # the stored weights kept, computed in fp32 one module at a time (the reference is then the fp32 model's, bit for
    # bit), the adapter merged into them; a quant-aware adapter's fake-quant reference needs the float base
    qat_spec = trained_grid(adapter)
    keep_stored = task == "CAUSAL_LM" and dtype == stored and dtype in ("bfloat16", "float16") and qat_spec is None
    cls = getattr(transformers, TASK_CLASSES[task])
    kwargs: dict[str, Any] = {}
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        pass  # the base's own head: no labels to carry over
    elif (adapter / "config.json").is_file():
        kwargs["config"] = transformers.AutoConfig.from_pretrained(str(adapter))
    else:
        # a classifier adapter from `edgetune finetune` records its label names, not a config.json:
        # without them the merged model would say LABEL_0/LABEL_1 and never match the data's labels
        names = ((artifacts.read_record(adapter) or {}).get("results") or {}).get("label_names")
        if names:
            kwargs["config"] = transformers.AutoConfig.from_pretrained(
                str(base_dir), num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    if task == "SEQ_2_SEQ_LM":  # a SentencePiece-only Marian: exit 2 with the fix, not transformers' ImportError
        from .model_input import check_seq2seq_tokenizer, inspect

        check_seq2seq_tokenizer(tok_dir, inspect(base_dir).config)
    options: dict[str, Any] = {"dtype": requested, "max_abs_diff": max_abs_diff, "max_kl": max_kl, "min_top1": min_top1}
    strict_4bit = max_kl_vs_4bit is not None or min_top1_vs_4bit is not None
    quant = trained_quantization(adapter, True if strict_4bit and qlora is None else qlora)
    if quant is not None:
        options["vs_trained_4bit"] = {**{k: quant[k] for k in ("quant_type", "double_quant", "compute_dtype")},
                                      "max_kl": max_kl_vs_4bit, "min_top1": min_top1_vs_4bit}
        if qlora or strict_4bit:  # asked for explicitly: a missing bitsandbytes is an error (exit 3), not a skip
            require("bitsandbytes", purpose="QLoRA merge gate (the 4-bit base the adapter was trained on)")
    with artifacts.stage_output(out, "merge", inputs={"base": base_dir, "adapter": adapter, "gate_data": gate_data},
                                options=options) as run:
        with console.step("load base + adapter"):
            if keep_stored:
                from .model_input import load_causal_lm

                model = load_causal_lm(base_dir).eval()
            else:
                model = cls.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True, **kwargs).eval()
            try:
                model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
            except (RuntimeError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                raise BadInput(f"adapter {adapter} does not fit base {base_dir}: {first}",
                               hint="merge with the base the adapter was trained on") from None
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        # an encoder reads at most its position table: a longer gate text (a SQuAD context) is cut there, never exit 4
        cut = {} if task == "CAUSAL_LM" else {"truncation": True,
                                               "max_length": int(getattr(model.config, "max_position_embeddings", 0) or 512)}
        prefix = str(((artifacts.read_record(adapter) or {}).get("options") or {}).get("source_prefix") or "")
        if task == "SEQ_2_SEQ_LM":  # translation: teacher-forced logits of every target position
            encodings = _seq2seq_encodings(tokenizer, model, Path(gate_data) if gate_data else None, prefix)
        else:
            encodings = [tokenizer(t, return_tensors="pt", **cut) for t in _inputs(tokenizer, task, Path(gate_data) if gate_data else None)]
        with torch.no_grad():
            ref_logits = [_logits(model(**e)).float().clone() for e in encodings]
        trained_logits = None
        if qat_spec is not None:
            with console.step(f"quant-aware adapter: the model it was trained as ({qat_spec.describe()})"):
                trained_logits = _qat_logits(model, qat_spec, encodings)
        with console.step("merge_and_unload"):
            merged = model.merge_and_unload().eval()
        target_dtype = getattr(torch, dtype)
        merged = merged.to(target_dtype)

        with torch.no_grad():
            merged_logits = [_logits(merged(**e)).float() for e in encodings]
        figures = compare_logits(ref_logits, merged_logits)
        # fp16/bf16 weights round the merge: the |dlogit| and KL limits widen, and top-1 is reported, not gated (the
        # rounding flips only near-ties, which those two bound: random-weight models flip 3 % of their flat positions)
        exact = dtype == "float32"
        limits = {"max_abs_diff": max_abs_diff * (1 if exact else 1000), "kl": max_kl * (1 if exact else 100),
                  "top1_agreement": min_top1 if exact else None}
        passed = figures["max_abs_diff"] <= limits["max_abs_diff"] and figures["kl"] <= limits["kl"] and \
            (not exact or figures["top1_agreement"] >= min_top1)
        gate = {**figures, "passed": passed, "limits": limits, "reference": "unmerged PeftModel (base + adapter), float32",
                "adapter_type": cfg.get("peft_type"), "use_dora": bool(cfg.get("use_dora")), "task_type": task}
        if not passed:
            top1 = f" (>= {min_top1})" if exact else " (not gated for a rounded merge)"
            raise CheckFailed(f"merge gate failed ({dtype}): max|dlogit|={figures['max_abs_diff']:.3g} (<= {limits['max_abs_diff']:.3g}), "
                              f"KL={figures['kl']:.3g} (<= {limits['kl']:.3g}), top-1={figures['top1_agreement']:.3f}{top1}",
                              result=gate)
        if qat_spec is not None:
            gate["vs_fake_quant"] = _gate_vs_fake_quant(merged, qat_spec, encodings, merged_logits, trained_logits, max_kl, min_top1,
                                                        strict=dtype == "float32")
        merged.config.dtype = target_dtype  # compute_in_fp32 marks the config fp32 for its masks: the weights are these
        merged.save_pretrained(str(run.dir), safe_serialization=True)
        tokenizer.save_pretrained(str(run.dir))
        if quant is not None:
            # the float model is saved (into the stage's temp folder: a failed gate leaves nothing): free it before
            # the 4-bit reference loads, so the two never share the memory (3.8B: 15.7 GB fp32 + the 4-bit base)
            del model, merged
            gc.collect()
            gate["vs_trained_4bit"] = _gate_vs_4bit(cls, base_dir, adapter, quant, encodings, merged_logits, kwargs,
                                                    max_kl_vs_4bit, min_top1_vs_4bit)
        run.results.update(kind="merged", task_type=task, dtype=dtype, gate=gate)
        if task == "SEQ_2_SEQ_LM":  # export reads the prefix from here, so the device applies what was trained
            run.results["source_prefix"] = prefix
    return out


def trained_grid(adapter: Path):
    """The int4 grid a quant-aware adapter was trained through (its finetune record), or None."""
    from .quant import QATSpec

    opts: dict[str, Any] = (artifacts.read_record(adapter) or {}).get("options") or {}
    if not opts.get("quant_aware"):
        return None
    return QATSpec(block_size=int(opts.get("quant_aware_block_size") or 32), lm_head=opts.get("quant_aware_lm_head") or "int4")


def _qat_logits(peft_model, spec, encodings) -> list:
    """Logits of base + adapter computed as in quant-aware training (a copy: the base stays float for the merge)."""
    import copy

    from .finetune import qat

    torch = require("torch")
    trained = copy.deepcopy(peft_model)
    qat.apply(trained, spec)
    with torch.no_grad():
        out = [_logits(trained(**e)).float() for e in encodings]
    del trained
    return out


def _gate_vs_fake_quant(merged, spec, encodings, merged_logits, trained_logits, max_kl, min_top1, *,
                        strict: bool = True) -> dict[str, Any]:
    """Quant-aware adapters: the merged model rounded as the int4 export rounds it must be the model trained.

    ``int4_vs_trained`` (gated: the export then reproduces training) and ``merged_vs_trained`` (how far the
    float merged model is from what was trained: informational, the int4 export is the deliverable).
    A merge saved in fp16/bf16 is no longer on the fp32 grid: the figures are recorded, not gated.
    """
    import copy

    from .finetune.qat import quantize_model_weights

    torch = require("torch")
    rounded = copy.deepcopy(merged)
    quantize_model_weights(rounded, spec)
    with torch.no_grad():
        int4_logits = [_logits(rounded(**e)).float() for e in encodings]
    del rounded
    int4 = compare_logits(trained_logits, int4_logits)
    # ties at a rounding boundary may flip a weight or two (merge sums in another order): KL 10x the merge tolerance
    ok = int4["kl"] <= max_kl * 10 and int4["top1_agreement"] >= min_top1
    vs = {"grid": spec.describe(), **spec.to_dict(), "int4_vs_trained": {**int4, "passed": ok if strict else None},
          "merged_vs_trained": compare_logits(trained_logits, merged_logits),
          "reference": "base + adapter through the training grid (fake-quantized merged weights)"}
    if strict and not ok:
        raise CheckFailed(f"the merged model rounded onto the training grid is not the model the adapter was trained as: "
                          f"KL={int4['kl']:.3g} (<= {max_kl * 10:.3g}), top-1={int4['top1_agreement']:.3f} (>= {min_top1})",
                          hint="the adapter does not match its finetune record (edited after training?): train it again", result=vs)
    return vs


def _gate_vs_4bit(cls, base_dir, adapter, quant, encodings, merged_logits, kwargs, max_kl, min_top1) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:  # auto-detected QLoRA, nothing asked: say so, do not fail
        console.log("[merge] QLoRA adapter: bitsandbytes is not installed, the distance to the 4-bit base + adapter is not measured")
        return {"skipped": "bitsandbytes is not installed", "source": quant["source"]}
    with console.step(f"QLoRA: merged vs the {quant['quant_type']} 4-bit base + adapter"):
        vs4 = vs_trained_4bit(cls, base_dir, adapter, quant, encodings, merged_logits, kwargs=kwargs)
    strict = max_kl is not None or min_top1 is not None
    ok = (max_kl is None or vs4["kl"] <= max_kl) and (min_top1 is None or vs4["top1_agreement"] >= min_top1)
    vs4.update(max_kl=max_kl, min_top1=min_top1, passed=ok if strict else None)
    if not ok:
        raise CheckFailed(f"merged model is too far from the 4-bit base + adapter it was trained as: KL={vs4['kl']:.3g}"
                          + (f" (<= {max_kl})" if max_kl is not None else "") + f", top-1={vs4['top1_agreement']:.3f}"
                          + (f" (>= {min_top1})" if min_top1 is not None else ""),
                          hint="the 4-bit quantization error of the base is large for this model; evaluate the merged model "
                               "(edgetune validate) or train with LoRA on the float base", result=vs4)
    return vs4
