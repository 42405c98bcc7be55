"""The build config (`edgetune build CONFIG.toml`): its schema and every check made before any work starts.

One TOML file names the model, the data, the fine-tune, the targets, validation and bundling
(docs/bundles.md). :func:`load_config` reads it into a :class:`BuildConfig` and checks all of it first:
unknown keys (with a did-you-mean), lengths, values, the fine-tuning options, the quant-aware grid
against the targets and what a quant-aware build adds (the float fine-tune as a second reference, the
distillation teacher). A bad config is one BadInput line (exit 2) naming the field and the fix; the
pipeline (:mod:`edgetune.build`) starts only from a config that passed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..errors import BadInput

STATE_DIR = "state"
# Longest string a config field takes (a path is at most 4096 bytes on Linux), and a name (it becomes a
# folder and archive name): a 10 MB field was once accepted and the build ran past 15 minutes.
MAX_STR, MAX_NAME, MAX_CONFIG = 4096, 200, 16 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STR)


class ModelCfg(_Strict):
    base: str = Field(description="model alias (smollm2, minilm), HF folder or .gguf, relative to the config file")


class DataCfg(_Strict):
    train: str | None = None
    eval: str | None = None


class FinetuneCfg(_Strict):
    model_config = ConfigDict(extra="allow")  # every other key is a FinetuneOptions field
    method: str = "lora"  # or "none" to bundle the base model as is


class Int4Cfg(_Strict):
    """Per-target overrides of the profile's ``[quantization.int4]`` (the export's ``--int4-*`` options)."""
    algorithm: str | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    lm_head: str | None = None
    int8_block_size: int | None = None  # the 8-bit nodes' block (export --int8-block-size)
    smooth_8bit: bool | None = None  # the 8-bit nodes' activation outliers folded into their weights (export --smooth-8bit)


class TargetCfg(_Strict):
    name: str = Field(max_length=MAX_NAME)
    precision: str | None = None
    int4: Int4Cfg | None = None  # overrides of the profile's [quantization.int4], e.g. { lm_head = "int8" }
    archive: bool = True
    calibration: str | None = None  # encoders, int8-static
    # decoders with a fine-tune: export the merged model, or the base + the LoRA as float side
    # branches that are never quantized (edgetune export BASE --float-adapter ADAPTER)
    adapter: Literal["merged", "float"] = "merged"
    # precision gguf: the fused side weights (LoRA A/B, block offsets) at 8 bits (edgetune export --side-int8)
    side_int8: bool = False
    # int4 decoders: these projections at 8 bits in every layer (edgetune export --mixed-8bit v_proj,down_proj)
    mixed_8bit: list[str] | None = None
    # int4/int8 decoders on a CPU target: sibling MatMulNBits packed into one node (edgetune export --pack-siblings)
    pack: bool = False
    # decoders: a named recipe (edgetune export --recipe NAME; edgetune.quant.NAMED_RECIPES) sets the precision, int4
    # options, 8-bit layers and packing itself; "auto" searches; unset: the profile's [quantization] recipe
    recipe: str | None = None

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str | None) -> str | None:
        from ..quant import NAMED_RECIPES, RECIPES

        if name is not None and name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r} (profile, auto, or a candidate: {', '.join(NAMED_RECIPES)})")
        return name

    def int4_options(self) -> dict[str, Any]:
        """The int4 overrides set (empty when none)."""
        return self.int4.model_dump(exclude_none=True) if self.int4 else {}


class ValidateCfg(_Strict):
    model_config = ConfigDict(extra="allow")  # passed to edgetune.validate.validate (window, eval_tokens, repeats, ...)
    data: str | None = None
    prompts: str | None = None
    reference: Literal["merged", "base", "none"] = "merged"
    rows: str | None = None  # records of `data` to validate on, 1-based inclusive: "1501-2000", "1501-"
    drop_overlap: bool = False  # drop validation examples whose input occurs in the training data (else: refuse)
    require_device: bool = False  # the target's execution provider missing here is fatal (else: cross-build)


class BundleCfg(_Strict):
    # an Ed25519 private key (PEM, from `edgetune keygen`), relative to this file: every bundle is signed
    sign: str | None = None


class BuildConfig(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=MAX_NAME)
    output: str = "build"
    model: ModelCfg
    data: DataCfg = DataCfg()
    finetune: FinetuneCfg = FinetuneCfg(method="none")
    targets: list[TargetCfg]
    validation: ValidateCfg = Field(default_factory=ValidateCfg, alias="validate")
    bundle: BundleCfg = BundleCfg()
    _profiles: dict[str, Any] = PrivateAttr(default_factory=dict)  # [[targets]] name -> its Target (profile())

    def profile(self, t: TargetCfg, root: Path):
        """The Target a ``[[targets]]`` entry names (a profile name, or a .toml path relative to the config's
        folder ``root``), read on first use and kept: a build reads each profile file once."""
        if t.name not in self._profiles:
            from ..targets import resolve

            self._profiles[t.name] = resolve(str(_under(root, t.name)) if t.name.endswith(".toml") else t.name)
        return self._profiles[t.name]

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[TargetCfg]) -> list[TargetCfg]:
        if not v:
            raise ValueError("at least one [[targets]] entry is needed")
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"target names repeat: {names}")
        return v


def _under(root: Path, value: str) -> Path:
    """A path of the config (``~`` expanded), relative to the config's folder ``root``, normalized."""
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else root / p))


