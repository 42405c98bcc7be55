"""int4 algorithms the onnxruntime-genai 0.15.2 builder does not run itself.

* ``hqq``, ``gptq``: onnxruntime's ``MatMulNBitsQuantizer`` (``HQQWeightOnlyQuantConfig``,
  ``GPTQWeightOnlyQuantConfig``) on the builder's fp32 export. The builder's own ``algo_config``
  only knows ``default``/``rtn``/``k_quant`` (``make_algo_config`` in builders/base.py).
* ``inc-rtn``, ``inc-gptq``: neural-compressor 3.10 weight-only quantization in torch
  (``RTNConfig``/``GPTQConfig`` with ``prepare``/``convert``), saved in the Hugging Face GPTQ layout
  (qweight/qzeros/scales/g_idx), which the builder accepts as input. neural-compressor's save
  leaves ``*.scale_bf16_to_fp8`` tensors the builder does not know, all-zero biases for layers
  that have none, and no ``g_idx``: they are dropped/added here. The export then proves that the
  graph's MatMulNBits weights dequantize to exactly neural-compressor's weights.
* ``awq``: own activation-aware scales folded into the checkpoint (:mod:`edgetune.export.decoder.awq`), then the
  builder's RTN.
* ``inc-awq``, ``inc-autoround``: refused (their entries in :mod:`edgetune.quant` say why).

Host only: torch, transformers and neural-compressor are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ... import console, onnx_graph
from ...errors import BadInput, CheckFailed, require
from ...quant import embedding_block_size
from ...resources import data_dir

PROJECT_CALIBRATION = data_dir("calibration")  # the checkout's, or <prefix>/share/edgetune/calibration
DEFAULT_CALIBRATION = "llm-general.jsonl"
CALIBRATION_SAMPLES = 32
CALIBRATION_MAX_TOKENS = 128


# ---------------------------------------------------------------------------- calibration


def load_calibration(path: str | os.PathLike | None, *, samples: int = CALIBRATION_SAMPLES):
    """Calibration texts for GPTQ: the given file (anything edgetune.data reads) or the project's LLM set."""
    from ..encoder.quantize import load_calibration as _load

    if path is None:
        path = PROJECT_CALIBRATION / DEFAULT_CALIBRATION
        console.warn(f"no calibration data given; using the project's generic set {path.name} (pass --calibration with texts like yours)")
    return _load(path, samples=samples)


def encode_calibration(model_dir: Path, texts: list[str], max_tokens: int = CALIBRATION_MAX_TOKENS) -> list[list[int]]:
    transformers = require("transformers", purpose="GPTQ calibration")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = [tok.encode(t, add_special_tokens=True)[:max_tokens] for t in texts]
    out = [ids for ids in out if ids]
    if not out:
        raise BadInput("calibration: the texts tokenize to nothing", hint="give non-empty texts")
    return out


# ---------------------------------------------------------------------------- onnxruntime quantizer


def _feeds(model, genai_cfg: dict, token_ids: list[list[int]]) -> list[dict[str, Any]]:
    """Prefill inputs for a builder decoder graph, one dict per text: the device scorer's own
    (``device.llm.prefill_feeds``: an empty KV cache, a zero ring cache for sliding-window layers)."""
    from onnx import TensorProto

    from ...device.llm import prefill_feeds

    dec = genai_cfg["model"]["decoder"]
    inputs = [(i.name, i.type.tensor_type.elem_type == TensorProto.FLOAT16) for i in model.graph.input]
    try:
        return [prefill_feeds(dec, inputs, ids) for ids in token_ids]
    except BadInput as exc:
        raise BadInput(f"GPTQ calibration: {exc.message}", hint="use int4 algorithm hqq, rtn or k_quant for this model") from None


