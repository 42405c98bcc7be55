"""The quantization table: every precision, int4 algorithm, block size, accuracy level, output-head
choice and quant-aware grid edgetune knows, with the traits the rest of the code asks about.

This is the one place those choices are defined. The CLI's choices (``commands/export.py``,
``commands/finetune.py``), the target-profile schema (``targets.Int4``, ``targets.Precision``), the
build config, the export's checks (``plan.int4_options``), the kernel checks, the recipe
candidates and the benchmark grid read it. Adding an int4 algorithm is one :class:`Int4Algorithm`
entry here plus its implementation (the ``backend`` says which module runs it), in the way peft
keeps one folder per method and gguf-py one table of quantization types.

Pure data: no third-party import, so the device side (``targets``) and the host side share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

# ---------------------------------------------------------------------------- precisions

# Decoder LLM export precisions. gguf: the model's own GGUF blocks transcoded exactly (export/decoder/gguf_export.py).
LLM_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "gguf")
# precision gguf: the form of a GGUF's 5-, 6- and 8-bit linears (export/decoder/gguf_export.py; docs/llm.md, "5-, 6- and
# 8-bit GGUF types"): a 4-bit node + a 2-/4-bit low-bits node (planes, the default), or one 8-bit node (int8).
GGUF_8BIT = ("planes", "int8")
GGUF_8BIT_DEFAULT = "planes"
# Encoder export precisions (export/encoder/pipeline.py, export/encoder/quantize.py).
ENCODER_PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
# What `edgetune export --precision` accepts: decoders' and encoders' (each refuses the other's).
EXPORT_PRECISIONS = tuple(dict.fromkeys(LLM_PRECISIONS + ENCODER_PRECISIONS))
# Decoder precisions onnxruntime's CPU provider cannot run in the builder's graphs (onnxruntime 1.32, the
# onnxruntime-genai 0.18 builder; SmolLM2-135M and a tiny Llama, 2026-12-05): refused before any work for a
# target whose graphs are built for the CPU. GPU targets (gpu-cuda, gpu-tensorrt) run them.
CPU_UNRUNNABLE_LLM_PRECISIONS = {
    "fp16": "the first cached decode step fails in a Cast onnxruntime inserts for the fp16 attention "
            "('Shape mismatch attempting to re-use buffer'); a full pass runs, generation does not",
    "bf16": "the graph does not load (no CPU kernel for the bf16 Where of the attention mask)",
}

# ---------------------------------------------------------------------------- int4 knobs

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes the builder and the quantizers write
# MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# The output head (lm_head MatMul): int4 like the blocks, int8 (MatMulNBits bits=8, llama.cpp's Q8_0
# head) or fp32 (plain MatMul). Not int4 unties a tied embedding.
LM_HEADS = ("int4", "int8", "fp32")

Backend = Literal["builder", "awq", "imatrix", "ort", "inc", "unavailable"]
ZeroPoints = Literal["if-asymmetric", "always", "folded"]


@dataclass(frozen=True)
class Int4Algorithm:
    """One int4 weight-quantization algorithm and the traits the code decides on.

    ``backend``: who quantizes. ``builder``: onnxruntime-genai's model builder (``algo_config``);
    ``awq``: edgetune's activation-aware scales folded into the checkpoint, then the builder's RTN
    (export/decoder/awq.py); ``imatrix``: the builder's RTN nodes with their values from an importance-weighted
    scale / zero-point search per block (export/decoder/imatrix.py); ``ort``: onnxruntime's ``MatMulNBitsQuantizer`` on the fp32 export
    (export/decoder/quantize.py); ``inc``: neural-compressor in torch, saved in the GPTQ layout the builder reads;
    ``unavailable``: known, refused with ``refusal`` (message, hint).
    ``zero_points``: whether its MatMulNBits nodes carry zero points: ``if-asymmetric`` (only for an
    asymmetric export), ``always`` (even symmetric: k_quant, the GPTQ-checkpoint path), ``folded``
    (asymmetric by construction, its float zero points folded into an exact block-sum correction).
    """

    name: str
    backend: Backend
    summary: str
    calibrated: bool = False  # needs calibration texts
    slow: bool = False  # calibration takes many minutes per model: the bench runs it only when asked
    zero_points: ZeroPoints = "if-asymmetric"
    asymmetric_only: bool = False  # a symmetric export is refused
    mixed: bool = False  # honours nodes_to_exclude, so layers can be kept at 8 bits (export/decoder/mixed.py)
    int8: bool = False  # can also make --precision int8 (the builder's 8-bit path)
    error_feedback: bool = False  # GPTQ-style: each column's rounding error moved onto the columns not yet rounded
    any_lm_head: bool = True  # False: quantizes every MatMul, lm_head included (int4 only)
    slow_kernel: str | None = None  # why its graph misses the CPU's prepacked kernels (refused on CPU unless allowed)
    refusal: tuple[str, str] | None = None  # (message, hint) for an unavailable algorithm

    @property
    def available(self) -> bool:
        return self.backend != "unavailable"


INT4_ALGORITHMS: dict[str, Int4Algorithm] = {a.name: a for a in (
    Int4Algorithm("rtn", "builder", "round to nearest (the builder)", mixed=True, int8=True),
    Int4Algorithm("k_quant", "builder", "the builder's k-quant (mixed bits by layer)", zero_points="always", mixed=True,
                  int8=True),
    Int4Algorithm("awq", "awq", "activation-aware scales + RTN", calibrated=True),
    Int4Algorithm("imatrix", "imatrix", "importance-weighted scale/zero-point search per block (llama.cpp's imatrix)",
                  calibrated=True, mixed=True),
    Int4Algorithm("imatrix-gptq", "imatrix", "GPTQ error feedback over the imatrix search, on the builder's RTN nodes",
                  calibrated=True, mixed=True, error_feedback=True),
    Int4Algorithm("hqq", "ort", "half-quadratic quantization (onnxruntime)", zero_points="folded", asymmetric_only=True),
    Int4Algorithm("gptq", "ort", "GPTQ (onnxruntime)", calibrated=True, slow=True, any_lm_head=False),
    Int4Algorithm("inc-rtn", "inc", "round to nearest (neural-compressor)", zero_points="always"),
    Int4Algorithm("inc-gptq", "inc", "GPTQ (neural-compressor)", calibrated=True, slow=True, zero_points="always"),
    Int4Algorithm("inc-awq", "unavailable", "refused (see docs/llm.md)", refusal=(
        "int4 algorithm 'inc-awq' cannot work with the pinned versions: neural-compressor 3.10's AWQ finds the "
        "layers to absorb its scales into with a torch.jit trace that fails on transformers 4.57 models, so it "
        "leaves MulLinear input scales that neither the builder nor onnxruntime-genai can load",
        "use inc-gptq or inc-rtn (or hqq/gptq)")),
    Int4Algorithm("inc-autoround", "unavailable", "refused (see docs/llm.md)", refusal=(
        "int4 algorithm 'inc-autoround' needs the auto-round package, which is not in edgetune's pinned dependency "
        "set (it pulls datasets/pyarrow, and its default calibration downloads a hub data set)",
        "use inc-gptq or inc-rtn (or hqq/gptq)")),
)}


def algorithms(**traits: Any) -> tuple[str, ...]:
    """Names of the int4 algorithms whose traits equal ``traits`` (in table order), e.g. ``algorithms(backend="ort")``."""
    return tuple(a.name for a in INT4_ALGORITHMS.values()
                 if all(getattr(a, k) == v for k, v in traits.items()))


def int4_algorithm(name: str) -> Int4Algorithm:
    """The table entry for ``name``; an unknown or unavailable algorithm raises BadInput (exit 2)."""
    from .errors import BadInput

    a = INT4_ALGORITHMS.get(name)
    if a is None:
        raise BadInput(f"unknown int4 algorithm '{name}'", hint=f"use one of {', '.join(algorithms(available=True))}")
    if a.refusal:
        raise BadInput(a.refusal[0], hint=a.refusal[1])
    return a


# ---------------------------------------------------------------------------- the quant-aware grid

QAT_SCHEMES = ("int4",)  # `finetune --quant-aware`: the export's int4 RTN grid


@dataclass(frozen=True)
class QATSpec:
    """The int4 grid a quant-aware LoRA is trained through, and that its export must use."""

    bits: int = 4
    block_size: int = 32
    lm_head: str = "int4"  # one of LM_HEADS (the export's --int4-lm-head)
    symmetric: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"int{self.bits} symmetric RTN, block {self.block_size}, lm_head {self.lm_head}"

    def matches_export(self, q: dict[str, Any]) -> list[str]:
        """Differences between this grid and an export's int4 options (``[quantization.int4]``)."""
        diffs = []
        if q.get("algorithm", "rtn") != "rtn":
            diffs.append(f"algorithm {q.get('algorithm')} (trained for rtn)")
        if int(q.get("block_size", 32)) != self.block_size:
            diffs.append(f"block_size {q.get('block_size')} (trained for {self.block_size})")
        if bool(q.get("symmetric", True)) != self.symmetric:
            diffs.append("asymmetric (trained for symmetric)")
        if q.get("lm_head", "int4") != self.lm_head:
            diffs.append(f"lm_head {q.get('lm_head', 'int4')} (trained for {self.lm_head})")
        elif self.lm_head == "int8" and q.get("int8_block_size") not in (None, self.block_size):
            diffs.append(f"int8_block_size {q['int8_block_size']} (the head trained in blocks of {self.block_size})")
        return diffs


