"""Target profiles: one TOML file per deployment target, validated by a typed schema.

A profile says how a model runs on a device (execution provider, fallbacks, provider and
session options), how it is made (precision, quantization recipe, graph options, the
operators an accelerator supports) and what it must achieve (budgets).

Stages take a target as a name, a path or a resolved :class:`Target` and call :func:`resolve`.

Profiles are found by name in ``targets/`` of this project, in folders listed in
``EDGETUNE_TARGETS_PATH`` (os.pathsep-separated), or given as a path to a ``.toml`` file.
A profile may ``extends = "<name or relative path>"``; tables are merged key by key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import quant
from .errors import BadInput
from .resources import data_dir

# targets/ of the checkout, or the copy a regular `pip install .` puts under <prefix>/share/edgetune/.
PROJECT_TARGETS = data_dir("targets")

ExecutionProvider = Literal["cpu", "cuda", "tensorrt", "vitisai", "openvino", "qnn", "dml", "webgpu", "coreml"]
# The providers onnxruntime-genai's model builder can specialize a graph for; the others
# are chosen at session time on a graph built for "cpu" (see runtime-facts).
BUILDER_PROVIDERS = ("cpu", "cuda", "dml", "webgpu", "NvTensorRtRtx")
ORT_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Runtime(_Strict):
    execution_provider: ExecutionProvider = "cpu"
    provider_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    fallback_providers: list[ExecutionProvider] = Field(default_factory=list)
    # Provider the genai builder specializes the LLM graph for; defaults from execution_provider.
    builder_provider: Literal["cpu", "cuda", "dml", "webgpu", "NvTensorRtRtx"] | None = None
    # Instruction-set features the target CPU must have (checked by `doctor`).
    cpu_features: list[Literal["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx", "neon", "sve", "dotprod", "i8mm"]] = Field(
        default_factory=list
    )
    arch: Literal["x86_64", "aarch64", "any"] = "any"

    @property
    def resolved_builder_provider(self) -> str:
        if self.builder_provider:
            return self.builder_provider
        return self.execution_provider if self.execution_provider in BUILDER_PROVIDERS else "cpu"


class Precision(_Strict):
    # gguf: the model's own GGUF blocks transcoded exactly (needs a GGUF source; edgetune.export.decoder.gguf_export)
    llm: Literal[quant.LLM_PRECISIONS] = "int4"  # the choices live in edgetune.quant
    encoder: Literal[quant.ENCODER_PRECISIONS] = "int8-dynamic"


class Int4(_Strict):
    algorithm: Literal[tuple(quant.INT4_ALGORITHMS)] = "rtn"
    block_size: Literal[quant.BLOCK_SIZES] = 32
    symmetric: bool = True
    # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
    accuracy_level: Literal[quant.ACCURACY_LEVELS] = 0
    # The output head (lm_head MatMul), the most quantization-sensitive matrix: int4 like the
    # blocks, int8 (MatMulNBits bits=8, llama.cpp's Q8_0 output head) or fp32 (plain MatMul).
    # Not int4 untie a tied embedding (the embedding stays int4 GatherBlockQuantized).
    lm_head: Literal[quant.LM_HEADS] = "int4"
    # Block of the 8-bit MatMulNBits nodes (the int8 head, mixed-precision 8-bit layers, precision int8); unset:
    # block_size. Wider is faster on the CPU's 8-bit kernel (edgetune.quant.int8_block_size); a tied head takes
    # the widest block up to it that divides the hidden size (its table is also the embedding's).
    int8_block_size: Literal[quant.BLOCK_SIZES] | None = None
    # accuracy_level 4: fold the activation outliers of the 8-bit nodes' inputs (down_proj at 8 bits by rule: into up_proj's
    # rows; the int8 head: into the final norm) into their weights, so the kernel's int8 activation blocks round finely
    # (edgetune/export/decoder/smooth.py; calibrated).
    smooth_8bit: bool = False


class Int8(_Strict):
    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    weight_type: Literal["qint8", "quint8"] = "qint8"
    activation_type: Literal["quint8", "qint8"] = "quint8"
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    calibration_samples: int = Field(64, ge=1, le=100_000)
    power_of_two_scales: bool = False
    exclude_op_types: list[str] = Field(default_factory=list)
    exclude_nodes: list[str] = Field(default_factory=list)


class Quantization(_Strict):
    # Decoder export recipe when the caller names no precision/int4 options: "profile" = [precision].llm
    # with [quantization.int4]; "auto" = search the candidate recipes against [budgets] and keep the
    # fastest that passes (edgetune.recipes; minutes per model, so opt-in per profile); or one candidate's
    # name (quant.NAMED_RECIPES, e.g. "imatrix-gptq-head8-vdown8-smooth"): that recipe, exported as the
    # search would export it, not searched. A GGUF not fine-tuned keeps its own weights by default either way.
    recipe: str = "profile"
    # recipe = "auto": the candidates to try, in order (default: all of quant.RECIPE_CANDIDATES; the float-adapter
    # ones where the build gives a LoRA), and the search's time budget in seconds (a candidate starts only while the
    # search has run for less; the rest are rows "not tried"). Unset: no limit.
    recipe_candidates: list[str] | None = None
    recipe_time_budget_s: float | None = Field(None, gt=0)
    int4: Int4 = Int4()
    int8: Int8 = Int8()

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str) -> str:
        if name not in quant.RECIPES:
            raise ValueError(f"unknown recipe {name!r} (profile, auto, or a candidate: {', '.join(quant.NAMED_RECIPES)})")
        return name

    @field_validator("recipe_candidates")
    @classmethod
    def _known_candidates(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            known = [c["name"] for c in quant.RECIPE_CANDIDATES]
            if not names:
                raise ValueError("empty (leave it out for all)")
            if bad := [n for n in names if n not in known]:
                raise ValueError(f"unknown {', '.join(bad)} (known: {', '.join(known)})")
        return names


class Graph(_Strict):
    optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    opset: int = Field(17, ge=11, le=23)
    static_shapes: bool = False
    batch_size: int = Field(1, ge=1)
    sequence_length: int = Field(128, ge=1)
    transformer_fusions: bool = True  # onnxruntime.transformers optimizer for encoders


class Session(_Strict):
    intra_op_threads: int = Field(0, ge=0)  # 0 = onnxruntime decides
    inter_op_threads: int = Field(0, ge=0)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    allow_spinning: bool = True
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True


class Generation(_Strict):
    """Search defaults written into genai_config.json for decoder LLMs."""

    context_length: int = Field(2048, ge=16)
    max_length: int = Field(512, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(1, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)


class Operators(_Strict):
    """Operators the accelerator executes; empty means all (CPU/GPU targets)."""

    supported: list[str] = Field(default_factory=list)


class Budgets(_Strict):
    max_size_mb: float | None = Field(None, gt=0)
    max_peak_memory_mb: float | None = Field(None, gt=0)
    max_load_time_s: float | None = Field(None, gt=0)
    max_time_to_first_token_ms: float | None = Field(None, gt=0)
    min_decode_tokens_per_s: float | None = Field(None, gt=0)
    max_p90_ms: float | None = Field(None, gt=0)
    # accuracy tolerances vs the fp32 reference
    max_perplexity_increase_pct: float | None = Field(None, ge=0)
    max_kl_divergence: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    min_generation_agreement: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=100)  # percentage points
    # LLM task accuracy on data with gold answers (greedy answers; exact match, or token F1 for free text; %).
    # Encoders use max_accuracy_drop (same points).
    max_task_accuracy_drop: float | None = Field(None, ge=0, le=100)  # points below the reference's
    min_task_accuracy: float | None = Field(None, ge=0, le=100)  # %, the model's own (a floor)


class Target(_Strict):
    name: str
    description: str = ""
    kind: Literal["cpu", "gpu", "fpga", "npu"] = "cpu"
    runtime: Runtime = Runtime()
    precision: Precision = Precision()
    quantization: Quantization = Quantization()
    graph: Graph = Graph()
    session: Session = Session()
    generation: Generation = Generation()
    operators: Operators = Operators()
    budgets: Budgets = Budgets()
    source: str | None = None  # file the profile was read from (set by the loader)

    @model_validator(mode="after")
    def _check(self) -> "Target":
        if self.kind == "fpga" and self.quantization.int8.format != "qdq":
            raise ValueError("quantization.int8.format: FPGA targets need 'qdq'")
        return self

    @property
    def ort_providers(self) -> list[str]:
        """onnxruntime provider names in priority order (target EP, then fallbacks, then CPU)."""
        names = [ORT_PROVIDER_NAMES[self.runtime.execution_provider]]
        names += [ORT_PROVIDER_NAMES[p] for p in self.runtime.fallback_providers]
        if "CPUExecutionProvider" not in names:
            names.append("CPUExecutionProvider")
        return list(dict.fromkeys(names))


def search_path() -> list[Path]:
    paths = [Path(p) for p in os.environ.get("EDGETUNE_TARGETS_PATH", "").split(os.pathsep) if p]
    return paths + [PROJECT_TARGETS]


def available() -> dict[str, Path]:
    """Profile name -> file, first match on the search path wins."""
    found: dict[str, Path] = {}
    for folder in search_path():
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
                found.setdefault(f.stem, f)
    return found


def _find(name_or_path: str | os.PathLike, *, relative_to: Path | None = None) -> Path:
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        p = Path(text)
        if not p.is_absolute() and relative_to is not None:
            p = relative_to / p
        if not p.is_file():
            from .errors import not_a_file

            raise not_a_file(p, "target profile file")
        return p
    profiles = available()
    if text not in profiles:
        raise BadInput(
            f"unknown target '{text}'",
            hint=f"choose one of: {', '.join(sorted(profiles))}, or give a path to a .toml file",
        )
    return profiles[text]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise BadInput(f"{path}: 'extends' forms a cycle", hint="remove the circular extends")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML ({exc})", hint="fix the syntax") from exc
    parent = data.pop("extends", None)
    if parent is None:
        return data
    try:
        parent_path = _find(parent, relative_to=path.parent)
    except BadInput as exc:  # name the file whose `extends` points nowhere, not just the missing name
        raise BadInput(f"{path}: extends = {parent!r}: {exc.message}", hint=exc.hint) from None
    base = _read_raw(parent_path, seen + (path,))
    base.pop("name", None)
    base.pop("description", None)
    return _merge(base, data)


def _describe_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(profile)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = Target
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            parent = field.annotation if field is not None else None
        allowed = ", ".join(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else "see targets/README.md"
        return f"{path}: field '{loc}' is not allowed; allowed fields here: {allowed}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: field '{loc}' = {err.get('input')!r} is invalid; expected one of {expected}"
    if kind == "missing":
        return f"{path}: field '{loc}' is required"
    return f"{path}: field '{loc}' = {err.get('input')!r}: {err['msg']}"


def resolve(target: "str | os.PathLike | Target") -> Target:
    """A stage's ``target`` argument as a Target: a resolved one as is (the build resolves each target once
    and hands the object down), a profile name or path loaded (:func:`load_target`, the CLI's way)."""
    return target if isinstance(target, Target) else load_target(target)


def load_target(name_or_path: str | os.PathLike) -> Target:
    """Read, merge (extends) and validate a profile file; bad profiles raise BadInput (exit 2).

    Reads the file every call: stages call :func:`resolve`, which skips this for a resolved Target."""
    path = _find(name_or_path)
    raw = _read_raw(path)
    raw.setdefault("name", path.stem)
    raw["source"] = str(path)
    try:
        return Target.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(_describe_error(path, exc), hint="see targets/README.md for the schema") from None


def list_targets() -> list[Target]:
    return [load_target(p) for p in available().values()]
