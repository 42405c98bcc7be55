"""The decoder export core: onnxruntime-genai's model builder, driven by a target profile.

Everything a decoder export is made of, with no knowledge of its variants: the builder call with the
patches it needs (:func:`build`, :func:`builder_input`, :func:`builder_fixes`), ``genai_config.json``
from the profile (:func:`configure_genai`), what the graph is read back as (:func:`matmulnbits_attributes`,
:func:`lm_head_attributes`, :func:`embedding_kind`), the tokenizer check, and the builder export itself
(:func:`export_builder`: fp32 / fp16 / bf16 / int8 / int4 with every int4 algorithm, mixed precision, the
graph proof). The variants (the exact GGUF transcode, runtime and float adapters) build on this module;
:mod:`.export` dispatches between them. Nothing here imports a variant or the dispatcher.

The builder's option names changed between releases and unknown names are ignored silently, so every
export reads the MatMulNBits attributes back out of the graph and records them: the record proves the
options reached the graph.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ... import artifacts, console, onnx_graph
from ...cleanup import temp_dir
from ...tokenizer_parity import check_tokenizer
from ...errors import BadInput, CheckFailed, require
from ...plan import int4_plan
from ...quant import QATSpec, algorithms, embedding_block_size, int4_algorithm, int8_block_size
from ...targets import resolve
from . import kernels, stream_quant
from .mixed import base_name
from .quantize import (encode_calibration, inc_checkpoint, inc_weight_parity, load_calibration, quantize_embedding_in,
                       quantize_lm_head_in, quantize_onnx, share_embedding_with_head_in, tied_embeddings)

def matmulnbits_attributes(folder: Path, skip_prefix: str | None = None, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Distinct attribute sets of the MatMulNBits nodes in the exported graph."""

    model = onnx_graph.read(folder / "model.onnx")
    seen: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    skip = set(skip)
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or (skip_prefix and node.name.startswith(skip_prefix)) or base_name(node.name) in skip:
            continue
        attrs = onnx_graph.attributes(node)
        attrs = {k: v for k, v in attrs.items() if k in ("bits", "block_size", "accuracy_level")}
        # symmetric weights carry no zero points input
        attrs["zero_points"] = len(node.input) > 3 and bool(node.input[3])
        key = json.dumps(attrs, sort_keys=True)
        seen[key] = attrs
        counts[key] = counts.get(key, 0) + 1
    return [{**v, "count": counts[k]} for k, v in seen.items()]


def quant_aware_grid(model_dir: Path, precision: str, q: dict | None, mixed) -> dict | None:
    """A merged quant-aware fine-tune (merge gate ``vs_fake_quant``): does this export use its training grid?

    A different grid still exports (the user may mean it) but says so: the model shipped is then not the
    model the adapter was trained as.
    """
    gate = (((artifacts.read_record(model_dir) or {}).get("results") or {}).get("gate") or {}).get("vs_fake_quant")
    if not gate:
        return None
    spec = QATSpec(block_size=gate["block_size"], lm_head=gate["lm_head"])
    diffs = spec.matches_export(q) if precision == "int4" and q else [f"precision {precision} (trained for int4)"]
    if mixed:
        diffs.append("mixed 8-bit layers (trained for int4 everywhere)")
    if diffs:
        console.warn(f"{model_dir} was fine-tuned quant-aware for {spec.describe()}; this export differs: {'; '.join(diffs)}")
    return {"trained_grid": spec.describe(), "matches": not diffs, "differences": diffs}


def lm_head_attributes(folder: Path) -> dict[str, Any] | None:
    """How the graph stores the output head (/lm_head/ MatMul or MatMulNBits), read back from it."""

    model = onnx_graph.read(folder / "model.onnx")
    for node in model.graph.node:
        if node.name.startswith("/lm_head/") and node.op_type in ("MatMul", "MatMulNBits"):
            if node.op_type == "MatMul":
                return {"node": node.name, "op": "MatMul", "bits": 32, "kind": "fp32"}
            attrs = onnx_graph.attributes(node)
            return {"node": node.name, "op": "MatMulNBits", "bits": attrs.get("bits"), "block_size": attrs.get("block_size"),
                    "accuracy_level": attrs.get("accuracy_level", 0), "kind": f"int{attrs.get('bits')}"}
    return None