def int8_block_size(q: dict[str, Any]) -> int:
    """Block of the 8-bit MatMulNBits nodes of an export (the int8 head, ``--mixed-8bit`` layers, precision int8):
    ``int8_block_size`` where set, else the int4 block (32: llama.cpp's Q8_0).

    Wider 8-bit blocks are faster on the CPU's level-4 kernel at no measured cost (SmolLM2-135M's shapes, M = 1,
    1 thread, a 2-core AMD EPYC: the head 2.14 / 1.78 / 1.67 ms at blocks of 32 / 64 / 128; v_proj + down_proj of
    30 layers 2.27 / 1.97 / 1.68 ms, 4-bit at 32: 1.56): docs/llm.md, "8-bit blocks".
    """
    return int(q.get("int8_block_size") or q["block_size"])


def embedding_block_size(hidden: int, block_size: int) -> int | None:
    """Block size for an int4 GatherBlockQuantized embedding of width ``hidden``.

    GatherBlockQuantized reshapes the table to [vocab, hidden / block]: the block must divide
    the hidden size (SmolLM2: 576 = 9 x 64, so block 128/256 fails at run time in a Reshape).
    The requested block when it divides, else the largest power of two below it that does
    (>= 16), else None (keep the table in float).
    """
    b = block_size
    while b >= 16:
        if hidden % b == 0:
            return b
        b //= 2
    return None


