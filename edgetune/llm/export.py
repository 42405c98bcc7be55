"""Decoder export: onnxruntime-genai's model builder, driven by a target profile.

The builder's option names changed between releases and unknown names are ignored
silently, so every export reads the MatMulNBits attributes back out of the graph and
records them: the record proves the options reached the graph.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .. import artifacts, console
from ..errors import BadInput, CheckFailed, require
from ..targets import load_target

BUILDER_ALGORITHMS = ("rtn", "k_quant")  # algo_config values the 0.15.2 builder accepts
OTHER_ALGORITHMS = ("hqq", "gptq", "inc-rtn", "inc-gptq", "inc-awq", "inc-autoround")
TOKENIZER_PROBES = (
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines",
    "naïve café — ünïcödé 日本語 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "def f(x):\n    return x**2  # code",
)


class _stdout_to_stderr:
    """The builder prints on stdout; stdout belongs to the result (--json)."""

    def __enter__(self):
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        self._py, sys.stdout = sys.stdout, sys.stderr

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stdout = self._py
        os.dup2(self._saved, 1)
        os.close(self._saved)


def int4_options(target, int4: dict | None) -> dict[str, Any]:
    q = target.quantization.int4.model_dump()
    q.update({k: v for k, v in (int4 or {}).items() if v is not None})
    unknown = set(q) - {"algorithm", "block_size", "symmetric", "accuracy_level"} - set(target.quantization.int4.model_dump())
    if unknown:
        raise BadInput(f"unknown int4 option(s): {', '.join(sorted(unknown))}", hint="use algorithm, block_size, symmetric, accuracy_level")
    if q["algorithm"] not in BUILDER_ALGORITHMS:
        raise BadInput(
            f"int4 algorithm '{q['algorithm']}' is not available in this edgetune build",
            hint=f"use one of {', '.join(BUILDER_ALGORITHMS)} (HQQ/GPTQ/neural-compressor paths are not implemented yet, see docs/llm.md)",
        )
    if q["block_size"] not in (16, 32, 64, 128, 256):
        raise BadInput(f"int4 block size {q['block_size']} is not supported", hint="use 16, 32, 64, 128 or 256")
    return q


def matmulnbits_attributes(folder: Path) -> list[dict[str, Any]]:
    """Distinct attribute sets of the MatMulNBits nodes in the exported graph."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    seen: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v for k, v in attrs.items() if k in ("bits", "block_size", "accuracy_level")}
        # symmetric weights carry no zero points input
        attrs["zero_points"] = len(node.input) > 3 and bool(node.input[3])
        key = json.dumps(attrs, sort_keys=True)
        seen[key] = attrs
        counts[key] = counts.get(key, 0) + 1
    return [{**v, "count": counts[k]} for k, v in seen.items()]


def _configure_genai(folder: Path, target) -> None:
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    g, s, r = target.generation, target.session, target.runtime
    model = cfg["model"]
    model["context_length"] = min(int(model.get("context_length") or g.context_length), g.context_length)
    search = cfg.setdefault("search", {})
    search.update(max_length=min(g.max_length, model["context_length"]), do_sample=g.do_sample, temperature=g.temperature,
                  top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty)
    so = model["decoder"].setdefault("session_options", {})
    if s.intra_op_threads:
        so["intra_op_num_threads"] = s.intra_op_threads
    if s.inter_op_threads:
        so["inter_op_num_threads"] = s.inter_op_threads
    so["enable_cpu_mem_arena"] = s.enable_cpu_mem_arena
    so["enable_mem_pattern"] = s.enable_mem_pattern
    if r.execution_provider != "cpu":
        opts = {k: str(v) for k, v in r.provider_options.items()}
        so["provider_options"] = [{r.execution_provider: opts}]
    else:
        so.pop("provider_options", None) if not so.get("provider_options") else None
    path.write_text(json.dumps(cfg, indent=4))


def check_tokenizer(folder: Path, model_dir: Path, probes: Iterable[str] = TOKENIZER_PROBES) -> dict[str, Any]:
    """onnxruntime-genai must encode exactly like the reference HF tokenizer."""
    og = require("onnxruntime_genai", purpose="tokenizer check")
    transformers = require("transformers", purpose="tokenizer check")
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    try:
        tok = og.Tokenizer(og.Model(str(folder)))
    except RuntimeError as e:
        raise CheckFailed(f"the export does not load in onnxruntime-genai: {str(e).splitlines()[0][:300]}",
                          hint="asymmetric int4 with tied embeddings is known to break in builder 0.15.2; try --int4-symmetric") from None
    mismatches = []
    for s in probes:
        got = [int(i) for i in tok.encode(s)]
        want = ref.encode(s, add_special_tokens=True)
        if got != want:
            mismatches.append({"text": s, "genai": got[:16], "reference": want[:16]})
    if mismatches:
        raise CheckFailed(
            f"onnxruntime-genai tokenizes {len(mismatches)}/{len(probes)} probe strings differently from the reference tokenizer "
            f"(first: {mismatches[0]['text']!r})", hint="re-materialize the model so its tokenizer is normalized")
    return {"probes": len(probes), "mismatches": 0}