def config_value(model_dir: Path, *keys: str) -> int | None:
    """The first of ``keys`` set in the model's config.json (a multimodal one's text_config), as an int."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    v = next((cfg[k] for k in keys if cfg.get(k)), None)
    return int(v) if v else None


def hidden_size(model_dir: Path) -> int | None:
    return config_value(model_dir, "hidden_size", "n_embd", "d_model")


def configure_genai(folder: Path, target) -> None:
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


def builder_input(model_dir: Path, scratch: Path) -> Path:
    """Work around builder quirks without touching the user's folder (a view with its own config.json).

    * Phi-3 with the default RoPE but with original_max_position_embeddings != max_position_embeddings
      is routed to the LongRoPE builder, which then fails (KeyError 'multi_cache'; 0.15.2 and 0.18).
      With the default RoPE the original length has no effect in transformers, so align it.
      transformers 5 writes the RoPE as ``rope_parameters`` (always present, ``rope_type`` "default"
      unless scaled); 4.x configs carry ``rope_scaling`` only when scaled.
    * Builder 0.18 places sliding windows only on the layers ``config.layer_types`` marks
      "sliding_attention" (all "full_attention" when absent). Mistral and Phi-3 configs carry a
      ``sliding_window`` but no ``layer_types``, and transformers slides every layer: without the
      list the graph has no window (wrong logits past it; genai then also sizes the KV cache
      wrongly and fails). Spell the list out.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    changed = False
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if cfg.get("model_type") == "phi3" and rope_type == "default" and \
            cfg.get("original_max_position_embeddings") not in (None, cfg.get("max_position_embeddings")):
        cfg["original_max_position_embeddings"] = cfg["max_position_embeddings"]
        changed = True
    window = cfg.get("sliding_window")
    if cfg.get("model_type") in ("mistral", "phi3") and isinstance(window, int) and window > 0 and not cfg.get("layer_types"):
        cfg["layer_types"] = ["sliding_attention"] * int(cfg["num_hidden_layers"])
        changed = True
    if not changed:
        return model_dir
    view = scratch / "model"
    view.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps(cfg, indent=2))
    return view