class _Reader:
    """A re-iterable CalibrationDataReader (onnxruntime's GPTQ deep-copies and iterates it)."""

    def __init__(self, feeds):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def quantize_embedding(model, *, block_size: int, symmetric: bool):
    """int4 RTN of an own (untied) float embedding table: Gather -> GatherBlockQuantized.

    Returns (model, quantized?). onnxruntime's quantizer only makes 4-bit GatherBlockQuantized, so
    int8 exports keep a float embedding.
    """
    mnq = require("onnxruntime.quantization.matmul_nbits_quantizer", purpose="int4 quantization")
    inits = {i.name for i in model.graph.initializer}
    embed = [n.name for n in model.graph.node
             if n.op_type == "Gather" and n.name.startswith("/model/embed_tokens/") and n.input[0] in inits]
    if not embed:
        return model, False
    table = next(n.input[0] for n in model.graph.node if n.name == embed[0])
    hidden = next(int(i.dims[-1]) for i in model.graph.initializer if i.name == table)
    block = embedding_block_size(hidden, block_size)
    if block is None:
        return model, False
    gq = mnq.MatMulNBitsQuantizer(model, algo_config=mnq.DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, bits=4, op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),)), nodes_to_include=embed)
    gq.process()
    return gq.model.model, True


def quantize_matmuls_in(folder: Path, select: Callable[[str], bool], *, bits: int, block_size: int, symmetric: bool,
                        accuracy_level: int) -> list[str]:
    """The float MatMuls of a saved export whose names ``select`` takes -> MatMulNBits with ``bits`` (onnxruntime's
    quantizer, RTN); returns their names (one whose weight is computed is skipped). Every other MatMul stays as it is."""
    mnq = require("onnxruntime.quantization.matmul_nbits_quantizer", purpose=f"{bits}-bit MatMulNBits")
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx_graph.read(folder / "model.onnx")  # the weights are loaded only if there is work
    inits = {i.name for i in model.graph.initializer}
    present = [n.name for n in model.graph.node if n.op_type == "MatMul" and select(n.name) and n.input[1] in inits]
    if not present:
        return []
    load_external_data_for_model(model, str(folder))
    # onnxruntime 1.32's MatMulNBitsQuantizer quantizes a node when it is in nodes_to_include *or* of a
    # quantizable op type, so nodes_to_include alone does not restrict it: every other float MatMul (a head left
    # float for its own step, the LoRA branches of a float or runtime adapter) must be excluded by name.
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(present)]
    quant = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level or None, nodes_to_include=present, nodes_to_exclude=others,
                                     algo_config=None)
    quant.process()
    onnx_graph.save(quant.model.model, folder / "model.onnx", external=True, size_threshold=0)
    return present


def quantize_lm_head_in(folder: Path, *, bits: int, block_size: int, symmetric: bool, accuracy_level: int) -> bool:
    """Quantize the float lm_head MatMul of a saved export to MatMulNBits with ``bits`` (8: llama.cpp's Q8_0 head)."""
    return bool(quantize_matmuls_in(folder, lambda name: name.startswith("/lm_head/"), bits=bits, block_size=block_size,
                                    symmetric=symmetric, accuracy_level=accuracy_level))