# The automatic recipe search's candidates (edgetune.recipes; a profile's [quantization] recipe_candidates names
# them). Smallest/fastest first. int4 options override the profile's; "mixed" as in export_llm.
RECIPE_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"name": "rtn-head4", "precision": "int4", "int4": {"algorithm": "rtn", "lm_head": "int4"}},
    {"name": "awq-head4", "precision": "int4", "int4": {"algorithm": "awq", "lm_head": "int4"}},
    {"name": "rtn-head8", "precision": "int4", "int4": {"algorithm": "rtn", "lm_head": "int8"}},
    {"name": "awq-head8", "precision": "int4", "int4": {"algorithm": "awq", "lm_head": "int8"}},
    {"name": "k_quant-head8", "precision": "int4", "int4": {"algorithm": "k_quant", "lm_head": "int8"}},
    # importance-weighted search on RTN's graph (calibrated): the fast kernel's most faithful int4 (docs/llm.md)
    {"name": "imatrix-head8", "precision": "int4", "int4": {"algorithm": "imatrix", "symmetric": False, "lm_head": "int8"}},
    {"name": "imatrix-head8-mixed10", "precision": "int4", "int4": {"algorithm": "imatrix", "symmetric": False, "lm_head": "int8"},
     "mixed": {"fraction": 0.10}},
    # v_proj and down_proj at 8 bits in every layer (llama.cpp's Q4_K_M widens the same two, in half the layers)
    {"name": "imatrix-head8-vdown8", "precision": "int4", "int4": {"algorithm": "imatrix", "symmetric": False, "lm_head": "int8"},
     "mixed": {"modules": ["v_proj", "down_proj"]}},
    # the same rule over GPTQ error feedback (imatrix-gptq): the most faithful fast-kernel candidate measured, its
    # sibling MatMulNBits packed (gate+up, q+k: bit-exact, faster at 2 threads) and its 8-bit nodes in blocks of 128
    # (the CPU's 8-bit kernel is faster on wide blocks at the same measured quality; docs/llm.md)
    {"name": "imatrix-gptq-head8-vdown8", "precision": "int4",
     "int4": {"algorithm": "imatrix-gptq", "symmetric": False, "lm_head": "int8", "int8_block_size": 128},
     "mixed": {"modules": ["v_proj", "down_proj"]}, "pack": True},
    # the same at accuracy_level 4 with the 8-bit nodes' inputs smoothed (--smooth-8bit: the kernel's int8 activation
    # blocks of 128 round finely); tried on CPU targets (AVX2 included: tests/test_avx2_emulation.py)
    {"name": "imatrix-gptq-head8-vdown8-smooth", "precision": "int4",
     "int4": {"algorithm": "imatrix-gptq", "symmetric": False, "lm_head": "int8", "int8_block_size": 128, "accuracy_level": 4,
              "smooth_8bit": True},
     "mixed": {"modules": ["v_proj", "down_proj"]}, "pack": True},
    {"name": "rtn-head8-mixed10", "precision": "int4", "int4": {"algorithm": "rtn", "lm_head": "int8"}, "mixed": {"fraction": 0.10}},
    {"name": "rtn-head8-mixed25", "precision": "int4", "int4": {"algorithm": "rtn", "lm_head": "int8"}, "mixed": {"fraction": 0.25}},
    {"name": "rtn-head8-mixed50", "precision": "int4", "int4": {"algorithm": "rtn", "lm_head": "int8"}, "mixed": {"fraction": 0.50}},
    {"name": "int8", "precision": "int8", "int4": {"algorithm": "rtn"}},
    # the fine-tune kept exactly: the base's own GGUF blocks + the LoRA as float side branches (the demo's recipe), and
    # the same with those side weights at 8 bits; tried only where the search is given the base and the adapter
    # (`edgetune build` with a LoRA fine-tune), validated against the merged model like every other candidate
    {"name": "gguf-float-lora", "precision": "gguf", "float_adapter": True},
    {"name": "gguf-float-lora-side8", "precision": "gguf", "float_adapter": True, "fuse": "int8", "int4": {"accuracy_level": 4}},
)
# The candidates a recipe may name on its own (`edgetune export --recipe NAME`, a build target's `recipe`, a profile's
# [quantization] recipe): every one but the float-adapter ones, which need a base and its adapter (`edgetune build`).
NAMED_RECIPES: tuple[str, ...] = tuple(c["name"] for c in RECIPE_CANDIDATES if not c.get("float_adapter"))
RECIPES: tuple[str, ...] = ("profile", "auto", *NAMED_RECIPES)
# the search's own options, by their CLI flags: refused without `--recipe auto`
SEARCH_FLAGS = {"data": "--eval-data", "candidates": "--recipe-candidates", "validate_options": "validate_options",
                "time_budget_s": "--recipe-time-budget"}