def export_builder(model_dir: Path, out: Path, *, target, precision: str, int4=None, calibration=None, mixed=None,
                   allow_slow_kernel: bool = False, pack: bool = False) -> Path:
    """The builder's own export of an HF decoder folder (``precision`` fp32, fp16, bf16, int8 or int4).

    ``mixed``, ``allow_slow_kernel``: as :func:`edgetune.export.decoder.dispatch.export_llm`. ``pack``: on a CPU
    target, sibling MatMulNBits that read one input become one node + Split (:mod:`.pack`, bit-exact); the adapter
    variants, which find the base's nodes by name, build their base unpacked. Steps: the request checked before any
    work (:func:`_request`), the builder's options (:func:`_builder_extra`), the build with the algorithm's backend
    (:func:`_build_quantized`), the head and embedding (:func:`_head_and_embedding`), packing, the graph checked
    against the request (:func:`_check_graph`), the tokenizer and the graph proof, the record.
    """
    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)
    ep = t.runtime.resolved_builder_provider
    r = _request(model_dir, t, precision, int4, calibration, mixed, allow_slow_kernel)
    q, calib = r["q"], r["calib"]
    trained_grid = quant_aware_grid(model_dir, precision, q, mixed)
    extra = _builder_extra(model_dir, t, precision, q, mixed)
    pack = pack and t.runtime.execution_provider == "cpu" and precision in ("int4", "int8")
    options = {"precision": precision, "execution_provider": ep, "extra": extra, "int4": q, "mixed": mixed,
               "allow_slow_kernel": allow_slow_kernel, **({"pack": True} if pack else {}),
               "calibration": calib.sha256 if calib else None, "target": t.model_dump(mode="json", exclude={"source"})}
    inputs = {"model": model_dir, "calibration": calib.path if calib else None}
    with artifacts.stage_output(out, "export", inputs=inputs, options=options) as run, \
            temp_dir("genai") as cache_name:
        cache = Path(cache_name)
        token_ids = encode_calibration(model_dir, calib.texts) if calib else None
        qinfo, parity, head_scales = _build_quantized(model_dir, run.dir, cache, t, precision, r, extra, mixed, token_ids)
        _head_and_embedding(model_dir, run.dir, t, precision, q, r["backend"], extra, qinfo, head_scales)
        packed = None
        if pack:
            from .pack import pack_folder

            with console.step("pack sibling MatMulNBits (gate+up, q+k)"), console.results_only_stdout():
                packed = pack_folder(run.dir)
        configure_genai(run.dir, t)
        nbits, head, paths = _check_graph(run.dir, t, precision, q, r["alg"], qinfo, allow_slow_kernel)
        tok = check_tokenizer(run.dir, model_dir) if ep == "cpu" else None
        proof = None
        from .proof import has_lora_branches, prove

        if ep == "cpu" and not has_lora_branches(run.dir):  # the graph computes its model past any window (fp32: exact, else exit 1)
            with console.step("graph vs PyTorch (teacher-forced, past the sliding window)"), console.results_only_stdout():
                proof = prove(run.dir, model_dir, exact=precision == "fp32")
        size = sum(p.stat().st_size for p in run.dir.iterdir() if p.is_file())
        if calib:
            qinfo["calibration"] = {"file": str(calib.path), "samples": calib.count, "sha256": calib.sha256,
                                    "tokens": sum(len(x) for x in token_ids or [])}
        if parity:
            qinfo["weight_parity"] = parity
        if trained_grid:
            qinfo["quant_aware"] = trained_grid
        run.results.update(kind="decoder", precision=precision, target=t.name, execution_provider=t.runtime.execution_provider,
                           builder_provider=ep, int4=q if precision == "int4" else None, int8=q if precision == "int8" else None,
                           quantization=qinfo or None, embeddings=embedding_kind(run.dir),
                           matmulnbits=nbits, lm_head=head, kernel_paths={**kernels.summary(paths), "nodes": paths}, size_mb=round(size / 2**20, 3), tokenizer_check=tok,
                           graph_proof=proof, exporter="onnxruntime-genai builder",
                           **({"packed": {"groups": packed["groups"], "nodes": [g["node"] for g in packed["nodes"]]}} if packed else {}))
    return out


def _request(model_dir: Path, t, precision: str, int4, calibration, mixed, allow_slow_kernel: bool) -> dict[str, Any]:
    """The request checked before any work: the int4/int8 options (``q``), the algorithm (``alg``) and the backend
    that runs it, and the calibration texts (read now, so a bad file fails at once)."""
    q = dict(int4_plan(t, int4).options) if precision in ("int4", "int8") else None
    algorithm = q["algorithm"] if q else None
    alg = int4_algorithm(algorithm) if q else None
    if precision == "int8" and not alg.int8:
        raise BadInput(f"int8 is made by the builder ({' or '.join(algorithms(int8=True))}), not by int4 algorithm '{algorithm}'",
                       hint="use --int4-algorithm rtn with --precision int8, or --precision int4")
    from .mixed import check_mixed_request

    measure = check_mixed_request(mixed, precision=precision, algorithm=algorithm)
    if t.runtime.execution_provider == "cpu" and alg and alg.slow_kernel and precision == "int4" and not allow_slow_kernel:
        raise BadInput(alg.slow_kernel, hint="use rtn or k_quant (or pass --allow-slow-kernel to ship it anyway)")
    smooth = precision == "int4" and q.get("smooth_8bit")
    calibrated = precision == "int4" and (alg.calibrated or measure or smooth)
    if calibration is not None and not calibrated:
        names = algorithms(calibrated=True)
        raise BadInput(f"--calibration is only used by the int4 algorithms {', '.join(names[:-1])} and {names[-1]}, by mixed "
                       "precision and by --smooth-8bit",
                       hint=f"drop --calibration or pass --precision int4 --int4-algorithm {names[0]} (or {', '.join(names[1:])})")
    backend = alg.backend if precision == "int4" else "builder"
    if smooth:
        from .smooth import check_request

        check_request(mixed, accuracy_level=q["accuracy_level"], lm_head=q["lm_head"], backend=backend, model_dir=model_dir)
    if backend == "awq":
        from .awq import check_supported

        check_supported(model_dir)
    calib = load_calibration(calibration) if calibrated else None  # read (and fail) before any work
    return {"q": q, "algorithm": algorithm, "alg": alg, "backend": backend, "calib": calib, "smooth": bool(smooth)}