def _extra_keys(model: type[BaseModel]) -> set[str] | None:
    """Known keys of a section that passes extra keys on (None: the section forbids extras).

    Derived from the code that consumes them, so a field added there is known here too:
    [finetune] -> FinetuneOptions' fields, [validate] -> edgetune.validate.DEFAULTS.
    """
    if model is FinetuneCfg:
        import dataclasses

        from ..finetune.options import FinetuneOptions

        return {f.name for f in dataclasses.fields(FinetuneOptions)}
    if model is ValidateCfg:
        from ..validate import DEFAULTS

        return set(DEFAULTS)
    return None


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model of a field, whether it is a list of them) from its annotation."""
    import typing

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True
    for a in args:  # Optional[Model] / Model | None
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a, False
    return None, False


def unknown_keys(raw: Any, model: type[BaseModel] = None, where: str = "") -> list[tuple[str, str, list[str]]]:
    """Every key of ``raw`` that ``model`` (default BuildConfig) does not know, recursively:
    (location, key, known keys there). Known = the model's fields and aliases (+ _extra_keys)."""
    model = model or BuildConfig
    if not isinstance(raw, dict):
        return []
    known: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        known[name] = f
        if f.alias:
            known[f.alias] = f
    extra = _extra_keys(model)
    names = set(known) | (extra or set())
    out = []
    for key, value in raw.items():
        loc = f"{where}.{key}" if where else key
        if key not in names:
            out.append((where or "(top level)", key, sorted(names)))
            continue
        f = known.get(key)
        if f is None:
            continue
        sub, is_list = _section_model(f.annotation)
        if sub is None:
            continue
        for i, item in enumerate(value if is_list and isinstance(value, list) else [value]):
            out += unknown_keys(item, sub, f"{loc}.{i}" if is_list else loc)
    return out


