"""A fixed float LoRA over a quantized base: ``edgetune export BASE --float-adapter ADAPTER``.

Merging a LoRA and re-quantizing the merged weights rounds the trained delta away: on the demo
fine-tune the int4 RTN merged model keeps 5 % task exact match of 27.5 % (docs/llm.md). Here the
delta is never quantized: ONE self-contained graph holds the base (fp32, fp16, int4/int8 from the
builder, or any other base precision ``export_llm`` makes) plus, at every targeted linear layer, a
float side branch ``x @ A^T @ (scaling * B)^T`` added to that layer's output.

How: onnxruntime-genai's builder already bakes a LoRA into the graph when given ``adapter_path``
(``make_matmul_lora``: ``/…/<proj>/lora_A/MatMul`` -> ``/…/<proj>/lora_B/MatMul`` with
``scaling`` folded into B, then ``/…/<proj>/lora/Add`` on the base MatMul's output). Left alone,
its int4/int8 pass (``to_nbits``) would quantize those branch MatMuls like any other, so the
builder hooks of :mod:`.adapters` record the two MatMuls it makes per module and put them in the
builder's ``nodes_to_exclude``. The same hooks run for every builder call of the export, so a
base made from the builder's fp32 graph (e.g. a graph-surgery transcode) carries the branches too.
Contract with such a transcode: branch nodes carry ``lora_`` in their names and must be skipped;
the branch adds to the base linear MatMul's output tensor (``/…/<proj>/MatMul/output_0``).

Only plain LoRA on the decoder blocks' linear layers is accepted (:func:`.adapters.read_lora`):
DoRA (magnitude vector) and other PEFT types are refused with "merge first". The export is
checked against PyTorch (base + the unmerged PEFT adapter, and the merged model): fp32 must match
within :data:`.adapters.FP32_TOLERANCE`; for a quantized base the distance is recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ... import artifacts, console, onnx_graph
from ...errors import BadInput, CheckFailed, require
from .adapters import _MERGE_HINT, BUILDER_QUANT, CHECK_PROMPTS, FP32_TOLERANCE, builder_hooks, check_against_base, read_lora, sources

FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}  # onnx.TensorProto data types
LORA_MARK = "lora_"  # every branch node name carries it (the contract with base transcoders)


def lora_graph(folder: Path) -> dict[str, Any]:
    """The LoRA branch nodes of an exported graph, read back from it: op types and weight dtypes."""
    import onnx

    model = onnx_graph.read(Path(folder) / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    quantized: list[str] = []
    params = 0
    for node in model.graph.node:
        if LORA_MARK not in node.name:
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type != "MatMul":
            if node.op_type != "Add":
                quantized.append(node.name)  # MatMulNBits, DequantizeLinear, ...: not a float branch
            continue
        w = inits.get(node.input[1])
        kind = FLOAT_TYPES.get(w.data_type, onnx.TensorProto.DataType.Name(w.data_type)) if w is not None else "graph input"
        dtypes[kind] = dtypes.get(kind, 0) + 1
        if w is not None:
            n = 1
            for d in w.dims:
                n *= int(d)
            params += n
        if kind not in FLOAT_TYPES.values():
            quantized.append(node.name)
    return {"ops": ops, "weight_dtypes": dtypes, "parameters": params, "not_float": quantized}


def _kl_top1(got, want) -> tuple[float, float, int]:
    """Mean KL(want || got) per position, top-1 agreements and positions (float64 softmax)."""
    import numpy as np

    def logp(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lw, lg = logp(want), logp(got)
    kl = float((np.exp(lw) * (lw - lg)).sum(-1).mean())
    return kl, int((got.argmax(-1) == want.argmax(-1)).sum()), int(want.shape[0])


def check_float_adapter(folder: Path, model_dir: Path, adapter: Path, *, strict: bool) -> dict[str, Any]:
    """Logits of the export vs PyTorch fp32 base + the unmerged PEFT adapter and vs the merged model."""
    import numpy as np

    torch = require("torch", purpose="float adapter check")
    transformers = require("transformers", purpose="float adapter check")
    peft = require("peft", purpose="float adapter check")
    from ...device import llm as dev

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok(p, return_tensors="pt")["input_ids"] for p in CHECK_PROMPTS]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    llm = dev.load(folder)
    got = [dev.logits(llm, ids[0].numpy()) for ids in prompts]
    refs: dict[str, list] = {}
    with torch.no_grad():
        refs["peft_unmerged"] = [model(ids).logits[0].float().numpy() for ids in prompts]
        with model.disable_adapter():
            refs["base_only"] = [model(ids).logits[0].float().numpy() for ids in prompts]
        merged = model.merge_and_unload().eval()
        refs["merged"] = [merged(ids).logits[0].float().numpy() for ids in prompts]
    figures: dict[str, Any] = {}
    for name, want in refs.items():
        worst, kl_sum, agree, n = 0.0, 0.0, 0, 0
        for g, w in zip(got, want):
            worst = max(worst, float(np.abs(g - w).max()))
            kl, a, m = _kl_top1(g, w)
            kl_sum, agree, n = kl_sum + kl * m, agree + a, n + m
        figures[name] = {"max_abs_diff": worst, "kl": kl_sum / n, "top1_agreement": agree / n}
    # the adapter's own effect, for scale: how far it moves the fp32 logits
    eff = max(float(np.abs(a - b).max()) for a, b in zip(refs["peft_unmerged"], refs["base_only"]))
    passed = figures["peft_unmerged"]["max_abs_diff"] <= FP32_TOLERANCE if strict else None
    if strict and not passed:
        raise CheckFailed(f"float adapter check failed: the export differs from PyTorch base + adapter by max|dlogit|="
                          f"{figures['peft_unmerged']['max_abs_diff']:.3g} (> {FP32_TOLERANCE})", result=figures)
    return {"reference": "PyTorch float32: base + unmerged PEFT adapter (peft_unmerged), merge_and_unload (merged), "
                         "base without adapter (base_only)", "prompts": len(prompts), "tolerance": FP32_TOLERANCE if strict else None,
            "passed": passed, "adapter_effect_max_abs": eff, "vs": figures}


def export_with_float_adapter(model_dir: Path, out: Path, *, target, precision: str | None, int4=None, adapter,
                              calibration=None, fuse: bool = True, base_export: Callable[..., Path]) -> Path:
    """``edgetune export BASE --float-adapter ADAPTER``: one graph, quantized base + float LoRA branches.

    ``fuse`` (precision gguf): after the branch check, the LoRA branches and the GGUF block-sum corrections of the
    linears sharing an input become one MatMul per group + one MatMul/Add per linear (:mod:`.fuse`); the check
    against PyTorch then runs on the fused graph. ``base_export``: makes the base graph
    (:func:`edgetune.export.decoder.dispatch.base_export`), with the builder hooked here.
    """
    from ...plan import int4_plan, llm_precision
    from ...targets import resolve

    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)
    int4 = int4_plan(t, int4)
    precision = llm_precision(t, precision)
    algorithm = int4.options["algorithm"] if precision in ("int4", "int8") else None
    if algorithm not in (None, *BUILDER_QUANT):
        # awq rescales the inputs the LoRA reads; hqq/gptq re-quantize the builder's fp32 graph on their own
        # (gptq ignores exclusions); inc-* feed the builder a GPTQ-layout checkpoint that peft cannot wrap
        raise BadInput(f"a float adapter works over the builder's own int4 algorithms ({', '.join(BUILDER_QUANT)}), not '{algorithm}'",
                       hint=f"use --int4-algorithm rtn or k_quant, or {_MERGE_HINT}")
    spec = read_lora(adapter)
    check_against_base([spec], model_dir)
    builder = require("onnxruntime_genai.models.builder", purpose="LLM export")
    inputs = {"model": model_dir, "float_adapter": spec.path}
    options = {"precision": precision, "int4": int4.overrides, "float_adapter": spec.name, "fuse": fuse,
               "target": t.model_dump(mode="json", exclude={"source"})}
    with artifacts.stage_output(out, "export", inputs=inputs, options=options) as run:
        plan: dict[str, dict[str, Any]] = {}
        with builder_hooks(builder, spec.path, plan, as_inputs=False):
            base_export(model_dir, run.dir, target=t, precision=precision, int4=int4, calibration=calibration, fuse=False)
        missing = sorted(set(spec.modules) - sources(plan))
        if missing:
            raise BadInput(f"the ONNX builder made no LoRA branch for {missing[0]}", hint=_MERGE_HINT)
        graph = lora_graph(run.dir)
        want = 2 * len(plan)  # a packed target (Phi-3 qkv_proj, gate_up_proj) is one branch per part
        if graph["not_float"] or graph["ops"].get("MatMul", 0) != want:
            raise CheckFailed(f"the graph's LoRA branches are not {want} float MatMuls: {graph['ops']} "
                              f"(not float: {graph['not_float'][:3]})", hint="a quantizer reached the adapter; report this as a bug")
        inner = artifacts.read_record(run.dir) or {}
        fusion = {"fused": False, "reason": "--no-fuse" if not fuse else f"base precision {precision} (fused for gguf only)"}
        if fuse and precision == "gguf":
            from .fuse import fuse_step

            fusion = fuse_step(run.dir, fuse, "fuse LoRA branches + block-sum corrections (one MatMul per input group)")
        check = None
        if t.runtime.resolved_builder_provider == "cpu":
            with console.step("float adapter check (onnxruntime vs PyTorch base + PEFT, and vs merged)"):
                check = check_float_adapter(run.dir, model_dir, spec.path, strict=precision == "fp32")
        results = dict(inner.get("results") or {})
        if fusion.get("fused"):
            results["gguf"] = {**(results.get("gguf") or {}), "fusion": fusion}
            results["size_mb"] = round(sum(p.stat().st_size for p in run.dir.iterdir() if p.is_file()) / 2**20, 3)
        results.update(
            float_adapter={"name": spec.name, "sha256": artifacts.hash_path(spec.path), "method": spec.method, "rank": spec.rank,
                           "lora_alpha": spec.config.get("lora_alpha"), "use_rslora": bool(spec.config.get("use_rslora")),
                           "modules": len(spec.modules), "target_modules": sorted({m.rsplit(".", 1)[-1] for m in spec.modules}),
                           "branch_ops": graph["ops"], "branch_weight_dtypes": graph["weight_dtypes"],
                           "branch_parameters": graph["parameters"]},
            float_adapter_check=check, fusion=fusion,
            base_export_options={k: v for k, v in (inner.get("options") or {}).items() if k != "target"})
        run.results.update(results)
    return out