def _builder_extra(model_dir: Path, t, precision: str, q: dict | None, mixed) -> dict[str, str]:
    """The builder's ``extra_options`` for the request: block, symmetry, accuracy level, and where a tied embedding must
    be untied or the head left float."""
    from .mixed import unpacks_qkv

    extra: dict[str, str] = {}
    if q:
        extra = {"block_size": str(int8_block_size(q) if precision == "int8" else q["block_size"]),
                 "is_symmetric": str(q["symmetric"]).lower(),
                 "accuracy_level": str(q["accuracy_level"])}
        if q["algorithm"] == "k_quant":  # rtn = the quantizer's default RTN path (algo_config=rtn breaks on tied embeddings)
            extra["algo_config"] = q["algorithm"]
        if precision == "int8":  # 8-bit MatMulNBits is prepacked on the CPU at accuracy_level 4 only
            extra["accuracy_level"] = str(kernels.eight_bit_level(q["accuracy_level"], t.runtime.execution_provider))
        if precision == "int8" or not q["symmetric"]:
            # Builder 0.15.2 shares a tied lm_head with a GatherBlockQuantized embedding that only reads
            # symmetric int4 ("Gather only supports 4 bits", uint8 Reshape type error): untie, so the
            # embedding stays a float Gather and lm_head gets its own MatMulNBits. 0.18: still so for
            # asymmetric int4 (uint8 Reshape type error at load); tied int8 it unties by itself.
            extra["shared_embeddings"] = "false"
        if precision == "int4" and q["lm_head"] != "int4":
            # lm_head left float by the builder (then int8 by us, or kept fp32); a tied embedding is
            # untied (GatherBlockQuantized reads 4 bits only) and stored int4 after the build.
            extra["shared_embeddings"] = "false"
            extra["nodes_to_exclude"] = "/lm_head/MatMul"
        hidden = hidden_size(model_dir)
        if precision == "int4" and hidden and hidden % q["block_size"]:
            # A tied int4 embedding (GatherBlockQuantized) needs the block to divide the hidden size
            # (576 % 128 fails at run time in /model/embed_tokens/Reshape): untie; the own table is
            # then stored int4 with the largest block that divides (quantize_embedding).
            extra["shared_embeddings"] = "false"
            emb = embedding_block_size(hidden, q["block_size"])
            if q["lm_head"] != "int8" or not tied_embeddings(model_dir):  # a tied int8 head shares its own table
                console.warn(f"hidden size {hidden} is not a multiple of int4 block {q['block_size']}: embedding untied from "
                             "lm_head, " + (f"stored int4 with block {emb}" if emb else "kept float"))
    if precision == "int4" and unpacks_qkv(mixed):  # v_proj at 8 bits, q/k at 4: three MatMuls, not one packed qkv
        extra["fuse_qkv"] = "false"
    return extra