def _builder_input(model_dir: Path, scratch: Path) -> Path:
    """Work around builder 0.15.2 quirks without touching the user's folder.

    Phi-3 without rope_scaling but with original_max_position_embeddings != max_position_embeddings
    is routed to the LongRoPE builder, which then fails (KeyError 'multi_cache'). Without
    rope_scaling the original length has no effect in transformers, so align it.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "phi3" and not cfg.get("rope_scaling") and \
            cfg.get("original_max_position_embeddings") not in (None, cfg.get("max_position_embeddings")):
        view = scratch / "model"
        view.mkdir()
        for f in model_dir.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f.resolve())
        cfg["original_max_position_embeddings"] = cfg["max_position_embeddings"]
        (view / "config.json").write_text(json.dumps(cfg, indent=2))
        return view
    return model_dir


def export_llm(model_dir, out, *, target, precision=None, int4=None, adapters=(), calibration=None) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    t = load_target(target)
    precision = precision or t.precision.llm
    if precision not in ("fp32", "fp16", "bf16", "int8", "int4"):
        raise BadInput(f"unknown precision '{precision}'", hint="use fp32, fp16, bf16, int8 or int4")
    if adapters:  # runtime-switchable LoRAs: the base graph once (through this function) + one .onnx_adapter each
        from .adapters import export_with_adapters

        return export_with_adapters(model_dir, out, target=target, precision=precision, int4=int4, adapters=adapters,
                                    calibration=calibration)
    if calibration is not None:
        raise BadInput("--calibration is only used by GPTQ, which is not implemented yet", hint="drop --calibration or use algorithm rtn/k_quant")
    ep = t.runtime.resolved_builder_provider
    q = int4_options(t, int4) if precision in ("int4", "int8") else None
    extra: dict[str, str] = {}
    if q:
        extra = {"block_size": str(q["block_size"]), "is_symmetric": str(q["symmetric"]).lower(),
                 "accuracy_level": str(q["accuracy_level"])}
        if q["algorithm"] != "rtn":  # rtn = the quantizer's default RTN path (algo_config=rtn breaks on tied embeddings)
            extra["algo_config"] = q["algorithm"]
    builder = require("onnxruntime_genai.models.builder", purpose="LLM export")
    options = {"precision": precision, "execution_provider": ep, "extra": extra, "target": t.model_dump(mode="json", exclude={"source"})}
    with artifacts.stage_output(out, "export", inputs={"model": model_dir}, options=options) as run, \
            tempfile.TemporaryDirectory(prefix="edgetune-genai-") as cache:
        with console.step(f"onnxruntime-genai builder ({precision}, {ep})"), _stdout_to_stderr():
            src = _builder_input(model_dir, Path(cache))
            kv = builder.parse_extra_options("", str(src), str(run.dir), precision, ep, cache,
                                             [f"{k}={v}" for k, v in extra.items()])
            builder.create_model("", str(src), str(run.dir), precision, ep, cache, **kv)
        _configure_genai(run.dir, t)
        nbits = matmulnbits_attributes(run.dir)
        if precision in ("int4", "int8"):
            bits = 4 if precision == "int4" else 8
            bad = [a for a in nbits if a.get("bits") != bits or a.get("block_size") != q["block_size"]
                   or a.get("accuracy_level", 0) != q["accuracy_level"] or a["zero_points"] == q["symmetric"]]
            if not nbits or bad:
                raise CheckFailed(f"the graph's MatMulNBits nodes do not carry the requested options: {bad or 'none found'}",
                                  hint="the builder ignored an option; check the onnxruntime-genai version")
        tok = check_tokenizer(run.dir, model_dir) if ep == "cpu" else None
        size = sum(p.stat().st_size for p in run.dir.iterdir() if p.is_file())
        run.results.update(kind="decoder", precision=precision, target=t.name, execution_provider=t.runtime.execution_provider,
                           builder_provider=ep, int4=q if precision == "int4" else None, int8=q if precision == "int8" else None,
                           matmulnbits=nbits, size_mb=round(size / 2**20, 3), tokenizer_check=tok,
                           exporter="onnxruntime-genai builder")
    return out
