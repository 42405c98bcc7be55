"""`merge`: fold a PEFT adapter into its base and prove the result behaves like base + adapter.

The gate compares the merged model with the unmerged PeftModel (what was trained) on
held-out inputs: max/mean absolute logit difference, KL(reference || merged) and top-1
agreement. Beyond tolerance -> CheckFailed (exit 1), with the figures in the error.
"""

from __future__ import annotations

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
}


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


def gate_figures(reference, candidate, encodings) -> dict[str, float]:
    """Logit agreement of ``candidate`` with ``reference`` over a list of tokenized inputs."""
    torch = require("torch")
    diffs, kls, agree, n = [], [], 0, 0
    with torch.no_grad():
        for enc in encodings:
            a = reference(**enc).logits.float()
            b = candidate(**enc).logits.float()
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
        "inputs": len(encodings),
    }


def merge(base, adapter, out, *, dtype: str = "float32", gate_data=None, max_abs_diff: float = 1e-3,
          max_kl: float = 1e-4, min_top1: float = 0.99) -> Path:
    from .models import materialize

    adapter, out = Path(adapter), Path(out)
    cfg = read_adapter(adapter)
    base_dir = Path(base) if Path(base).is_dir() else Path(materialize(base).path)
    torch = require("torch", purpose="merge")
    transformers = require("transformers", purpose="merge")
    peft = require("peft", purpose="merge")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise BadInput(f"unknown dtype {dtype}", hint="use float32, float16 or bfloat16")
    task = cfg.get("task_type") or "CAUSAL_LM"
    cls = getattr(transformers, TASK_CLASSES[task])
    kwargs: dict[str, Any] = {}
    if task != "CAUSAL_LM" and (adapter / "config.json").is_file():
        kwargs["config"] = transformers.AutoConfig.from_pretrained(str(adapter))
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    options = {"dtype": dtype, "max_abs_diff": max_abs_diff, "max_kl": max_kl, "min_top1": min_top1}
    with artifacts.stage_output(out, "merge", inputs={"base": base_dir, "adapter": adapter, "gate_data": gate_data},
                                options=options) as run:
        with console.step("load base + adapter"):
            model = cls.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True, **kwargs).eval()
            try:
                model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
            except (RuntimeError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                raise BadInput(f"adapter {adapter} does not fit base {base_dir}: {first}",
                               hint="merge with the base the adapter was trained on") from None
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        encodings = [tokenizer(t, return_tensors="pt") for t in _inputs(tokenizer, task, Path(gate_data) if gate_data else None)]
        with torch.no_grad():
            ref_logits = [model(**e).logits.float().clone() for e in encodings]
        with console.step("merge_and_unload"):
            merged = model.merge_and_unload().eval()
        target_dtype = getattr(torch, dtype)
        merged = merged.to(target_dtype)

        class _Ref:
            def __init__(self):
                self.i = -1

            def __call__(self, **_):
                self.i += 1
                return type("O", (), {"logits": ref_logits[self.i]})

        figures = gate_figures(_Ref(), lambda **e: type("O", (), {"logits": merged(**e).logits.float()}), encodings)
        passed = figures["max_abs_diff"] <= max_abs_diff * (1 if dtype == "float32" else 1000) and \
            figures["kl"] <= max_kl * (1 if dtype == "float32" else 100) and figures["top1_agreement"] >= min_top1
        gate = {**figures, "passed": passed, "reference": "unmerged PeftModel (base + adapter), float32",
                "adapter_type": cfg.get("peft_type"), "use_dora": bool(cfg.get("use_dora")), "task_type": task}
        if not passed:
            raise CheckFailed(f"merge gate failed: max|dlogit|={figures['max_abs_diff']:.3g} (<= {max_abs_diff}), "
                              f"KL={figures['kl']:.3g} (<= {max_kl}), top-1={figures['top1_agreement']:.3f} (>= {min_top1})",
                              result=gate)
        merged.save_pretrained(str(run.dir), safe_serialization=True)
        tokenizer.save_pretrained(str(run.dir))
        run.results.update(kind="merged", task_type=task, dtype=dtype, gate=gate)
    return out