def _build_quantized(model_dir: Path, out: Path, cache: Path, t, precision: str, r: dict[str, Any], extra: dict[str, str],
                     mixed, token_ids) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """The graph into ``out`` by the request's backend: onnxruntime's quantizer over an fp32 build (``ort``),
    neural-compressor's checkpoint built and checked weight for weight (``inc``), or the builder itself with AWQ's
    scales folded in, imatrix/GPTQ values streamed into its nodes and/or mixed precision, over a checkpoint whose
    down_proj inputs ``--smooth-8bit`` smoothed. Returns (quantization record, neural-compressor's weight parity, the
    head's smoothing scales for :func:`_head_and_embedding` or None)."""
    q, algorithm, alg, backend = r["q"], r["algorithm"], r["alg"], r["backend"]
    ep = t.runtime.resolved_builder_provider
    src = builder_input(model_dir, cache)
    qinfo: dict[str, Any] = {"quantizer": "onnxruntime-genai builder"} if q else {}
    parity = None
    if backend == "ort":
        # fp32 graph with its own embedding table (untied), then its MatMuls quantized
        build(src, cache / "fp32", "fp32", ep, cache, {"shared_embeddings": "false"})
        with console.step(f"onnxruntime MatMulNBitsQuantizer ({algorithm} int4)"), console.results_only_stdout():
            qinfo = quantize_onnx(cache / "fp32", out, algorithm=algorithm, q=q, token_ids=token_ids)
        return qinfo, parity, None
    if backend == "inc":
        with console.step(f"neural-compressor ({algorithm} int4)"), console.results_only_stdout():
            qmodel, qinfo = inc_checkpoint(src, cache / "inc", algorithm=algorithm, q=q, token_ids=token_ids)
        build(cache / "inc", out, precision, ep, cache, extra)
        with console.step("weights: graph vs neural-compressor"):
            parity = inc_weight_parity(qmodel, out)
        del qmodel
        if not parity["compared"] or parity["max_abs_diff"] > 1e-5 * max(1.0, parity["max_abs_weight"]):
            raise CheckFailed(f"the graph's int4 weights differ from neural-compressor's (max |diff| {parity['max_abs_diff']:.3g} "
                              f"over {parity['compared']} MatMulNBits nodes)", hint="the builder misread the GPTQ-layout checkpoint")
        return qinfo, parity, None
    if backend == "awq":  # scales folded into a checkpoint; the builder's RTN then
        from .awq import scale_checkpoint

        # from the user's folder, not the builder's view: transformers 5 loads a mistral config that
        # carries layer_types (builder_input adds them) as Ministral, and would save it so
        with console.step("awq: activation-aware scales on the calibration texts"), console.results_only_stdout():
            qinfo["awq"] = scale_checkpoint(model_dir, cache / "awq", token_ids=token_ids, q=q)
        (cache / "awq-view").mkdir()
        src = builder_input(cache / "awq", cache / "awq-view")
    head_scales = None
    if r["smooth"]:  # exact in float: the imatrix statistics and the mixed plan below read the smoothed model
        from .smooth import down_layers, smooth_checkpoint

        layers = down_layers(mixed, config_value(model_dir, "num_hidden_layers") or 0)
        head_block = _head_block(model_dir, q) if q["lm_head"] == "int8" else None
        what = ", ".join(filter(None, [f"down_proj in {len(layers)} layers" if layers else "", "the head" if head_block else ""]))
        with console.step(f"smooth: the 8-bit nodes' activation outliers into the weights ({what})"), console.results_only_stdout():
            qinfo["smooth"], head_scales = smooth_checkpoint(model_dir, cache / "smooth", token_ids=token_ids, layers=layers,
                                                             block=int8_block_size(q), symmetric=q["symmetric"], head_block=head_block)
        if qinfo["smooth"]["checkpoint_changed"]:
            (cache / "smooth-view").mkdir()
            model_dir, src = cache / "smooth", builder_input(cache / "smooth", cache / "smooth-view")
    plan = None
    requantize = None
    if backend == "imatrix" and alg.error_feedback:  # the same nodes, GPTQ over the imatrix search
        from .imatrix import Requantizer, collect_hessians

        with console.step(f"{algorithm}: input correlations on the calibration texts"), console.results_only_stdout():
            hessians, importance = collect_hessians(model_dir, token_ids, spill_dir=cache / "correlations")
        if getattr(hessians, "record", None):
            r_ = hessians.record
            console.log(f"{algorithm}: the input correlations would need {r_['memory_needed_bytes'] / 2**30:.1f} GiB of memory "
                         f"({r_['memory_allowed_bytes'] / 2**30:.1f} GiB may be used); the inputs are on disk "
                         f"({r_['disk_bytes'] / 2**30:.1f} GiB) and each one's is computed when its linear is reached")
        requantize = Requantizer(importance, hessians)
    elif backend == "imatrix":  # the builder's RTN nodes, their values from the importance-weighted search
        from .imatrix import Requantizer, collect

        with console.step("imatrix: activation importance on the calibration texts"), console.results_only_stdout():
            requantize = Requantizer(collect(model_dir, token_ids))
    with stream_quant.requantizing(requantize):
        if mixed:
            from .mixed import plan_mixed

            plan = plan_mixed(mixed, src=src, model_dir=model_dir, cache=cache, token_ids=token_ids,
                              build=lambda d: build(src, d, precision, ep, cache, extra))
            extra = {**extra, "nodes_to_exclude": ",".join(filter(None, [extra.get("nodes_to_exclude"), *plan["layers"]]))}
        if requantize:
            requantize.done.clear()
        with stream_quant.quantizing_excluded(_eight_bit_settings(plan, q, t) if plan else {}):
            build(src, out, precision, ep, cache, extra)
    shutil.rmtree(cache / "correlations", ignore_errors=True)  # GPTQ's spilled inputs, if any: ours, and large
    if requantize:
        qinfo["imatrix"] = requantize.summary()
        if not requantize.done:
            raise CheckFailed("the importance-weighted search requantized no MatMul of the builder's graph",
                              hint="use --int4-algorithm rtn; this builder version quantizes in a way edgetune does not stream")
        if requantize.skipped:  # kept RTN's values: said, and listed in results.quantization.imatrix.skipped
            console.warn(f"{algorithm}: {len(requantize.skipped)} of {len(requantize.skipped) + len(requantize.done)} MatMuls "
                         f"kept RTN's values (no calibration input was found for them; first: {requantize.skipped[0]})")
    if plan:
        from .mixed import finish_mixed

        with console.step(f"mixed precision: {len(plan['layers'])} MatMuls at 8 bits"), console.results_only_stdout():
            qinfo["mixed"] = finish_mixed(out, plan, q=q, execution_provider=t.runtime.execution_provider)
    return qinfo, parity, head_scales


