"""The stage bodies of `edgetune build`: each calls the real stage function (finetune, merge, export, validate,
bundle) with what the build decided, plus the build's own steps (the held-out validation data, the base model's
task answers) and the export plan of each target, decided once before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import artifacts, console
from ..errors import BadInput
from .config import TargetCfg
from .runner import Build


def export_plan(config, i: int, t: TargetCfg, target, calibration: Path | None):
    """A target's export plan, decided once before any work and handed to the export. Its ``int4`` overrides
    apply only to an int4 decoder export and are checked here, once: the export reuses the checked options."""
    from ..plan import ExportPlan, Int4Plan, gguf_unused_int4

    plan = ExportPlan(target, t.precision, Int4Plan(target, t.int4_options()) if t.int4 else None, t.adapter, calibration,
                      t.side_int8, {"modules": list(t.mixed_8bit)} if t.mixed_8bit else None, t.pack, t.recipe)
    if t.recipe not in (None, "profile"):  # a named recipe (or the search) decides precision and quantization itself
        given = [k for k, v in (("precision", t.precision), ("int4", t.int4), ("mixed_8bit", t.mixed_8bit), ("pack", t.pack),
                                ("side_int8", t.side_int8), ("adapter = \"float\"", t.adapter == "float")) if v]
        if given:
            raise BadInput(f"{config}: targets[{i}].recipe = \"{t.recipe}\" sets the precision and quantization itself; "
                           f"{', '.join(given)} given too", hint=f"drop {', '.join(given)} from that target, or drop recipe")
    if t.side_int8 and plan.llm_precision != "gguf":
        raise BadInput(f"{config}: targets[{i}].side_int8 stores the fused side weights of a GGUF transcode; this target "
                       f"exports at {plan.llm_precision}", hint="set precision = \"gguf\" for that target, or drop side_int8")
    if plan.int4 is not None:
        if plan.llm_precision == "gguf":  # the GGUF keeps its own blocks: only the kernels' accuracy_level applies
            extra = gguf_unused_int4(t.int4_options())
            if extra:
                raise BadInput(f"{config}: targets[{i}].int4 sets {', '.join(extra)}, but a gguf target keeps the GGUF's own "
                               "quantization", hint="keep only accuracy_level in that target's int4 table")
        elif plan.llm_precision != "int4":
            raise BadInput(f"{config}: targets[{i}].int4 is set but the target exports at {plan.llm_precision}",
                           hint="set precision = \"int4\" (or \"gguf\", for accuracy_level only) for that target, or drop "
                                "its int4 table")
        try:
            plan.int4.options  # computed (and checked) now; the export reads the same Int4Plan
        except BadInput as exc:
            raise BadInput(f"{config}: targets[{i}].int4: {exc.message}", hint=exc.hint) from None
    _check_int4_graph_options(config, i, t, plan)
    return plan


def _check_int4_graph_options(config, i: int, t: TargetCfg, plan) -> None:
    """``mixed_8bit``, ``pack`` and ``int4.smooth_8bit`` against the target's precision and int4 options, before any work
    (the export checks them again; here the message names the config entry)."""
    from ..export.decoder import smooth
    from ..export.decoder.mixed import check_mixed_request
    from ..plan import Int4Plan
    from ..quant import int4_algorithm

    where = f"{config}: targets[{i}]"
    if t.pack and plan.llm_precision not in ("int4", "int8"):
        raise BadInput(f"{where}.pack packs sibling MatMulNBits of an int4/int8 export; this target exports at {plan.llm_precision}",
                       hint="set precision = \"int4\" for that target, or drop pack")
    if plan.llm_precision != "int4":
        if t.mixed_8bit:
            raise BadInput(f"{where}.mixed_8bit keeps layers of an int4 export at 8 bits; this target exports at {plan.llm_precision}",
                           hint="set precision = \"int4\" for that target, or drop mixed_8bit")
        return
    q = (plan.int4 or Int4Plan(plan.target, {})).options
    try:
        check_mixed_request(plan.mixed, precision="int4", algorithm=q["algorithm"])
        if q.get("smooth_8bit"):
            smooth.check_request(plan.mixed, accuracy_level=q["accuracy_level"], lm_head=q["lm_head"],
                                 backend=int4_algorithm(q["algorithm"]).backend)
    except BadInput as exc:
        raise BadInput(f"{where}: {exc.message}", hint=exc.hint) from None


def run_finetune(base: Path, data: Path, out: Path, options: dict[str, Any]) -> None:
    from ..finetune import FinetuneOptions, finetune, work_dir

    opts = FinetuneOptions.from_dict(options)
    if (work_dir(out) / "spec.json").is_file():
        try:  # an interrupted run: continue from its last checkpoint
            finetune(base, data, out, options=opts, resume=True)
            return
        except BadInput:
            console.log("[finetune] the interrupted run had other inputs; starting over")
    finetune(base, data, out, options=opts)


def run_merge(base: Path, adapter: Path, out: Path) -> None:
    from ..merge import merge

    merge(base, adapter, out)


def run_export(model: Path, out: Path, plan, float_adapter: Path | None = None, lora: tuple[Path, Path] | None = None) -> None:
    """``lora``: (base, adapter) of the merged ``model``, for a recipe search's float-adapter candidates (only read when
    the target's recipe is auto)."""
    from ..recipes import export_with_recipe

    opts: dict[str, Any] = {"calibration": plan.calibration} if plan.calibration else {}
    if float_adapter:
        opts["float_adapter"] = float_adapter
    if lora:
        opts["lora_search"] = lora
    if plan.int4:
        opts["int4"] = plan.int4  # checked by export_plan: the export uses those options, it does not check them again
    if plan.side_int8:
        opts["fuse"] = "int8"
    if plan.mixed:
        opts["mixed"] = plan.mixed
    if plan.pack:
        opts["pack"] = True
    if plan.recipe:
        opts["recipe"] = plan.recipe
    export_with_recipe(model, out, target=plan.target, precision=plan.precision, **opts)