def _did_you_mean(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_values(p: Path, cfg: BuildConfig) -> None:
    """Values the pydantic models pass on unchecked: [validate] extras (typed by validate.DEFAULTS),
    [[targets]] precision (the target schema's precisions)."""
    from ..targets import Precision
    from ..validate import DEFAULTS

    for key, value in (cfg.validation.model_extra or {}).items():
        default = DEFAULTS.get(key)
        if default is None or value is None:
            continue
        want = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
            raise BadInput(f"{p}: validate.{key} = {value!r} should be {type(default).__name__} (like {default!r})",
                           hint="fix the value in [validate]")
    from ..validate import check_numbers

    check_numbers(cfg.validation.model_extra or {}, where=f"{p}: validate.")
    method = (cfg.validation.model_extra or {}).get("method")
    if method is not None and method not in ("sliding", "chunked"):
        raise BadInput(f"{p}: validate.method = {method!r}{_did_you_mean(str(method), ['sliding', 'chunked'])}",
                       hint="use sliding or chunked")
    import typing

    precisions = [v for f in Precision.model_fields.values() for v in typing.get_args(f.annotation)]
    for i, t in enumerate(cfg.targets):
        if t.precision is not None and t.precision not in precisions:
            raise BadInput(f"{p}: targets[{i}].precision = {t.precision!r}{_did_you_mean(t.precision, precisions)}",
                           hint=f"use one of: {', '.join(dict.fromkeys(precisions))}")


def _check_lengths(p: Path, raw: Any, where: str = "") -> None:
    """Every string in the config (the sections' extra keys too, which pydantic passes on unchecked) is at
    most MAX_STR characters: BadInput naming the field."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        name = f"{where}.{key}" if where else str(key)
        if len(str(key)) > MAX_NAME:
            raise BadInput(f"{p}: a key in {where or '(top level)'} is {len(str(key))} characters long, over the limit of {MAX_NAME}",
                           hint="fix the key (see docs/bundles.md for the known names)")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise BadInput(f"{p}: {name} is {len(value)} characters long, over the limit of {MAX_STR}",
                           hint="shorten the value (a path, a name or an option)")
        _check_lengths(p, value, name)


def load_config(path: str | os.PathLike) -> tuple[BuildConfig, Path]:
    """Parse and check a build config (every section, before any work); returns it and the folder
    relative paths are resolved against. Unknown keys anywhere exit 2 with a did-you-mean."""
    p = Path(path)
    if not p.is_file():
        from ..errors import not_a_file

        raise not_a_file(p, "build config", hint="give a .toml file, e.g. examples/smollm2-lora-cpu.toml")
    if p.stat().st_size > MAX_CONFIG:
        raise BadInput(f"{p}: build config is {p.stat().st_size} bytes, over the limit of {MAX_CONFIG}",
                       hint="a build config names files; it does not hold data")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{p}: invalid TOML ({exc})", hint="fix the syntax at the position shown") from exc
    _check_lengths(p, raw)
    unknown = unknown_keys(raw)
    if unknown:
        parts = [f"{key if where == '(top level)' else where + '.' + key}{_did_you_mean(key, known)}" for where, key, known in unknown]
        where, _, known = unknown[0]
        raise BadInput(f"{p}: unknown key(s) {'; '.join(parts)}",
                       hint=f"known in {where}: {', '.join(known)} (see docs/bundles.md)")
    try:
        cfg = BuildConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise BadInput(f"{p}: {where}: {err['msg']}", hint="see docs/bundles.md for the build config fields") from exc
    _check_values(p, cfg)
    _check_float_reference(p, cfg)
    if cfg.finetune.method != "none":
        from ..finetune.options import FinetuneOptions

        opts = {k: v for k, v in cfg.finetune.model_dump().items()}
        FinetuneOptions.from_dict(opts).check()
        if not cfg.data.train:
            raise BadInput(f"{p}: finetune.method = '{cfg.finetune.method}' needs data.train", hint="add [data] train = \"file.jsonl\" or set finetune.method = \"none\"")
    if cfg.finetune.method != "none" and (cfg.finetune.model_extra or {}).get("quant_aware"):
        _check_quant_aware(p, cfg, p.resolve().parent)
    floats = [t.name for t in cfg.targets if t.adapter == "float"]
    if floats and cfg.finetune.method not in ("lora", "qlora"):
        raise BadInput(f"{p}: targets.{floats[0]}: adapter = \"float\" needs a LoRA fine-tune, finetune.method is '{cfg.finetune.method}'",
                       hint="set finetune.method = \"lora\" (or qlora), or drop adapter = \"float\" to bundle the merged model")
    return cfg, p.resolve().parent


# [finetune] quant_aware_teacher in a build: the float fine-tune's merge (the build makes it anyway, to validate
# against) or the base (self-distillation); the CLI's --quant-aware-teacher takes a folder instead
TEACHERS = {"finetune": "the float fine-tune's merge", "base": "the float base"}


def float_finetune_options(ft: dict[str, Any]) -> dict[str, Any]:
    """The float fine-tune of a quant-aware build: the same options without any quant_aware* key. The same
    options as a plain LoRA build of the same base and data, so the two share it (the stage cache)."""
    return {k: v for k, v in ft.items() if not k.startswith("quant_aware")}


def _check_float_reference(p: Path, cfg: BuildConfig) -> None:
    """What a quant-aware build adds (the float fine-tune as second reference, the distillation teacher),
    checked before the fine-tuning options are: one line naming the fix."""
    extra = cfg.finetune.model_extra or {}
    teacher = extra.get("quant_aware_teacher")
    if not (cfg.finetune.method != "none" and extra.get("quant_aware")):
        if teacher is not None:
            raise BadInput(f"{p}: finetune.quant_aware_teacher is set but finetune.quant_aware is not",
                           hint="add quant_aware = \"int4\" (with quant_aware_distill), or drop quant_aware_teacher")
        return
    if cfg.validation.reference == "none":
        raise BadInput(f"{p}: validate.reference = \"none\", but a quant-aware build validates each bundle against the float "
                       "fine-tune (and against its own merge)", hint="set [validate] reference = \"merged\", or drop finetune.quant_aware")
    teacher = extra.get("quant_aware_teacher")
    if teacher is not None and teacher not in TEACHERS:
        raise BadInput(f"{p}: finetune.quant_aware_teacher = {teacher!r}{_did_you_mean(str(teacher), list(TEACHERS))}",
                       hint="use \"finetune\" (the float fine-tune's merge, the default with quant_aware_distill) or \"base\"")
    if teacher is not None and not extra.get("quant_aware_distill"):
        raise BadInput(f"{p}: finetune.quant_aware_teacher = {teacher!r} is the distillation's teacher, but quant_aware_distill is 0 (off)",
                       hint="set finetune.quant_aware_distill = 2.0, or drop quant_aware_teacher")


def _check_quant_aware(p: Path, cfg: BuildConfig, root: Path) -> None:
    """[finetune] quant_aware: train for the int4 grid of the targets that export the merged model.

    Block size and lm_head default to those targets' profile (``[quantization.int4]``); every such
    target must export int4 RTN on that one grid, else exit 2 before any work (a mismatch would ship
    a model the adapter was not trained as).
    """
    from ..plan import export_recipe, llm_precision
    from ..quant import QATSpec

    extra = cfg.finetune.model_extra
    merged = []
    for t in cfg.targets:
        if t.adapter != "merged":
            continue
        target = cfg.profile(t, root)
        named = export_recipe(target, t.recipe, t.precision, options_given=bool(t.int4 or t.mixed_8bit or t.pack))
        if named != "profile":  # the export would not be on the grid the adapter is trained for
            raise BadInput(f"{p}: targets.{t.name} exports with recipe {named!r}"
                           f"{' (its profile default)' if t.recipe is None else ''}, not on the int4 RTN grid finetune.quant_aware "
                           "trains for", hint=f"set precision = \"int4\" for targets.{t.name} (the profile's [quantization.int4]), or "
                                              "drop quant_aware")
        if llm_precision(target, t.precision) == "int4":
            merged.append((t.name, {**target.quantization.int4.model_dump(), **t.int4_options()}))
    if not merged:
        raise BadInput(f"{p}: finetune.quant_aware = {extra['quant_aware']!r} trains for an int4 export, but no target exports "
                       "the merged model at int4", hint="add a [[targets]] with precision = \"int4\" (adapter = \"merged\"), or drop quant_aware")
    first = merged[0][1]
    if extra.get("quant_aware_distill"):
        extra.setdefault("quant_aware_teacher", "finetune")  # the build makes the float fine-tune anyway
    extra.setdefault("quant_aware_block_size", first["block_size"])
    extra.setdefault("quant_aware_lm_head", first["lm_head"])
    spec = QATSpec(block_size=int(extra["quant_aware_block_size"]), lm_head=extra["quant_aware_lm_head"])
    for name, q in merged:
        diffs = spec.matches_export(q)
        if diffs:
            raise BadInput(f"{p}: targets.{name} exports int4 with {'; '.join(diffs)}: not the grid finetune.quant_aware trains for",
                           hint="make the targets agree (profile [quantization.int4] or [[targets]] int4) or set finetune.quant_aware_block_size/_lm_head")