def _eight_bit_settings(plan: dict, q: dict, t) -> dict[str, dict[str, Any]]:
    """Mixed precision's 8-bit MatMuls as the streamed pass quantizes them (:mod:`.stream_quant`), with the settings
    :func:`.mixed.finish_mixed` would give them after the build (which then only checks them)."""
    level = kernels.eight_bit_level(q["accuracy_level"], t.runtime.execution_provider)
    own = {"bits": 8, "block_size": int8_block_size(q), "is_symmetric": q["symmetric"], "accuracy_level": level or None}
    return {name: own for name in plan["layers"]}


def _head_block(model_dir: Path, q: dict) -> int:
    """The int8 head's block: the 8-bit nodes', or for a tied head (its table is also the embedding's) the widest up to it
    that divides the hidden size."""
    block = int8_block_size(q)
    if tied_embeddings(model_dir):
        block = embedding_block_size(hidden_size(model_dir) or block, block) or block
    return block


def _head_and_embedding(model_dir: Path, out: Path, t, precision: str, q: dict | None, backend: str, extra: dict[str, str],
                        qinfo: dict[str, Any], head_scales=None) -> None:
    """An int8 lm_head (and a tied embedding sharing its table), or an embedding we untied stored int4 too.
    ``head_scales``: ``--smooth-8bit``'s for the head, folded into the float head and the final norm first."""
    if precision == "int4" and q["lm_head"] == "int8":
        tied = tied_embeddings(model_dir)
        if head_scales is not None:
            from .smooth import smooth_head_in

            with console.step("smooth: the head's scales into its rows and the final norm"), console.results_only_stdout():
                folded = smooth_head_in(out, head_scales)
            qinfo["smooth"]["head"]["folded"] = folded
            if folded is None:  # the graph's head input is not a norm's own: left as it is
                console.warn("--smooth-8bit: the head's input is not made by a norm it alone reads; the head is not smoothed")
                head_scales = None
        with console.step("int8 lm_head (MatMulNBits bits=8)"), console.results_only_stdout():
            # CPU: 8-bit MatMulNBits at accuracy_level 0 dequantizes the whole head every step (SmolLM2:
            # ~1 tok/s instead of ~11); level 4 (int8 activations) runs MLAS's int8 kernel at int4 speed.
            head_level = kernels.eight_bit_level(q["accuracy_level"], t.runtime.execution_provider)
            block = _head_block(model_dir, q)
            quantize_lm_head_in(out, bits=8, block_size=block, symmetric=q["symmetric"], accuracy_level=head_level)
            qinfo["lm_head_block_size"] = block
        if tied:  # one int8 matrix for both, not an int8 head + an int4 copy
            with console.step("embedding: the int8 head's table (GatherBlockQuantized bits=8)"), console.results_only_stdout():
                shared = share_embedding_with_head_in(out, head_scales=head_scales)
            if shared:
                qinfo["embedding"] = shared["embedding"]
    if precision == "int4" and backend != "ort" and extra.get("shared_embeddings") == "false" and "embedding" not in qinfo:
        # untied by us (asymmetric int4): store the now separate embedding as int4 too, not float
        with console.step("int4 embedding (GatherBlockQuantized)"), console.results_only_stdout():
            if quantize_embedding_in(out, block_size=q["block_size"], symmetric=q["symmetric"]):
                emb = embedding_block_size(hidden_size(model_dir) or q["block_size"], q["block_size"])
                qinfo["embedding"] = (f"int4 {'symmetric' if q['symmetric'] else 'asymmetric'} RTN (DefaultWeightOnlyQuantConfig)"
                                      f", block {emb}")