def held_out(b: "Build", vdata: Path, train: Path | None) -> tuple[Path, dict[str, Any]]:
    """The validation data actually used: ``[validate] rows`` selected, never overlapping the
    training examples the fine-tune saw (same input after folding case and whitespace).

    Overlap is refused (BadInput, exit 2) unless ``drop_overlap`` splits it off explicitly.
    When rows are selected or examples dropped, the result is written to ``.work/validate-data.jsonl``.
    """
    from ..data import content_key, load_dataset, parse_rows, write_jsonl

    v = b.cfg.validation
    ds = load_dataset(vdata)
    recs, lines = ds.records, ds.lines
    info: dict[str, Any] = {"file": str(vdata), "rows": v.rows, "examples": len(recs), "overlap": 0, "dropped": 0}
    if v.rows:
        start, end = parse_rows(v.rows)
        if start >= len(recs):
            raise BadInput(f"[validate] rows = {v.rows!r}: {vdata} has only {len(recs)} records", hint="pick a range inside the file")
        recs, lines = recs[start:end], lines[start:end]
    if train is not None and b.cfg.finetune.method != "none":
        limit = b.cfg.finetune.model_dump().get("limit")
        seen = {content_key(r) for r in load_dataset(train, limit=limit).records}
        hit = [i for i, r in enumerate(recs) if content_key(r) in seen]
        info["overlap"] = len(hit)
        if hit and not v.drop_overlap:
            r0 = recs[hit[0]]
            snippet = content_key(r0)[2:60]
            raise BadInput(f"[validate] data {vdata}: {len(hit)} of {len(recs)} validation examples also occur in the training data "
                           f"(first: line {lines[hit[0]]}, {snippet!r}); that is not a held-out score",
                           hint="validate on held-out data: a disjoint [validate] rows range, another file, or drop_overlap = true to drop them")
        if hit:
            drop = set(hit)
            recs = [r for i, r in enumerate(recs) if i not in drop]
            info["dropped"] = len(hit)
            console.log(f"[validate] dropped {len(hit)} validation example(s) that also occur in the training data (drop_overlap)")
    if not recs:
        raise BadInput(f"[validate] data {vdata}: no validation examples left", hint="pick other rows or another file")
    info["examples"] = len(recs)
    if v.rows or info["dropped"]:
        out = write_jsonl(recs, b.work / "validate-data.jsonl")
        return out, info
    return vdata, info


def task_base(base: Path, data: Path, out: Path) -> None:
    """Greedy answers of the base model to the task data (one batched PyTorch pass) and their scores."""
    from ..data import load_dataset, task_examples
    from ..device.metrics import task_scores
    from ..validate.reference import task_answers

    examples = task_examples(load_dataset(data))
    with artifacts.stage_output(out, "task-base", inputs={"model": base, "data": data}, options={}) as run:
        got = task_answers(base, examples)
        sc = task_scores([e["gold"] for e in examples], got["answers"])
        sc.pop("correct")
        artifacts.write_json(run.dir / "task.json", {**sc, "answers": got["answers"], "computed_with": got["computed_with"]})
        run.results.update({k: v for k, v in sc.items() if isinstance(v, (int, float, str))})


def run_validate(export_dir: Path, target, reference: Path | None, data: Path | None, prompts: Path | None, out: Path, vopts: dict) -> None:
    from ..validate import validate

    validate(export_dir, target=target, reference=reference, data=data, out=out, prompts=prompts, **vopts)


def run_bundle(export_dir: Path, dest: Path, target, report_dir: Path, archive: bool, name: str, sign=None,
            float_report: Path | None = None) -> None:
    from ..bundle import archive_path, make_bundle

    arc = archive_path(dest)
    if arc.exists() and not archive:
        arc.unlink()
    make_bundle(export_dir, dest, target=target, report=report_dir if (report_dir / "report.json").is_file() else None,
                archive=archive, name=name, sign=sign[0] if sign else None, build_config_sha256=sign[2] if sign else None,
                float_report=float_report if float_report is not None and (report_dir / "report.json").is_file() else None)


def has_gold(data: Path) -> bool:
    from ..data import load_dataset, task_examples

    return bool(task_examples(load_dataset(data)))


def is_decoder(model: Path) -> bool:
    from ..model_input import inspect

    try:
        return inspect(model).kind == "decoder"
    except BadInput:
        return False
