"""``--precision gguf``: the GGUF's own quantized weights in onnxruntime's fast MatMulNBits kernels, exactly.

A GGUF input is otherwise dequantized (transformers) and re-quantized to int4, which moves every
weight off the grid it was trained/quantized on (SmolLM2 Q4_1: +29 % perplexity). Here:

1. the onnxruntime-genai builder makes the fp32 graph from the dequantized HF folder (the
   materialized GGUF), so the graph structure, genai_config and tokenizer are the builder's own;
2. each linear MatMul's float weight is replaced by the GGUF tensor's blocks
   (:mod:`edgetune.export.decoder.gguf_blocks` -> :mod:`edgetune.export.decoder.blockform`): symmetric MatMulNBits
   (prepacked path) plus an exact block-sum correction where the type has a min. GGUF names come
   from transformers' own map (``get_gguf_hf_weights_map``) and Llama's q/k row permutation from
   transformers' own tensor processor, applied to the blocks' rows (exact: blocks run along K);
3. the token embedding becomes a GatherBlockQuantized over the same blocks (sharing the head's
   storage when they are tied), with a gathered correction for types with a min;
4. every rewritten tensor is proved: its dequantized ONNX weight equals ``gguf.quants.dequantize``
   of the GGUF tensor (after the permutation) and the builder's fp32 weight, within fp32 rounding.

MatMuls whose name contains ``lora_`` (runtime adapters, :mod:`edgetune.export.decoder.adapters`) are left
alone; every rewritten linear's last node still writes the original MatMul output tensor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ... import artifacts, console, onnx_graph
from ...cleanup import temp_dir
from ...errors import BadInput, CheckFailed, require
from .blockform import MS_DOMAIN, BlockForm, GraphEdit, exact_float
from .packed import BLOCKS, HEAD, PACKED, PART_OF, builder_linear, part_rows

TOLERANCE = 1e-6  # max |w_onnx - w_gguf| / max |w_gguf| per tensor (fp32 rounding of the offset fold)
# 8-bit MatMulNBits at accuracy_level 0 on the CPU dequantizes B to fp32 and runs SGEMM on every call
# (SmolLM2's 576x49152 head: 660 ms vs 6 ms at level 4, measured in docs/llm.md): 8-bit nodes get level 4.
EIGHT_BIT_CPU_LEVEL = 4


def _part_rows(part: str, n: int, config: dict[str, Any]) -> slice:
    """The rows of a packed tensor of ``n`` rows that a node the builder split out of it takes (packed.part_rows,
    q/k/v sized from the config)."""
    cfg = config.get("text_config") or config
    heads = int(cfg["num_attention_heads"])
    hd = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return part_rows(part, n, heads * hd, int(cfg.get("num_key_value_heads") or heads) * hd)


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF a materialized folder was made from (its gguf-import record), if it still matches."""
    rec = artifacts.read_record(model_dir) or {}
    if rec.get("stage") != "gguf-import":
        return None
    src = ((rec.get("inputs") or {}).get("gguf") or {})
    path = Path(src.get("path") or "")
    if not path.is_file():
        raise BadInput(f"{model_dir} was imported from {path}, which no longer exists",
                       hint="export the .gguf file itself (or its alias) with --precision gguf")
    if src.get("sha256") and artifacts.sha256_file(path) != src["sha256"]:
        raise BadInput(f"{path} changed since {model_dir} was imported from it",
                       hint="export the .gguf file itself (or its alias) so it is re-imported")
    return path


def require_gguf_source(model_dir: Path) -> Path:
    path = gguf_source(model_dir)
    if path is None:
        raise BadInput(f"--precision gguf needs a GGUF model, and {model_dir} has no GGUF source "
                       "(not a folder edgetune imported from a .gguf; a fine-tuned/merged model is not on the GGUF grid)",
                       hint="give the .gguf file or its alias, or use --precision int4/int8/fp32")
    return path