def _check_graph(out: Path, t, precision: str, q: dict | None, alg, qinfo: dict[str, Any],
                 allow_slow_kernel: bool) -> tuple[list, dict | None, list]:
    """The written graph against the request: the head's kind, every MatMulNBits node's bits, block, accuracy level
    and zero points, and (CPU) no node off the prepacked kernels. Returns (MatMulNBits attributes, head, kernel paths)."""
    nbits = matmulnbits_attributes(out)
    head = lm_head_attributes(out)
    if precision == "int4" and head and head["kind"] != q["lm_head"]:
        raise CheckFailed(f"the graph's lm_head is {head['kind']} ({head['op']}), not the requested {q['lm_head']}",
                          hint="the builder ignored nodes_to_exclude; check the onnxruntime-genai version")
    if precision == "int4" and q["lm_head"] == "int8" and head and head.get("block_size") != qinfo.get("lm_head_block_size"):
        raise CheckFailed(f"the graph's int8 lm_head has block {head.get('block_size')}, not {qinfo.get('lm_head_block_size')}",
                          hint="onnxruntime's MatMulNBitsQuantizer ignored block_size; check the onnxruntime version")
    if precision in ("int4", "int8"):
        bits = 4 if precision == "int4" else 8

        def zero_points_ok(a) -> bool:
            if alg.zero_points == "folded":  # converted to the symmetric + correction form: none may remain
                return not a["zero_points"]
            if not q["symmetric"]:
                return a["zero_points"]
            return alg.zero_points == "always" or not a["zero_points"]

        eight = set((qinfo.get("mixed") or {}).get("layers", []))  # checked by finish_mixed
        if precision == "int4" and (q["lm_head"] == "int8" or eight):  # the head is checked above
            nbits_body = matmulnbits_attributes(out, skip_prefix="/lm_head/", skip=eight)
        else:
            nbits_body = nbits
        level = kernels.eight_bit_level(q["accuracy_level"], t.runtime.execution_provider) if bits == 8 else q["accuracy_level"]
        block = int8_block_size(q) if bits == 8 else q["block_size"]
        bad = [a for a in nbits_body if a.get("bits") != bits or a.get("block_size") != block
               or a.get("accuracy_level", 0) != level or not zero_points_ok(a)]
        if not nbits_body or bad:
            raise CheckFailed(f"the graph's MatMulNBits nodes do not carry the requested options: {bad or 'none found'}",
                              hint="the builder ignored an option; check the onnxruntime-genai version")
    paths = kernels.kernel_paths(out)
    slow = kernels.slow_nodes(paths)
    if t.runtime.execution_provider == "cpu" and slow and not allow_slow_kernel:
        raise CheckFailed(f"{len(slow)} MatMulNBits nodes would run off the CPU's prepacked kernels ({slow[0]['node']}: {slow[0]['path']})",
                          hint="use rtn or k_quant, accuracy_level 4 for 8-bit, or --allow-slow-kernel")
    return nbits, head, paths