def tied_embeddings(model_dir: Path) -> bool:
    """Whether the HF model's input embedding and output head are one matrix (``tie_word_embeddings``)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", True))
    return bool(tied)


def share_embedding_with_head_in(folder: Path, head_scales=None) -> dict[str, Any] | None:
    """Read a tied embedding from the 8-bit lm_head's own table: one int8 matrix instead of an int8 head + an int4 copy.

    The builder unties a tied embedding when the head is not int4 (its GatherBlockQuantized sharing reads
    4 bits only), so an int8-head export stored the same matrix twice: 8-bit for the head (llama.cpp's Q8_0
    head) and 4-bit for the embedding, the latter both larger on disk (SmolLM2: +18 MB) and coarser than
    the head. onnxruntime 1.32's GatherBlockQuantized reads uint8 data with ``bits=8``, block-wise along the
    hidden axis: exactly MatMulNBits' 8-bit B ``[N, K/block, block]`` seen as ``[N, K]`` with its scales and
    zero points seen as ``[N, K/block]``. The Gather reads them through Reshapes of the head's initializers,
    which onnxruntime folds into constants at session start. Checked before the switch: every element of the
    embedding's table is within a quantization step of the head's (they round the same matrix).
    With ``head_scales`` (``--smooth-8bit``: the head's rows were multiplied by them before its quantization), the
    table is compared as ``head / scales`` and the gather's output multiplied by ``1 / scales``: the same embedding.
    Returns what was done, or None where there is no float embedding table or no 8-bit head to share.
    """
    from onnx import helper, numpy_helper

    import numpy as np

    model = onnx_graph.load(folder / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    gather = [n for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
              and n.name.startswith("/model/embed_tokens/") and n.input[0] in inits]
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    if len(gather) != 1 or len(head) != 1:
        return None
    g, h = gather[0], head[0]
    a = onnx_graph.attributes(h)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    names = list(h.input)[1:4] + [""] * 2
    if bits != 8 or k % block or not all(x in inits for x in names[:2]):
        return None
    b = numpy_helper.to_array(inits[names[0]])
    scales = numpy_helper.to_array(inits[names[1]])
    zp = numpy_helper.to_array(inits[names[2]]) if names[2] in inits else None
    deq = dequantize_matmulnbits(b, scales, zp, k=k, n=n, bits=bits, block_size=block)
    step = np.abs(scales.reshape(n, k // block))
    inv = None if head_scales is None else (1.0 / np.asarray(head_scales, np.float32)).reshape(1, k)
    if g.op_type == "Gather":
        table, table_step = numpy_helper.to_array(inits[g.input[0]]), None
    else:  # the builder's own int4 copy (GatherBlockQuantized, uint4/int4 data along the hidden axis)
        table, table_step = _gather_block_dequantized(g, inits)
    if table.shape != (n, k):
        return None
    # within one quantization step of each (symmetric RTN clips the far side of its largest weight by up to one); in
    # slices of rows: a 128,256 x 2,048 vocabulary's float temporaries took a 1B model's export to 14 GB whole
    for r0 in range(0, n, 8192):
        rows = slice(r0, r0 + 8192)
        d, tol = deq[rows], np.repeat(step[rows], block, axis=1)
        if inv is not None:  # the head is W * s along K: the embedding is its table over s
            d, tol = d * inv, tol * inv
        if table_step is not None:
            tol = tol + table_step[rows]
        if not np.all(np.abs(d - table[rows]) <= tol * (1 + 1e-4) + 1e-7):
            return None  # not the head's matrix (an untied model): keep its own table
    del deq, table, table_step
    nb = k // block
    prefix = "/model/embed_tokens/shared_int8"
    # shapes as Constant nodes: an external-data initializer cannot feed Reshape's shape inference
    nodes = [helper.make_node("Constant", [], [f"{prefix}/{name}_shape"], name=f"{prefix}/{name}_shape",
                              value=numpy_helper.from_array(np.array(dims, np.int64), f"{prefix}/{name}_shape"))
             for name, dims in (("data", [n, k]), ("scales", [n, nb]))]
    nodes += [helper.make_node("Reshape", [names[0], f"{prefix}/data_shape"], [f"{prefix}/data"], name=f"{prefix}/Reshape_data"),
             helper.make_node("Reshape", [names[1], f"{prefix}/scales_shape"], [f"{prefix}/scales"], name=f"{prefix}/Reshape_scales")]
    gbq_in = [f"{prefix}/data", g.input[1], f"{prefix}/scales"]
    if zp is not None:
        nodes.append(helper.make_node("Reshape", [names[2], f"{prefix}/scales_shape"], [f"{prefix}/zero_points"],
                                      name=f"{prefix}/Reshape_zero_points"))
        gbq_in.append(f"{prefix}/zero_points")
    gathered = [f"{prefix}/scaled"] if head_scales is not None else list(g.output)
    nodes.append(helper.make_node("GatherBlockQuantized", gbq_in, gathered, name="/model/embed_tokens/GatherBlockQuantized",
                                  domain=onnx_graph.MS_DOMAIN, bits=8, block_size=block, gather_axis=0, quantize_axis=1))
    if head_scales is not None:  # one multiply of hidden values per token undoes the head's smoothing scales
        nodes += [helper.make_node("Constant", [], [f"{prefix}/inverse_scales"], name=f"{prefix}/inverse_scales",
                                   value=numpy_helper.from_array(inv.reshape(k), f"{prefix}/inverse_scales")),
                  helper.make_node("Mul", [gathered[0], f"{prefix}/inverse_scales"], list(g.output), name=f"{prefix}/Mul_unsmooth")]
    at = list(model.graph.node).index(g)
    model.graph.node.remove(g)
    for i, nd in enumerate(nodes):
        model.graph.node.insert(at + i, nd)
    for name in {g.input[0], *list(g.input)[2:]} - {""}:  # the embedding's own table (and its scales / zero points)
        if name in inits and sum(name in nd.input for nd in model.graph.node) == 0:
            model.graph.initializer.remove(inits[name])
    onnx_graph.save(model, folder / "model.onnx", external=True, size_threshold=0)
    return {"embedding": f"int8 GatherBlockQuantized, shared with lm_head (block {block})"
                         + (", times 1 / the head's smoothing scales" if head_scales is not None else "")}


def _gather_block_dequantized(node, inits: dict) -> tuple[Any, Any]:
    """The float table [N, K] of a GatherBlockQuantized (quantize_axis 1) and its quantization step per element."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    a = onnx_graph.attributes(node)
    block = a.get("block_size", 128)
    init = inits[node.input[0]]
    data = numpy_helper.to_array(init)
    if init.data_type == TensorProto.UINT8 and a.get("bits", 4) == 4:  # packed along the last axis, low first
        data = np.stack([data & 0x0F, data >> 4], -1).reshape(data.shape[0], -1)
    q = data.astype(np.float32)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    if len(node.input) > 3 and node.input[3] in inits:
        z = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
    else:
        z = np.full_like(scales, 0.0 if init.data_type in (TensorProto.INT4, TensorProto.UINT4) else 2 ** (a.get("bits", 4) - 1))
    per_element = lambda a: np.repeat(a, block, axis=1)[:, :q.shape[1]]  # noqa: E731 (block values onto their elements)
    s = per_element(scales)
    return (q - per_element(z)) * s, np.abs(s)


def quantize_embedding_in(folder: Path, *, block_size: int, symmetric: bool) -> bool:
    """:func:`quantize_embedding` on a saved export folder (model.onnx + model.onnx.data rewritten)."""
    model = onnx_graph.load(folder / "model.onnx")
    model, done = quantize_embedding(model, block_size=block_size, symmetric=symmetric)
    if done:
        onnx_graph.save(model, folder / "model.onnx", external=True, size_threshold=0)
    return done


def quantize_onnx(fp32_dir: Path, out_dir: Path, *, algorithm: str, q: dict, token_ids: list[list[int]] | None = None) -> dict[str, Any]:
    """HQQ or GPTQ int4 of a builder fp32 export; writes the int4 folder to out_dir."""
    onnx = require("onnx", purpose="int4 quantization")
    mnq = require("onnxruntime.quantization.matmul_nbits_quantizer", purpose="int4 quantization")
    require("onnx_ir", purpose="int4 quantization (MatMulNBitsQuantizer)")
    model = onnx_graph.load(fp32_dir / "model.onnx")
    if algorithm == "hqq":
        require("torch", purpose="HQQ int4 quantization")
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=q["block_size"], bits=4)
    elif algorithm == "gptq":
        genai_cfg = json.loads((fp32_dir / "genai_config.json").read_text())
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(_feeds(model, genai_cfg, token_ids or [])))
    else:  # pragma: no cover - guarded by the caller
        raise BadInput(f"'{algorithm}' is not an onnxruntime quantizer algorithm")
    exclude = ["/lm_head/MatMul"] if q.get("lm_head", "int4") != "int4" else []  # made by the caller (int8) or kept float
    quant = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=q["block_size"], is_symmetric=q["symmetric"],
                                     accuracy_level=q["accuracy_level"], algo_config=cfg, nodes_to_exclude=exclude)
    quant.process()
    qmodel = quant.model.model
    fast = []
    if algorithm == "hqq":  # float zero points skip prepacking (~20x slower): the exact symmetric + block-sum form instead
        from .blockform import convert_float_zero_points

        fast = convert_float_zero_points(qmodel)
    # The fp32 input has its own (untied) embedding table; store it like the builder's rtn export
    # does, as symmetric int4 RTN (GatherBlockQuantized), instead of float.
    qmodel, embed = quantize_embedding(qmodel, block_size=q["block_size"], symmetric=True)
    # HQQ nodes carry no accuracy_level: it only picks the compute type, so set what the profile asks.
    for node in qmodel.graph.node:
        if node.op_type == "MatMulNBits" and q["accuracy_level"] and \
                not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", q["accuracy_level"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in fp32_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out_dir / f.name)
    onnx_graph.save(qmodel, out_dir / "model.onnx", external=True, size_threshold=0)
    info: dict[str, Any] = {"quantizer": "onnxruntime MatMulNBitsQuantizer", "config": type(cfg).__name__,
                            "embedding": "int4 symmetric RTN (DefaultWeightOnlyQuantConfig)" if embed else "float"}
    if fast:
        info["float_zero_points"] = (f"converted on {len(fast)} MatMulNBits nodes to symmetric MatMulNBits + exact block-sum "
                                     "correction (edgetune/export/decoder/blockform.py)")
    if algorithm == "gptq":
        info.update(percdamp=cfg.percdamp, gptq_block_size=cfg.block_size, actorder=cfg.actorder)
    return info