class GGUFTensors:
    """A GGUF file's tensors by HF name, with transformers' name map and row permutation."""

    def __init__(self, path: Path, config: dict[str, Any]):
        gguf = require("gguf", purpose="reading GGUF files")
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch_field = self.reader.fields.get("general.architecture")
        self.arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else config.get("model_type")
        self.config = config
        self.hf_to_gguf = self._name_map(config, self.arch)

    @staticmethod
    def _name_map(config: dict[str, Any], arch: str) -> dict[str, str]:
        torch = require("torch")
        transformers = require("transformers")
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)  # transformers 5: the map needs it (name preprocessing)
        return {hf: g for g, hf in get_gguf_hf_weights_map(model, processor).items()}

    def gguf_name(self, hf_name: str) -> str | None:
        name = self.hf_to_gguf.get(hf_name)
        return name if name in self.tensors else None

    def row_permutation(self, gguf_name: str, rows: int) -> np.ndarray | None:
        """transformers' tensor processor applied to row indices: the permutation it applies to this tensor."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config)
        idx = np.arange(rows, dtype=np.int64)[:, None]
        out = np.asarray(processor.process(weights=idx, name=gguf_name).weights).reshape(-1)
        if out.shape != (rows,) or not np.array_equal(np.sort(out), np.arange(rows)):
            raise BadInput(f"transformers changes GGUF tensor {gguf_name} beyond a row permutation ({self.arch})",
                           hint="this architecture cannot be transcoded exactly; use --precision int4")
        return None if np.array_equal(out, np.arange(rows)) else out

    def type_name(self, gguf_name: str) -> str:
        return self.tensors[gguf_name].tensor_type.name

    def reference(self, gguf_name: str, perm: np.ndarray | None, rows: slice = slice(None)) -> np.ndarray:
        """gguf's own dequantized tensor [N, K] (after the permutation; ``rows`` of it)."""
        from gguf.quants import dequantize

        t = self.tensors[gguf_name]
        k, n = int(t.shape[0]), int(t.shape[1])
        w = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(n, k)
        return (w if perm is None else w[perm])[rows]

    def form(self, gguf_name: str, perm: np.ndarray | None, rows: slice = slice(None)) -> BlockForm | None:
        """The tensor as a BlockForm (rows permuted, then ``rows`` of it: blocks run along a row, so a row
        slice of the raw blocks is exact), None for a float type; BadInput for other types."""
        from .gguf_blocks import FLOAT_TYPES, SUPPORTED, UnsupportedType, to_blockform

        t = self.tensors[gguf_name]
        kind = t.tensor_type.name
        if kind in FLOAT_TYPES:
            return None
        k, n = int(t.shape[0]), int(t.shape[1])
        raw = np.asarray(t.data).reshape(n, -1)
        if perm is not None:
            raw = raw[perm]
        raw = raw[rows]
        try:
            return to_blockform(raw, kind, raw.shape[0], k)
        except UnsupportedType:
            raise BadInput(f"GGUF tensor {gguf_name} is {kind}, which has no exact MatMulNBits form "
                           f"(supported: {', '.join(SUPPORTED)})",
                           hint="use a GGUF quantized with one of those types, or --precision int4 to re-quantize") from None


