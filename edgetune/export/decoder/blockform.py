"""Block-quantized weights in onnxruntime's fast exact form: symmetric MatMulNBits + a block-sum correction.

A weight stored per block of ``block`` input elements as ``w = s * (q - z0) + o`` (``q`` an unsigned
``bits``-bit integer, ``z0 = 2**(bits-1)`` the default zero point of MatMulNBits, ``s`` a scale and ``o``
a float offset per block) is computed exactly as

    y = MatMulNBits(x, q, s)                        # no zero_points input: the prepacked kernel
      + (block sums of x) @ O^T                      # Reshape -> ReduceSum -> small MatMul -> Add

because ``sum_k x_k (s (q_k - z0) + o) = s sum_k x_k (q_k - z0) + o sum_k x_k`` within a block.
onnxruntime 1.32's CPU MatMulNBits with *float* zero points (what an asymmetric float form would
need) skips prepacking and dequantizes B on every call (about 20x slower, docs/llm.md); the
symmetric node + correction avoids it. GGUF Q4_1/Q4_K/Q5_1/Q5_K and HQQ's float zero points all
fit this form. (It also kept these graphs clear of onnxruntime #29853, an AVX2 CompInt8 fault for
uint zero points seen in a direct MLAS test, which MatMulNBits in onnxruntime 1.32 does not show
on an emulated AVX2 CPU: tests/test_avx2_emulation.py.)

Why own code: no library maps externally quantized blocks (GGUF, HQQ) onto MatMulNBits' storage;
onnxruntime's quantizers only quantize float weights themselves.

Floats are stored as fp16 where that is exact (GGUF's fp16 ``d``/``m``) and as fp32 otherwise; fp16
tensors feed MatMulNBits through a ``Cast``, which onnxruntime folds into a constant at session
start, before prepacking (checked in tests and docs/llm.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...onnx_graph import MS_DOMAIN, attributes, set_nodes


@dataclass
class BlockForm:
    """``w[n, k] = scales[n, k // block] * (q[n, k] - 2**(bits-1)) + offsets[n, k // block]``."""

    q: np.ndarray  # [N, K] uint8 storage values in [0, 2**bits)
    scales: np.ndarray  # [N, K // block] float32 (values; storage dtype chosen later)
    offsets: np.ndarray | None  # [N, K // block] float32, or None (symmetric)
    bits: int
    block: int

    def __post_init__(self):
        n, k = self.q.shape
        assert k % self.block == 0, (k, self.block)
        assert self.scales.shape == (n, k // self.block), (self.scales.shape, n, k, self.block)
        assert self.offsets is None or self.offsets.shape == self.scales.shape
        assert int(self.q.max(initial=0)) < 2 ** self.bits

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def zero_point(self) -> int:
        return 2 ** (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """The float weight [N, K] (float32), computed as onnxruntime computes it at accuracy_level 0."""
        n, k = self.q.shape
        q = (self.q.astype(np.float32) - np.float32(self.zero_point)).reshape(n, k // self.block, self.block)
        s = self.stored_scales().astype(np.float32)[..., None]
        w = q * s
        if self.offsets is not None:
            w = w + self.stored_offsets().astype(np.float32)[..., None]
        return w.reshape(n, k)

    def stored_scales(self) -> np.ndarray:
        return exact_float(self.scales)

    def stored_offsets(self) -> np.ndarray | None:
        return None if self.offsets is None else exact_float(self.offsets)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [N, K // block, block * bits // 8], low bits first."""
        return pack(self.q, self.bits, self.block)

    @staticmethod
    def concat(forms: list["BlockForm"]) -> "BlockForm":
        """Stack along N (output rows), e.g. q/k/v into the builder's packed qkv_proj."""
        bits, block = forms[0].bits, forms[0].block
        assert all(f.bits == bits and f.block == block for f in forms)
        offsets = None
        if any(f.offsets is not None for f in forms):
            offsets = np.concatenate([f.offsets if f.offsets is not None else np.zeros_like(f.scales) for f in forms])
        return BlockForm(np.concatenate([f.q for f in forms]), np.concatenate([f.scales for f in forms]), offsets, bits, block)

    @staticmethod
    def from_float_zero_points(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block: int) -> "BlockForm":
        """``w = s * (q - z)`` with a float ``z`` per block (HQQ) -> ``s * (q - z0) + s * (z0 - z)``."""
        z0 = np.float32(2 ** (bits - 1))
        s = scales.astype(np.float32)
        return BlockForm(q.astype(np.uint8), s, s * (z0 - zero_points.astype(np.float32)), bits, block)


def exact_float(a: np.ndarray) -> np.ndarray:
    """``a`` as float16 if that is exact (and finite), else as float32."""
    a = np.asarray(a, np.float32)
    h = a.astype(np.float16)
    if np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float32), a):
        return h
    return a


def pack(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    n, k = q.shape
    q = q.astype(np.uint8).reshape(n, k // block, block)
    if bits == 8:
        return np.ascontiguousarray(q)
    if bits == 4:
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << np.uint8(4)))
    if bits == 2:
        return np.ascontiguousarray(q[..., 0::4] | (q[..., 1::4] << np.uint8(2)) | (q[..., 2::4] << np.uint8(4)) | (q[..., 3::4] << np.uint8(6)))
    raise ValueError(f"bits {bits}")


def unpack(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    n = b.shape[0]
    if bits == 8:
        return b.reshape(n, k)
    lo, hi = b & np.uint8(0x0F), b >> np.uint8(4)
    return np.stack([lo, hi], axis=-1).reshape(n, k)


@dataclass
class GraphEdit:
    """New nodes and initializers for one graph (onnx protos), with shared block sums and Casts."""

    prefix: str = "/edgetune/blockform"
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _blocksums: dict = field(default_factory=dict)
    _casts: dict = field(default_factory=dict)
    _consts: dict = field(default_factory=dict)

    def initializer(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def as_float32(self, name: str, array: np.ndarray) -> str:
        """An initializer read as float32: fp16 storage gets a Cast (folded by onnxruntime at load)."""
        from onnx import TensorProto, helper

        self.initializer(name, array)
        if array.dtype == np.float32:
            return name
        out = f"{name}/f32"
        self.nodes.append(helper.make_node("Cast", [name], [out], name=f"{name}/Cast", to=TensorProto.FLOAT))
        return out

    def const_i64(self, values: list[int]) -> str:
        """A small int64 shape/axes tensor as a Constant node (never moved to external data: shape inference reads it)."""
        from onnx import helper, numpy_helper

        key = tuple(values)
        if key not in self._consts:
            name = f"{self.prefix}/const/{'_'.join(str(v) for v in values)}"
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Constant",
                                               value=numpy_helper.from_array(np.array(values, np.int64), f"{name}/value")))
            self._consts[key] = name
        return self._consts[key]

    def blocksums(self, x: str, k: int, block: int) -> str:
        """``[..., K] -> [..., K // block]``: sums of x over each block (shared per input tensor)."""
        from onnx import helper

        key = (x, block)
        if key not in self._blocksums:
            base = f"{self.prefix}/blocksum/{x.strip('/').replace('/', '_')}/b{block}"
            r = f"{base}/Reshape/output_0"
            self.nodes.append(helper.make_node("Reshape", [x, self.const_i64([0, 0, k // block, block])], [r], name=f"{base}/Reshape"))
            s = f"{base}/ReduceSum/output_0"
            self.nodes.append(helper.make_node("ReduceSum", [r, self.const_i64([-1])], [s], name=f"{base}/ReduceSum", keepdims=0))
            self._blocksums[key] = s
        return self._blocksums[key]

    def planes(self, x: str, out: str, form: BlockForm, *, name: str, weight_name: str, accuracy_level: int,
               low_level: int | None = None) -> dict[str, Any]:
        """An 8-bit form as a 4-bit high plane and a 2- or 4-bit low plane, the smallest exact split the
        CPU kernels run (onnxruntime 1.32's MatMulNBits takes 2, 4 and 8 bits only).

        With ``r = q - 128`` in ``[r0, r0 + 2^n)`` over the tensor (n = 5 for Q5_0, 6 for Q6_K, 8 for Q8_0)
        and ``m = n - 4``: ``r - r0 = 2^m h + l`` (h < 16, l < 2^m), so
        ``s r = 2^m s (h - 8) + s (l - 0) + s (r0 + 8 * 2^m)``. The last term is 0 for the symmetric GGUF
        types (r0 = -2^(n-1)); otherwise it joins the block offsets (returned as ``extra_offsets``, for the
        caller's block-sum correction). The high plane is symmetric with scale ``2^m s`` (a Mul of s that
        onnxruntime folds at load: stored once); the low plane has zero points 0. Both exact at accuracy_level 0,
        where 4-bit nodes take the prepacked fp32-activation kernel (an 8-bit node at level 0 dequantizes B on
        every call, ~80x slower). A 2-bit low plane (n <= 6, blocks of 32+) at level 0 is again the slow
        dequantizing path, so it runs at ``low_level`` (default: ``accuracy_level``): at 4 it rounds x to int8
        only in the low bits' term. Blocks of 16 (Q6_K) get a 4-bit low plane: no fast 2-bit kernel there.
        """
        from onnx import TensorProto, helper

        n_out, k = form.shape
        kb = k // form.block
        r = form.q.astype(np.int16) - 128
        r0 = int(r.min(initial=0))
        width = max(int(r.max(initial=0)) - r0 + 1, 2)
        nbits = max(int(np.ceil(np.log2(width))), 5)
        m = nbits - 4
        u = (r - r0).astype(np.uint8)
        hi, lo = u >> np.uint8(m), u & np.uint8((1 << m) - 1)
        # 2-bit MatMulNBits has a fast (level 4) kernel for blocks of 32 and more only: a block-16 2-bit node takes the
        # dequantizing path at either level (Q6_K's 2048x640 low bits: 14 ms vs 0.17 ms as a 4-bit level-0 node)
        lo_bits = 2 if m <= 2 and form.block >= 32 else 4
        low_level = accuracy_level if low_level is None or lo_bits == 4 else low_level  # 4 bits: the fast exact kernel
        scales = self.as_float32(f"{weight_name}.scales", form.stored_scales())
        factor = f"{self.prefix}/const/f32_{1 << m}"
        if factor not in self._consts:
            self.nodes.append(helper.make_node("Constant", [], [factor], name=f"{factor}/Constant",
                                               value=helper.make_tensor(f"{factor}/value", TensorProto.FLOAT, [], [float(1 << m)])))
            self._consts[factor] = factor
        hi_scales = f"{weight_name}.scales/x{1 << m}"
        self.nodes.append(helper.make_node("Mul", [scales, factor], [hi_scales], name=f"{weight_name}.scales/Mul{1 << m}"))
        b_hi = self.initializer(f"{weight_name}.qweight_hi", pack(hi, 4, form.block))
        # the low plane without zero points (symmetric: the kernel's plainest path) where l + z0 fits:
        # s (l - 0) = s ((l + z0) - z0), z0 = 2^(lo_bits-1) (Q5_0: l < 2, z0 = 2). Else uint zero points 0.
        z0 = 1 << (lo_bits - 1)
        symmetric = (1 << m) + z0 <= (1 << lo_bits)
        b_lo = self.initializer(f"{weight_name}.qweight_lo{lo_bits}", pack(lo + np.uint8(z0) if symmetric else lo, lo_bits, form.block))
        per_byte = 8 // lo_bits
        lo_inputs = [x, b_lo, scales]
        if not symmetric:
            lo_inputs.append(self.initializer(f"{weight_name}.zero_points_lo", np.zeros((n_out, (kb + per_byte - 1) // per_byte), np.uint8)))
        y_hi, y_lo = f"{name}/MatMulNBits_hi/output_0", f"{name}/MatMulNBits_lo/output_0"
        self.nodes.append(helper.make_node("MatMulNBits", [x, b_hi, hi_scales], [y_hi], name=f"{name}/MatMulNBits_hi", domain=MS_DOMAIN,
                                           K=k, N=n_out, bits=4, block_size=form.block, accuracy_level=int(accuracy_level)))
        self.nodes.append(helper.make_node("MatMulNBits", lo_inputs, [y_lo], name=f"{name}/MatMulNBits_lo", domain=MS_DOMAIN,
                                           K=k, N=n_out, bits=lo_bits, block_size=form.block, accuracy_level=int(low_level)))
        self.nodes.append(helper.make_node("Add", [y_hi, y_lo], [out], name=f"{name}/Planes/Add"))
        c = r0 + 8 * (1 << m)
        extra = None if c == 0 else form.scales.astype(np.float32) * np.float32(c)
        return {"value_bits": nbits, "planes": f"4-bit high (level {int(accuracy_level)}) + {lo_bits}-bit low (level {int(low_level)})",
                "zero_point": "none" if symmetric else "high plane none, low plane 0", "extra_offsets": extra}

    def linear(self, x: str, out: str, form: BlockForm, *, name: str, weight_name: str, accuracy_level: int,
               blocksum_input_rank3: bool = True, planes: bool = False, low_level: int | None = None) -> dict[str, Any]:
        """``out = x @ W^T`` for W in ``form``: MatMulNBits (+ correction). The last node writes ``out``.

        ``planes``: an 8-bit form as a 4-bit and a 2-/4-bit node (:meth:`planes`: the smallest exact split, fp32
        activations at a usable speed; ``low_level`` for the low plane)."""
        from onnx import helper

        n, k = form.shape
        planes = planes and form.bits == 8
        attrs = dict(K=k, N=n, bits=form.bits, block_size=form.block, accuracy_level=int(accuracy_level))
        split = None
        if planes:
            main = f"{name}/Planes/output_0"
            split = self.planes(x, main, form, name=name, weight_name=weight_name, accuracy_level=accuracy_level, low_level=low_level)
            extra = split.pop("extra_offsets")
            if extra is not None:
                form = BlockForm(form.q, form.scales, extra if form.offsets is None else form.offsets + extra, form.bits, form.block)
            if form.offsets is None:
                self.nodes[-1].output[0] = out  # the planes' Add writes the output
        elif form.offsets is None:
            scales = self.as_float32(f"{weight_name}.scales", form.stored_scales())
            b = self.initializer(f"{weight_name}.qweight", form.packed())
            self.nodes.append(helper.make_node("MatMulNBits", [x, b, scales], [out], name=f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs))
        else:
            scales = self.as_float32(f"{weight_name}.scales", form.stored_scales())
            b = self.initializer(f"{weight_name}.qweight", form.packed())
            main = f"{name}/MatMulNBits/output_0"
            self.nodes.append(helper.make_node("MatMulNBits", [x, b, scales], [main], name=f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs))
        if form.offsets is not None:
            sums = self.blocksums(x, k, form.block)
            offsets_t = exact_float(form.offsets.T)  # [K // block, N]
            o = self.as_float32(f"{weight_name}.offsets", offsets_t)
            corr = f"{name}/BlockSumCorrection/MatMul/output_0"
            self.nodes.append(helper.make_node("MatMul", [sums, o], [corr], name=f"{name}/BlockSumCorrection/MatMul"))
            self.nodes.append(helper.make_node("Add", [main, corr], [out], name=f"{name}/BlockSumCorrection/Add"))
        return {"bits": form.bits, "block": form.block, "zero_point": "none (default 2^(bits-1))", **(split or {}),
                "correction": form.offsets is not None, "accuracy_level": int(accuracy_level),
                "scales_dtype": str(form.stored_scales().dtype),
                "offsets_dtype": None if form.offsets is None else str(exact_float(form.offsets).dtype),
                "prepacked_path": True}


def matmul_graph(form: BlockForm, *, accuracy_level: int = 0, opset: int = 21):
    """A one-linear ONNX model ``Y = X @ W^T`` (X [1, S, K]) in the block form, for tests and timings."""
    from onnx import TensorProto, helper

    n, k = form.shape
    edit = GraphEdit()
    info = edit.linear("X", "Y", form, name="/linear", weight_name="linear", accuracy_level=accuracy_level)
    graph = helper.make_graph(edit.nodes, "blockform", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "S", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "S", n])], initializer=edit.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model, info


def float_zero_point_graph(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block: int, *,
                           accuracy_level: int = 0, opset: int = 21):
    """The same linear with float zero points (MatMulNBits' slow path): the reference the block form must equal."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = q.shape
    inits = [numpy_helper.from_array(pack(q, bits, block), "B"), numpy_helper.from_array(scales.astype(np.float32), "S"),
             numpy_helper.from_array(zero_points.astype(np.float32), "Z")]
    node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "fzp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "S", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "S", n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model


def convert_float_zero_points(model, *, skip=lambda node: False) -> list[dict[str, Any]]:
    """Rewrite, in place, every MatMulNBits with *float* zero points (HQQ) into the exact fast form.

    ``w = s * (q - z)`` with float ``z`` -> symmetric MatMulNBits (same q and s, default zero point)
    + block-sum correction with offsets ``s * (z0 - z)``. The last new node writes the old output.
    Returns one record per converted node.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    edit = GraphEdit(prefix="/blockform")
    done: list[dict[str, Any]] = []
    replaced: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3] or skip(node):
            continue
        zp = inits.get(node.input[3])
        if zp is None or zp.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        if len(node.input) > 4 and any(node.input[4:]):  # g_idx / bias: leave alone
            continue
        attrs = attributes(node)
        n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
        if k % block or bits not in (4, 8) or node.input[1] not in inits or node.input[2] not in inits:
            continue
        kb = k // block
        q = unpack(numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1), bits, k)
        s = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, kb)
        z = numpy_helper.to_array(zp).astype(np.float32).reshape(n, kb)
        form = BlockForm.from_float_zero_points(q, s, z, bits, block)
        form.stored_scales = lambda s=s: s  # keep the scales exactly as the quantizer wrote them (float32)
        base = node.name or node.output[0]
        info = edit.linear(node.input[0], node.output[0], form, name=base, weight_name=node.input[1].replace("_Q4", "").replace("_Q8", ""),
                           accuracy_level=attrs.get("accuracy_level", 0))
        done.append({"node": node.name, **info, "from": "float zero points"})
        replaced.add(node.name or node.output[0])
    if not done:
        return done
    nodes = [nd for nd in graph.node if (nd.name or nd.output[0]) not in replaced or nd.op_type != "MatMulNBits"] + edit.nodes
    set_nodes(graph, nodes, edit.initializers)
    return done