# ---------------------------------------------------------------------------- neural-compressor


def inc_checkpoint(model_dir: Path, out_dir: Path, *, algorithm: str, q: dict, token_ids: list[list[int]] | None = None):
    """neural-compressor weight-only int4 in torch, saved in the GPTQ layout the builder reads.

    Returns (quantized torch model, info). The model is kept for :func:`inc_weight_parity`.
    """
    torch = require("torch", purpose="neural-compressor quantization")
    transformers = require("transformers", purpose="neural-compressor quantization")
    nc = require("neural_compressor.torch.quantization", extra="host", purpose="neural-compressor quantization")
    from safetensors.torch import load_file, save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    had_bias = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    common = dict(bits=4, group_size=q["block_size"], use_sym=q["symmetric"])
    with torch.no_grad():
        if algorithm == "inc-rtn":
            qmodel = nc.convert(nc.prepare(model, nc.RTNConfig(**common, use_layer_wise=False)))
            info: dict[str, Any] = {"config": "RTNConfig"}
        elif algorithm == "inc-gptq":
            cfg = nc.GPTQConfig(**common)
            prepared = nc.prepare(model, cfg)
            for ids in token_ids or []:
                prepared(torch.tensor([ids]))
            qmodel = nc.convert(prepared)
            info = {"config": "GPTQConfig", "percdamp": cfg.percdamp, "gptq_block_size": cfg.block_size, "act_order": cfg.act_order}
        else:  # pragma: no cover - guarded by the caller
            raise BadInput(f"'{algorithm}' is not a neural-compressor algorithm")
    qmodel.eval()
    nc.save(qmodel, str(out_dir), format="huggingface")
    # GPTQ layout the builder reads: drop INC-only tensors and zero biases, add g_idx.
    dropped: list[str] = []
    quantized = 0
    for f in sorted(out_dir.glob("*.safetensors")):
        sd = load_file(str(f))
        new = {}
        for k, v in sd.items():
            if k.endswith(".scale_bf16_to_fp8"):
                dropped.append(k)
                continue
            if k.endswith(".bias") and k[:-5] not in had_bias and not bool(v.any()):
                dropped.append(k)
                continue
            new[k] = v
            if k.endswith(".qweight") and k[:-8] + ".g_idx" not in sd:
                in_features = v.shape[0] * 32 // 4
                new[k[:-8] + ".g_idx"] = torch.arange(in_features, dtype=torch.int32) // q["block_size"]
                quantized += 1
        save_file(new, str(f), metadata={"format": "pt"})
    cfg_json = json.loads((out_dir / "config.json").read_text())
    qc = cfg_json.get("quantization_config") or {}
    if qc.get("quant_method") != "gptq" or qc.get("bits") != 4 or qc.get("group_size") != q["block_size"]:
        raise CheckFailed(f"neural-compressor saved an unexpected quantization_config: {qc}",
                          hint="check the neural-compressor version (3.10 is pinned)")
    for f in model_dir.iterdir():  # tokenizer and chat template next to the checkpoint
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.suffix == ".jinja"):
            shutil.copy2(f, out_dir / f.name)
    info.update(quantizer="neural-compressor", layers=quantized, dropped_tensors=len(dropped),
                lm_head="float in the checkpoint; quantized by the builder (RTN) with the export's int4 options")
    return qmodel, info