def _hf_names(node_name: str) -> list[list[tuple[str, str | None]]] | None:
    """The HF weights a builder MatMul may come from, in the order to try, each as (name, part): a packed
    node (qkv_proj, gate_up_proj) is one fused tensor in a fused checkpoint (Phi-3: llama.cpp's attn_qkv /
    ffn_up) and the concatenation of q/k/v (gate/up) in a Llama-layout one; a node the builder split out of
    a fused tensor (Phi-3's gate_proj, up_proj; q/k/v under a LoRA) is its row block ``part`` (:func:`_part_rows`)."""
    if node_name == HEAD:
        return [[("lm_head.weight", None)]]
    parsed = builder_linear(node_name) if node_name.endswith("/MatMul") else None
    if parsed is None:
        return None
    layer, block, proj = parsed
    prefix = f"model.layers.{layer}.{BLOCKS[block]}."
    names = [[(f"{prefix}{proj}.weight", None)]]
    if proj in PACKED:
        names.append([(f"{prefix}{p}.weight", None) for p in PACKED[proj]])
    if proj in PART_OF:
        names.append([(f"{prefix}{PART_OF[proj]}.weight", proj)])
    return names


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def transcode(src: Path, dst: Path, gguf_path: Path, config: dict[str, Any], *, accuracy_level: int,
              eight_bit_level: int | None, context_length: int | None = None, planes: bool = False) -> dict[str, Any]:
    """Rewrite the builder's fp32 export in ``src`` into ``dst`` with the GGUF's blocks.

    ``context_length``: the longest sequence the export's genai_config allows; the builder's rotary caches
    (``cos_cache*``/``sin_cache*``, one fp32 row per position up to ``max_position_embeddings``: Gemma 3's
    32768 x 128 x 4 caches are 64 MiB, a quarter of its GGUF) are cut to it. ``planes``: 8-bit linears as two
    4-bit MatMulNBits at the 4-bit ``accuracy_level`` (exact with fp32 activations, :meth:`GraphEdit.planes`)
    instead of one 8-bit node at ``eight_bit_level``; the tied 8-bit head stays one node (it shares its table
    with the embedding's GatherBlockQuantized).
    """
    from onnx import helper, numpy_helper

    g = GGUFTensors(gguf_path, config)
    model = onnx_graph.load(src / "model.onnx")
    G = onnx_graph.Graph(model)
    graph, inits, producers = G.g, G.initializers, G.producer
    edit = GraphEdit(prefix="/gguf")
    tensors: list[dict[str, Any]] = []
    nodes_out: list[dict[str, Any]] = []
    heads: dict[str, tuple[BlockForm, str, str]] = {}  # gguf name -> (form, B name, float32 scales name)
    seen_gguf: set[str] = set()

    def proved(gname: str, form: BlockForm | None, perm, fp32_w: np.ndarray | None, hf: str,
               rows: slice = slice(None)) -> dict[str, Any]:
        ref = g.reference(gname, perm, rows)
        w = ref if form is None else form.dequantize()
        vs_gguf = _rel(w, ref)
        vs_builder = _rel(w, fp32_w) if fp32_w is not None else None
        entry = {"gguf": gname, "hf": hf, "type": g.type_name(gname), "shape": list(ref.shape),
                 "permuted_rows": perm is not None, **({"rows": [rows.start, rows.stop]} if rows != slice(None) else {}), "max_rel_diff_vs_gguf_dequantize": vs_gguf,
                 "max_rel_diff_vs_builder_fp32": vs_builder}
        if vs_gguf > TOLERANCE or (vs_builder is not None and vs_builder > TOLERANCE):
            raise CheckFailed(f"transcoded {gname} ({entry['type']}) differs from the GGUF weights "
                              f"(max rel {vs_gguf:.3g} vs gguf, {vs_builder} vs the builder's fp32)",
                              hint="a GGUF layout or name mapping bug: report it with the GGUF file")
        return entry

    new_nodes_by_old: dict[str, list] = {}
    for node in list(graph.node):
        if node.op_type != "MatMul" or "lora_" in node.name:
            continue
        candidates = _hf_names(node.name)
        if candidates is None or node.input[1] not in inits:
            continue
        hf_names = next((c for c in candidates if all(g.gguf_name(hf) for hf, _ in c)), candidates[0])
        w_onnx = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
        pieces, forms, offsets = [], [], 0
        for hf, part in hf_names:
            gname = g.gguf_name(hf)
            if gname is None and hf == "lm_head.weight":
                gname = g.gguf_name("model.embed_tokens.weight")  # tied head
            if gname is None:
                raise BadInput(f"the GGUF has no tensor for {hf} (graph node {node.name})",
                               hint="the GGUF and the imported folder do not match; re-import the .gguf")
            t = g.tensors[gname]
            n = int(t.shape[1])
            perm = g.row_permutation(gname, n)
            rows = slice(None) if part is None else _part_rows(part, n, config)
            form = g.form(gname, perm, rows)
            n = len(range(n)[rows])
            entry = proved(gname, form, perm, w_onnx[:, offsets:offsets + n].T, hf, rows)
            offsets += n
            pieces.append((gname, entry))
            forms.append(form)
            tensors.append(entry)
            seen_gguf.add(gname)
        if offsets != w_onnx.shape[1]:
            raise CheckFailed(f"{node.name}: GGUF rows {offsets} != graph N {w_onnx.shape[1]}")
        if any(f is None for f in forms):
            if not all(f is None for f in forms):
                raise BadInput(f"{node.name} packs float and quantized GGUF tensors ({[p[0] for p in pieces]})",
                               hint="use --precision int4")
            nodes_out.append({"node": node.name, "gguf": [p[0] for p in pieces], "type": pieces[0][1]["type"], "form": "float MatMul",
                              "prepacked_path": None})
            continue  # float weight: keep the builder's (equal) fp32 MatMul
        groups: list[list[int]] = []
        for i, f in enumerate(forms):
            if groups and (forms[groups[-1][0]].bits, forms[groups[-1][0]].block) == (f.bits, f.block):
                groups[-1].append(i)
            else:
                groups.append([i])
        before = len(edit.nodes)
        base = node.name.rsplit("/", 1)[0]
        outs = []
        for gi, idx in enumerate(groups):
            form = BlockForm.concat([forms[i] for i in idx]) if len(idx) > 1 else forms[idx[0]]
            split = planes and form.bits == 8 and node.name != "/lm_head/MatMul"
            level = eight_bit_level if (form.bits == 8 and eight_bit_level is not None and not split) else accuracy_level
            low_level = eight_bit_level if eight_bit_level is not None else accuracy_level  # a 2-bit low plane: as 8-bit nodes
            out = node.output[0] if len(groups) == 1 else f"{base}/part{gi}/output_0"
            wname = node.input[1].replace(".MatMul.weight", "") + (f".part{gi}" if len(groups) > 1 else "")
            info = edit.linear(node.input[0], out, form, name=base + (f"/part{gi}" if len(groups) > 1 else ""),
                               weight_name=wname, accuracy_level=level, planes=split, low_level=low_level)
            outs.append(out)
            types = sorted({pieces[i][1]["type"] for i in idx})
            nodes_out.append({"node": node.name, "gguf": [pieces[i][0] for i in idx], "type": "+".join(types),
                              "form": "MatMulNBits" + (" + block-sum correction" if info["correction"] else ""), **info})
            if node.name == "/lm_head/MatMul" and len(groups) == 1:
                heads[pieces[0][0]] = (form, f"{wname}.qweight", f"{wname}.scales" + ("/f32" if info["scales_dtype"] == "float16" else ""))
        if len(groups) > 1:
            edit.nodes.append(helper.make_node("Concat", outs, [node.output[0]], name=f"{base}/Concat", axis=-1))
        new_nodes_by_old[node.name] = edit.nodes[before:]

    # ---- token embedding
    embedding = _embedding(graph, inits, producers, g, heads, edit, proved, tensors, nodes_out, seen_gguf)

    # ---- rotary caches: only the positions the runtime can reach
    rotary = {}
    for init in graph.initializer:
        if context_length and re.fullmatch(r"(cos|sin)_cache\w*", init.name) and len(init.dims) == 2 and init.dims[0] > context_length:
            rows = int(init.dims[0])
            cut = numpy_helper.to_array(init)[:context_length].copy()
            init.CopyFrom(numpy_helper.from_array(cut, init.name))
            rotary[init.name] = [rows, int(context_length)]

    # ---- splice: old MatMuls (and the float embedding Gather/Transpose) out, new nodes in, then topological order
    drop = set(new_nodes_by_old) | set(embedding.get("drop_nodes", ()))
    new_list = [n for n in graph.node if n.name not in drop] + list(edit.nodes)
    onnx_graph.set_nodes(graph, new_list, edit.initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, dst / f.name)
    onnx_graph.save(model, dst / "model.onnx", external=True, size_threshold=1024)
    unused = sorted(set(g.tensors) - seen_gguf - {t for t in g.tensors if g.type_name(t) in ("F32", "F16", "BF16") and len(g.tensors[t].shape) == 1})
    types: dict[str, int] = {}
    for t in g.tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"source": str(gguf_path), "source_size_mb": round(gguf_path.stat().st_size / 2**20, 3),
            "architecture": g.arch, "gguf_types": types, "tensors": tensors, "nodes": nodes_out, "embedding": embedding["info"],
            "rotary_caches_cut": rotary, "eight_bit_planes": planes,
            "tensors_not_in_graph": unused,
            "max_rel_diff_vs_gguf_dequantize": max((t["max_rel_diff_vs_gguf_dequantize"] for t in tensors), default=None),
            "max_rel_diff_vs_builder_fp32": max((t["max_rel_diff_vs_builder_fp32"] or 0 for t in tensors), default=None),
            "tolerance": TOLERANCE, "all_prepacked": all(n.get("prepacked_path") is not False for n in nodes_out)}


