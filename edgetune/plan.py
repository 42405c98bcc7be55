"""The export plan: what a target's export is asked for, decided once and handed down.

A stage takes its target as a profile name or path (the CLI) or as a resolved :class:`~edgetune.targets.Target`
(``targets.resolve``); the build resolves each ``[[targets]]`` entry once and passes the object and an
:class:`ExportPlan` to export, validate and bundle. The rules that turn a request into settings live here,
once: the precision a decoder or encoder export uses when none is asked for (:func:`llm_precision`,
:func:`encoder_precision`), the recipe it follows (:func:`export_recipe`) and the int4 options (:func:`int4_options`, held by an :class:`Int4Plan` so that
they are checked once per export however many functions read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from . import console
from .errors import BadInput
from .quant import BLOCK_SIZES, CPU_UNRUNNABLE_LLM_PRECISIONS, LLM_PRECISIONS, LM_HEADS, int4_algorithm
from .targets import Target


def llm_precision(target: Target, precision: str | None = None, *, gguf: bool = False) -> str:
    """The precision of a decoder export: the one asked for, else the model's own GGUF weights (``gguf``: a
    GGUF source that was not fine-tuned, on a target that builds CPU graphs; the export knows), else the
    profile's ``[precision].llm``. Not checked here (the export refuses an unknown one)."""
    return precision or ("gguf" if gguf else target.precision.llm)


def export_recipe(target: Target, recipe: str | None, precision: str | None, *, options_given: bool) -> str:
    """The recipe of a decoder export: the one asked for, else the profile's ``[quantization] recipe`` when neither a
    precision nor any quantization option (int4, adapters, mixed, pack, a float adapter) is given, else "profile"."""
    if recipe is not None:
        return recipe
    return target.quantization.recipe if precision is None and not options_given else "profile"


def check_llm_precision(target: Target, precision: str) -> None:
    """Refuse (exit 2, before any work) a decoder precision the target's runtime cannot run
    (``quant.CPU_UNRUNNABLE_LLM_PRECISIONS``: fp16 and bf16 on graphs built for the CPU provider)."""
    if target.runtime.resolved_builder_provider == "cpu" and precision in CPU_UNRUNNABLE_LLM_PRECISIONS:
        runs = [p for p in LLM_PRECISIONS if p not in CPU_UNRUNNABLE_LLM_PRECISIONS]
        raise BadInput(f"precision {precision} does not run on the CPU execution provider (target '{target.name}'): "
                       f"{CPU_UNRUNNABLE_LLM_PRECISIONS[precision]}",
                       hint=f"use {', '.join(runs[:-1])} or {runs[-1]} for a CPU target, or {precision} on a GPU target (gpu-cuda)")


def encoder_precision(target: Target, precision: str | None = None) -> str:
    """The precision of an encoder (or translation) export: the one asked for, else the profile's ``[precision].encoder``."""
    return precision or target.precision.encoder


def int4_options(target: Target, int4: dict | None) -> dict[str, Any]:
    """The int4 options an export uses: the profile's ``[quantization.int4]`` with the overrides ``int4``
    (``--int4-*``, a build's ``[[targets]] int4``) laid over it, checked against the table (BadInput, exit 2)."""
    q = target.quantization.int4.model_dump()
    q.update({k: v for k, v in (int4 or {}).items() if v is not None})
    unknown = set(q) - {"algorithm", "block_size", "symmetric", "accuracy_level"} - set(target.quantization.int4.model_dump())
    if unknown:
        raise BadInput(f"unknown int4 option(s): {', '.join(sorted(unknown))}", hint="use algorithm, block_size, symmetric, accuracy_level, lm_head, int8_block_size, smooth_8bit")
    alg = int4_algorithm(q["algorithm"])
    for key, what in (("block_size", "int4 block size"), ("int8_block_size", "8-bit block size")):
        if q.get(key) is not None and q[key] not in BLOCK_SIZES:
            raise BadInput(f"{what} {q[key]} is not supported", hint="use " + ", ".join(map(str, BLOCK_SIZES)))
    if q.get("lm_head", "int4") not in LM_HEADS:
        raise BadInput(f"int4 lm_head '{q['lm_head']}' is not supported", hint="use " + ", ".join(LM_HEADS))
    if not alg.any_lm_head and q["lm_head"] != "int4":
        # e.g. onnxruntime's GPTQ quantizes every MatMul (it ignores nodes_to_exclude)
        raise BadInput(f"int4 algorithm '{alg.name}' quantizes lm_head to int4; lm_head '{q['lm_head']}' is not available with it",
                       hint=f"use --int4-lm-head int4 with {alg.name}, or another algorithm")
    if alg.asymmetric_only and q["symmetric"]:
        # e.g. HQQ fits a float zero point per block: it is asymmetric by construction.
        if (int4 or {}).get("symmetric"):
            raise BadInput(f"int4 algorithm '{alg.name}' is asymmetric by construction (a zero point per block)",
                           hint=f"drop --int4-symmetric or use --int4-asymmetric with {alg.name}")
        console.warn(f"{alg.name} is asymmetric by construction: the profile's symmetric=true is not used")
        q["symmetric"] = False
    return q


def gguf_unused_int4(int4: dict | None) -> list[str]:
    """The int4 overrides a gguf export cannot use, sorted: all but ``accuracy_level`` (the GGUF keeps its own blocks;
    only the kernels' accuracy level applies). Read by ``export --precision gguf`` and a build's gguf target."""
    return sorted(k for k, v in (int4 or {}).items() if v is not None and k != "accuracy_level")


class Int4Plan:
    """A decoder export's int4 settings: the overrides as asked for (``overrides``, what the records and the
    GGUF check read) and the options they make (``options``: :func:`int4_options`, computed on first use and
    kept, so a build's early check and the export check and warn once)."""

    def __init__(self, target: Target, overrides: dict | None = None):
        self.target = target
        self.overrides = overrides

    @cached_property
    def options(self) -> dict[str, Any]:
        return int4_options(self.target, self.overrides)

    def __bool__(self) -> bool:  # like the overrides dict it stands for: "were int4 options asked for"
        return bool(self.overrides)

    def __repr__(self) -> str:
        return f"Int4Plan({self.target.name!r}, {self.overrides!r})"


def int4_plan(target: Target, int4: "Int4Plan | dict | None") -> Int4Plan:
    """An export's ``int4`` argument as a plan: one made for this target as is, overrides (a dict or None) wrapped."""
    if isinstance(int4, Int4Plan):
        return int4 if int4.target == target else Int4Plan(target, int4.overrides)
    return Int4Plan(target, int4)


@dataclass(frozen=True)
class ExportPlan:
    """What the build asks one target's export for, resolved once before any work (``build.stages.export_plan``)."""

    target: Target
    precision: str | None = None  # as asked; None: the export decides (llm_precision / encoder_precision)
    int4: Int4Plan | None = None  # the [[targets]] int4 overrides, None when there are none
    adapter: Literal["merged", "float"] = "merged"
    calibration: Path | None = None
    side_int8: bool = False  # precision gguf: the fused side weights at 8 bits (export --side-int8)
    mixed: dict | None = None  # int4: {"modules": [...]} kept at 8 bits in every layer (export --mixed-8bit)
    pack: bool = False  # int4/int8: sibling MatMulNBits packed (export --pack-siblings)
    recipe: str | None = None  # a named recipe or "auto" (export --recipe); None: the profile's

    @property
    def llm_precision(self) -> str:
        """The decoder precision as the config says (a GGUF base's own default is the export's to decide)."""
        return llm_precision(self.target, self.precision)