def dequantize_matmulnbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int):
    """Float weight [N, K] of a MatMulNBits node's B/scales/zero_points."""
    import numpy as np

    blocks = -(-k // block_size)
    b = np.asarray(b, dtype=np.uint8).reshape(n, blocks, -1)
    if bits == 4:
        qv = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float32)
    else:
        qv = b.astype(np.float32)
    s = np.asarray(scales, dtype=np.float32).reshape(n, blocks)
    if zero_points is None:
        z = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zp = zero_points.reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        z = zp[:, :blocks].astype(np.float32)
    else:
        z = np.asarray(zero_points, dtype=np.float32).reshape(n, blocks)
    w = (qv - z[..., None]) * s[..., None]
    return w.reshape(n, -1)[:, :k]


def inc_weight_parity(qmodel, onnx_dir: Path, layers: list[int] | None = None) -> dict[str, Any]:
    """Max |W_graph - W_inc| over the graph's MatMulNBits nodes that map to neural-compressor layers.

    neural-compressor's own ``unpack`` (the reference) loops in Python, so by default only the first,
    middle and last decoder layers are compared (every projection in them); the conversion is the
    same code for every layer.
    """
    import numpy as np
    from onnx import numpy_helper

    torch = require("torch", purpose="neural-compressor parity")
    model = onnx_graph.load(onnx_dir / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    from .packed import builder_linear, hf_linears

    modules = dict(qmodel.named_modules())

    def inc_weight(name: str):
        m = modules.get(name)
        if m is None or not hasattr(m, "unpack"):
            return None
        p = m.unpack()
        w, s, zp = p["int_weight"], p["scales"].float(), p.get("zp")
        g = torch.arange(m.in_features) // m.group_size if getattr(m, "g_idx", None) is None else m.g_idx.long()
        if zp is not None:
            w = (w - zp[:, g]).to(torch.int8)
        return (w.float() * s[:, g]).numpy()

    if layers is None:
        n = int(getattr(qmodel.config, "num_hidden_layers", 1))
        layers = sorted({0, n // 2, n - 1})
    compared, unmatched, worst, scale = 0, [], 0.0, 0.0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        parts = hf_linears(node.name) if not node.name.startswith("/lm_head") else None
        if not parts:
            if not node.name.startswith("/lm_head"):
                unmatched.append(node.name)
            continue
        if builder_linear(node.name)[0] not in layers:
            continue
        ws = [inc_weight(p) for p in parts]
        if any(w is None for w in ws):
            unmatched.append(node.name)
            continue
        want = np.concatenate(ws, axis=0)
        a = onnx_graph.attributes(node)
        arr = [numpy_helper.to_array(inits[i]) if i in inits else None for i in list(node.input)[1:4]] + [None] * 3
        got = dequantize_matmulnbits(arr[0], arr[1], arr[2], k=a["K"], n=a["N"], bits=a["bits"], block_size=a["block_size"])
        if got.shape != want.shape:
            raise CheckFailed(f"graph weight {node.name} has shape {got.shape}, neural-compressor's {want.shape}",
                              hint="the builder misread the GPTQ-layout checkpoint")
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        compared += 1
    return {"layers": layers, "compared": compared, "unmatched": unmatched, "max_abs_diff": worst, "max_abs_weight": scale}