def _embedding(graph, inits, producers, g: GGUFTensors, heads, edit: GraphEdit, proved, tensors, nodes_out, seen_gguf) -> dict:
    from onnx import helper, numpy_helper

    gather = next((n for n in graph.node if n.name == "/model/embed_tokens/Gather"), None)
    gname = g.gguf_name("model.embed_tokens.weight")
    if gather is None or gname is None:
        return {"info": {"form": "unchanged (no /model/embed_tokens/Gather or no GGUF token_embd)"}}
    table = gather.input[0]
    drop: list[str] = []
    if table in inits:
        w_emb = numpy_helper.to_array(inits[table]).astype(np.float32)
    else:
        tr = producers.get(table)
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            return {"info": {"form": "unchanged (embedding table is not a constant)"}}
        w_emb = numpy_helper.to_array(inits[tr.input[0]]).astype(np.float32).T
        drop.append(tr.name)
    t = g.tensors[gname]
    n = int(t.shape[1])
    perm = g.row_permutation(gname, n)
    shared = gname in heads
    if shared:
        form, b_name, s_name = heads[gname]
    else:
        form = g.form(gname, perm)
    entry = proved(gname, form, perm, w_emb, "model.embed_tokens.weight")
    entry["role"] = "token embedding" + (" (shared with lm_head)" if shared else "")
    tensors.append(entry)
    seen_gguf.add(gname)
    if form is None:
        return {"info": {"form": "float Gather (GGUF float table)", "type": entry["type"]}}
    k = form.shape[1]
    if not shared:
        b_name = edit.initializer("model.embed_tokens.qweight", form.packed())
        s_name = edit.as_float32("model.embed_tokens.scales", form.stored_scales())
    base = "/model/embed_tokens"
    flat = f"{base}/Reshape/output_0"
    edit.nodes.append(helper.make_node("Reshape", [b_name, edit.const_i64([n, k * form.bits // 8])], [flat], name=f"{base}/Reshape"))
    out = gather.output[0]
    gbq_out = out if form.offsets is None else f"{base}/GatherBlockQuantized/output_0"
    edit.nodes.append(helper.make_node("GatherBlockQuantized", [flat, gather.input[1], s_name], [gbq_out], name=f"{base}/GatherBlockQuantized",
                                       domain=MS_DOMAIN, bits=form.bits, block_size=form.block, gather_axis=0, quantize_axis=1))
    if form.offsets is not None:  # + offset of each element's block, gathered per token
        o = edit.as_float32("model.embed_tokens.offsets", exact_float(form.offsets))  # [V, K // block]
        ob = "/gguf/embed_tokens_offsets"  # not under /model/embed_tokens/: embedding_kind reads the first node there
        go = f"{ob}/Gather/output_0"
        edit.nodes.append(helper.make_node("Gather", [o, gather.input[1]], [go], name=f"{ob}/Gather"))
        gu = f"{ob}/Unsqueeze/output_0"
        edit.nodes.append(helper.make_node("Unsqueeze", [go, edit.const_i64([-1])], [gu], name=f"{ob}/Unsqueeze"))
        r = f"{ob}/Reshape/output_0"
        edit.nodes.append(helper.make_node("Reshape", [gbq_out, edit.const_i64([0, 0, k // form.block, form.block])], [r], name=f"{ob}/Reshape"))
        a = f"{ob}/Add/output_0"
        edit.nodes.append(helper.make_node("Add", [r, gu], [a], name=f"{ob}/Add"))
        edit.nodes.append(helper.make_node("Reshape", [a, edit.const_i64([0, 0, k])], [out], name=f"{ob}/Reshape2"))
    drop.append(gather.name)
    info = {"form": f"GatherBlockQuantized bits={form.bits} block={form.block}" + (" + gathered offsets" if form.offsets is not None else ""),
            "type": entry["type"], "shared_with_lm_head": shared}
    nodes_out.append({"node": gather.name, "gguf": [gname], "type": entry["type"], "form": info["form"], "bits": form.bits,
                      "block": form.block, "zero_point": "none (default 2^(bits-1))", "correction": form.offsets is not None,
                      "accuracy_level": None, "prepacked_path": None})
    return {"info": info, "drop_nodes": drop}


PROBE_TEXT = "The capital of France is Paris. Turn on the kitchen lights at 7 pm, then"


def _logit_check(folder: Path, reference: Path, model_dir: Path) -> dict[str, Any]:
    """One forward pass (onnxruntime) of the transcoded graph vs the builder's fp32 graph of the dequantized model."""
    transformers = require("transformers", purpose="logit check")
    from ...device import llm as dev

    ids = transformers.AutoTokenizer.from_pretrained(str(model_dir))(PROBE_TEXT)["input_ids"]
    got = dev.logits(dev.load(folder), ids)
    want = dev.logits(dev.load(reference), ids)
    return {"reference": "onnxruntime-genai builder fp32 graph of the dequantized GGUF", "tokens": len(ids),
            "max_abs_logit_diff": float(np.abs(got - want).max()), "logit_scale": float(np.abs(want).max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def export_gguf(model_dir: Path, out: Path, *, target, int4: dict | None = None, default: bool = False, fuse: bool = True,
                planes: bool = False) -> Path:
    """``export --precision gguf``: the builder's fp32 graph with the GGUF's quantized tensors swapped in.

    ``fuse``: then fuse the block-sum corrections of the linears sharing an input (:func:`.fuse.fuse_folder`);
    the logit check below runs on the fused graph.
    """

    from ...plan import gguf_unused_int4, int4_plan
    from ...targets import resolve
    from .builder import build, builder_input, check_tokenizer, configure_genai, embedding_kind, lm_head_attributes, \
        matmulnbits_attributes

    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)
    int4 = int4_plan(t, int4).overrides  # only accuracy_level applies: the GGUF keeps its own quantization
    gguf_path = require_gguf_source(model_dir)
    extra_opts = gguf_unused_int4(int4)
    if extra_opts:
        raise BadInput(f"--precision gguf keeps the GGUF's own quantization; {', '.join(extra_opts)} does not apply",
                       hint="drop the --int4-* and --int8-block-size options except --int4-accuracy-level")
    ep = t.runtime.resolved_builder_provider
    if ep != "cpu":
        raise BadInput(f"--precision gguf builds CPU graphs (fp32 activations); target {t.name} builds for {ep}",
                       hint="use a CPU target, or --precision int4 for this one")
    level = int((int4 or {}).get("accuracy_level") if (int4 or {}).get("accuracy_level") is not None
                else t.quantization.int4.accuracy_level)
    eight = EIGHT_BIT_CPU_LEVEL if level == 0 else None
    config = json.loads((model_dir / "config.json").read_text())
    options = {"precision": "gguf", "accuracy_level": level, "eight_bit_accuracy_level": eight, "execution_provider": ep, "fuse": fuse,
               "eight_bit_planes": planes,
               "target": t.model_dump(mode="json", exclude={"source"})}
    with artifacts.stage_output(out, "export", inputs={"model": model_dir, "gguf": gguf_path}, options=options) as run, \
            temp_dir("gguf") as scratch_name:
        scratch = Path(scratch_name)
        src = builder_input(model_dir, scratch)
        build(src, scratch / "fp32", "fp32", ep, scratch, {})
        from .proof import has_lora_branches, prove

        graph_proof = None  # with LoRA branches (a float or runtime adapter) the graph is base + adapter: its own check
        if not has_lora_branches(scratch / "fp32"):
            with console.step("fp32 graph vs PyTorch (teacher-forced, past the sliding window)"), console.results_only_stdout():
                graph_proof = prove(scratch / "fp32", model_dir, exact=True, what="graph of the dequantized GGUF")
        with console.step(f"transcode {gguf_path.name} (GGUF blocks -> MatMulNBits)"), console.results_only_stdout():
            ctx = min(int(config.get("max_position_embeddings") or t.generation.context_length), t.generation.context_length)
            info = transcode(scratch / "fp32", run.dir, gguf_path, config, accuracy_level=level, eight_bit_level=eight,
                             context_length=ctx, planes=planes)
        if fuse:
            from .fuse import fuse_step

            info["fusion"] = fuse_step(run.dir, fuse, "fuse side branches (one MatMul per input group)")
        else:
            info["fusion"] = {"fused": False, "reason": "not requested (--no-fuse, or a float adapter fuses after its branch check)"}
        configure_genai(run.dir, t)
        info["tokenizer_json"] = compact_json(run.dir / "tokenizer.json")
        tok = check_tokenizer(run.dir, model_dir)
        with console.step("logit check (transcoded vs fp32 graph)"):
            info["logit_check"] = _logit_check(run.dir, scratch / "fp32", model_dir) if not _has_lora_inputs(run.dir) else None
        size = sum(p.stat().st_size for p in run.dir.iterdir() if p.is_file())
        info["size_vs_gguf"] = round(size / gguf_path.stat().st_size, 4)
        note = ("precision gguf is the default for a GGUF input that is not fine-tuned: the GGUF's own weights, transcoded exactly"
                if default else None)
        run.results.update(kind="decoder", precision="gguf", precision_note=note, target=t.name,
                           execution_provider=t.runtime.execution_provider, builder_provider=ep, int4=None, int8=None,
                           quantization={"quantizer": "edgetune GGUF transcode (exact)", "accuracy_level": level,
                                         "eight_bit_accuracy_level": eight},
                           gguf=info, graph_proof=graph_proof, embeddings=embedding_kind(run.dir), matmulnbits=matmulnbits_attributes(run.dir),
                           lm_head=lm_head_attributes(run.dir), size_mb=round(size / 2**20, 3), tokenizer_check=tok,
                           exporter="onnxruntime-genai builder + edgetune GGUF transcode")
    return out


def compact_json(path: Path) -> dict[str, Any]:
    """Rewrite a JSON file without indentation (the same document): a GGUF-imported Gemma tokenizer.json
    (262k tokens, 515k merges) is 31.8 MiB indented, 13.7 MiB compact."""
    before = path.stat().st_size
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return {"bytes_before": before, "bytes": path.stat().st_size}


def _has_lora_inputs(folder: Path) -> bool:

    m = onnx_graph.read(folder / "model.onnx")
    return any("lora" in i.name for i in m.graph.input)