def build(src: Path, out_dir: Path, precision: str, ep: str, cache: Path, extra: dict[str, str]) -> None:
    builder = require("onnxruntime_genai.models.builder", purpose="LLM export")
    with console.step(f"onnxruntime-genai builder ({precision}, {ep})"), console.results_only_stdout(), \
            builder_fixes(builder):
        kv = builder.parse_extra_options("", str(src), str(out_dir), precision, ep, str(cache),
                                         [f"{k}={v}" for k, v in extra.items()])
        builder.create_model("", str(src), str(out_dir), precision, ep, str(cache), **kv)


@contextmanager
def builder_fixes(builder) -> Iterator[None]:
    """Patch the builder where onnxruntime-genai 0.18 and transformers 5 disagree, for this build only.

    Gemma 3: transformers 5 keeps its RoPE per layer type (``rope_parameters = {"sliding_attention":
    {...}, "full_attention": {...}}``), while the builder's ``Gemma3Model`` reads one flat
    ``rope_parameters`` plus ``rope_local_base_freq`` (KeyError 'rope_type' otherwise). It gets the
    full-attention parameters flat and the sliding layers' base as ``rope_local_base_freq``, which is what
    it builds its two rotary caches from. The export's graph proof (:mod:`.proof`) checks the result.
    (0.15.2's hard-coded Gemma 2 / 3 sliding patterns, patched here before, are gone: 0.18 reads
    ``config.layer_types``.)

    int4 / int8: the MatMul weights are quantized one at a time before the builder's own pass
    (:mod:`.stream_quant`), which otherwise holds the whole model in fp32 (23 GiB for a 3.8B model).
    """
    base = getattr(builder, "Model", None)
    to_nbits = getattr(base, "to_nbits", None)
    if to_nbits is not None and stream_quant.ENABLED:
        module = sys.modules[base.__module__]

        def streamed_to_nbits(self):  # int4 without the whole fp32 model in memory (stream_quant)
            if stream_quant.REQUANTIZE is not None and not stream_quant.applies(self):
                raise CheckFailed("the builder quantizes this model in one pass edgetune cannot stream, so the "
                                  "importance-weighted search cannot replace its values",
                                  hint="use --int4-algorithm rtn (or awq)")
            if stream_quant.applies(self):
                fmt = module.QuantFormat.QDQ if self.quant_attrs["use_qdq"] else module.QuantFormat.QOperator
                stream_quant.prequantize(self, module.MatMulNBitsQuantizer, fmt)
            return to_nbits(self)

        base.to_nbits = streamed_to_nbits
    try:
        with _gemma3_flat_rope(builder):
            yield
    finally:
        if to_nbits is not None:
            base.to_nbits = to_nbits


@contextmanager
def _gemma3_flat_rope(builder) -> Iterator[None]:
    cls = getattr(builder, "Gemma3Model", None)
    if cls is None:
        yield
        return
    init = cls.__init__

    def flat_rope_init(self, config, *args, **kwargs):
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
            local = rope.get("sliding_attention") or rope["full_attention"]
            config.rope_local_base_freq = local["rope_theta"]
            config.rope_theta = rope["full_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])
        init(self, config, *args, **kwargs)

    cls.__init__ = flat_rope_init
    try:
        yield
    finally:
        cls.__init__ = init


def embedding_kind(folder: Path) -> str:
    """How the graph stores the token embedding, read back from it."""

    model = onnx_graph.read(folder / "model.onnx")
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if not node.name.startswith("/model/embed_tokens/"):
            continue
        if node.op_type == "GatherBlockQuantized":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits} GatherBlockQuantized, " + ("own table" if node.input[0] in inits else "shared with lm_head")
        if node.op_type == "Gather":
            return "float Gather, own table" if node.input[0] in inits else "float Gather, shared with lm_head"
    return "unknown"
