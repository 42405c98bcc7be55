"""The pipeline of `edgetune build`: the config checked, every target resolved and planned, then materialize ->
finetune -> merge -> export -> validate -> bundle through the incremental runner (:mod:`.runner`), and the summary."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import artifacts, console
from ..errors import BadInput, CheckFailed
from .config import STATE_DIR, BuildConfig, float_finetune_options, load_config
from .runner import Build, StageInfo, read_json
from .stages import export_plan, has_gold, held_out, is_decoder, run_bundle, run_export, run_finetune, run_merge, run_validate, task_base
from .summary import summary_row, task_summary


def build(config: str | os.PathLike, *, force: bool = False, output: str | os.PathLike | None = None,
          require_device: bool | None = None) -> dict[str, Any]:
    """Run the build described by ``config``; returns the summary (raises CheckFailed after
    writing everything when a target missed its budgets).

    ``require_device`` (default: ``[validate] require_device``, false): a target whose execution
    provider this machine lacks is fatal (exit 3) instead of a cross-build (accuracy on the CPU
    provider with the same graph, latency "not measured")."""
    from ..model_input import materialize

    cfg, root = load_config(config)
    b = Build(cfg, root, force=force, output_override=Path(output).resolve() if output else None)
    if cfg.bundle.sign:  # the key is read before any work: a missing or unreadable key fails at once
        from ..signing import file_mode_warning, fingerprint, load_private_key

        key = load_private_key(b.path(cfg.bundle.sign))
        b.sign = (key, fingerprint(key.public_key()), artifacts.sha256_file(config))
        if (warning := file_mode_warning(b.path(cfg.bundle.sign))):
            console.log(f"warning: {warning}")
    # fail before any work: profiles, paths, int4 overrides. Each target is resolved here, once, and its
    # Target and export plan are what the stages get.
    plans = [export_plan(config, i, t, cfg.profile(t, root), b.maybe_path(t.calibration)) for i, t in enumerate(cfg.targets)]
    train = b.maybe_path(cfg.data.train)
    ft_eval = b.maybe_path((cfg.finetune.model_extra or {}).get("eval_data"))  # relative to the config, as data.train
    if ft_eval is not None and cfg.finetune.method != "none":
        from ..data import load_dataset

        load_dataset(ft_eval)  # a malformed line fails here, line-exact, before any work
    vdata = b.maybe_path(cfg.validation.data)
    prompts = b.maybe_path(cfg.validation.prompts)
    from ..model_input import resolve

    resolve(str(b.path(cfg.model.base)) if b.path(cfg.model.base).exists() else cfg.model.base)  # alias or path exists
    # one build at a time per output folder: a second one (say fp32 while int4 runs) fails fast (exit 2)
    # instead of validating and bundling the other one's export
    with artifacts.output_lock(b.output, what="build output"):
        return _build(b, cfg, config, plans, train, ft_eval, vdata, prompts, materialize, require_device)


def _build(b: Build, cfg: BuildConfig, config, plans: list, train, ft_eval, vdata, prompts, materialize,
           require_device: bool | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    b.work.mkdir(parents=True, exist_ok=True)
    from ..cleanup import sweep_work

    for folder in (b.work, b.work / STATE_DIR):  # what a killed build left, even beside stages this run skips
        sweep_work(folder)
    held_out_info = None
    if vdata is not None:
        vdata, held_out_info = held_out(b, vdata, train)
    if require_device is None:
        require_device = cfg.validation.require_device

    base_spec = cfg.model.base
    if b.path(base_spec).exists():  # a folder or .gguf next to the config; otherwise an alias
        base_spec = str(b.path(base_spec))
    t0 = time.perf_counter()
    with console.step("materialize"), console.results_only_stdout():
        info = materialize(base_spec)
    b.stages.append(StageInfo("materialize", None, "ran", round(time.perf_counter() - t0, 2), str(info.path)))
    base = Path(info.path)
    if info.kind == "decoder":  # an attention shape onnxruntime cannot run: before any training
        from ..export.decoder.proof import check_runtime_shapes

        check_runtime_shapes(info.config, str(info.path))
        from ..plan import check_llm_precision

        for i, plan in enumerate(plans):  # fp16 on a CPU target, ...: before any training
            try:
                check_llm_precision(plan.target, plan.llm_precision)
            except BadInput as exc:
                raise BadInput(f"{config}: targets[{i}]: {exc.message}", hint=exc.hint) from None
    overrides = [i for i, t in enumerate(cfg.targets) if t.int4]
    if overrides and info.kind != "decoder":  # the model's kind is known only now, still before any training
        raise BadInput(f"{config}: targets[{overrides[0]}].int4 applies to decoder LLMs; {info.model_type} is a {info.kind}",
                       hint="drop the target's int4 table")

    model, adapter, float_model = base, None, None
    if cfg.finetune.method != "none":
        from ..data import load_dataset
        from ..finetune.train import check_model_and_data

        # the model against the data, before the first training step (a base model given chat data, ...)
        extra = cfg.finetune.model_extra or {}
        check_model_and_data(extra.get("task", "auto"), load_dataset(train, limit=extra.get("limit")), info)
        from ..finetune.memory import check_fits
        from ..finetune.options import FinetuneOptions

        check_fits(Path(info.path), info.config, FinetuneOptions.from_dict(cfg.finetune.model_dump()))
        ft_opts = cfg.finetune.model_dump()
        # what every fine-tune of this build reads, by content; [finetune] eval_data is resolved against the config's
        # folder like data.train, and is an input, not an option: a changed file re-runs the fine-tune, a moved
        # checkout does not
        data_inputs: dict[str, Any] = {"model": base, "data": train}
        path_opts: dict[str, Any] = {}
        if ft_opts.pop("eval_data", None):  # resolved and read in build(), before any work
            data_inputs["eval_data"] = ft_eval
            path_opts["eval_data"] = str(ft_eval)
        ft_inputs: dict[str, Any] = dict(data_inputs)
        run_opts = {**ft_opts, **path_opts}
        if ft_opts.get("quant_aware"):
            # the float fine-tune (same base, data and LoRA settings, no quant_aware): the model the user would
            # otherwise ship. Every bundle is validated against it too, and it is the distillation's teacher
            # by default. Kept in the stage cache: a plain LoRA build of the same settings shares it.
            float_adapter, float_model = b.work / "adapter-float", b.work / "merged-float"
            f_opts = float_finetune_options(ft_opts)
            b.stage("finetune-float", float_adapter, dict(data_inputs), f_opts,
                    lambda: run_finetune(base, train, float_adapter, {**f_opts, **path_opts}), shared="finetune")
            b.stage("merge-float", float_model, {"base": base, "adapter": float_adapter}, {},
                    lambda: run_merge(base, float_adapter, float_model))
            if ft_opts.get("quant_aware_distill"):
                teacher = ft_opts.get("quant_aware_teacher") or "finetune"
                ft_opts = {**ft_opts, "quant_aware_teacher": teacher}
                run_opts = {**run_opts, "quant_aware_teacher": str(float_model) if teacher == "finetune" else None}
                if teacher == "finetune":
                    ft_inputs["teacher"] = float_model  # by content: the fingerprint does not depend on the folder's path
                from ..finetune.qat import distill_prompts

                ft_inputs["distill_prompts"] = distill_prompts()  # a data file the corpus comes from, by content
        adapter = b.work / "adapter"
        b.stage("finetune", adapter, ft_inputs, ft_opts, lambda: run_finetune(base, train, adapter, run_opts),
                shared=None if ft_opts.get("quant_aware") else "finetune")
        merged = b.work / "merged"
        b.stage("merge", merged, {"base": base, "adapter": adapter}, {}, lambda: run_merge(base, adapter, merged))
        model = merged

    # task accuracy of the base model (the "before" of the summary): one greedy pass on the host
    base_task = None
    if vdata is not None and cfg.finetune.method != "none" and has_gold(vdata) and is_decoder(base):
        task_dir = b.work / "task-base"
        b.stage("task.base", task_dir, {"model": base, "data": vdata}, {}, lambda: task_base(base, vdata, task_dir))
        base_task = read_json(task_dir / "task.json")

    rows = []
    failed_targets = []
    for tc, plan in zip(cfg.targets, plans):
        target = plan.target  # resolved once (build); the stages below get the object, the records its content
        key = target.name
        export_dir = b.work / f"export-{key}"
        calib = plan.calibration
        # adapter = "float": the base + the LoRA as float branches; validated against the merged model all the same
        xmodel, xadapter = (base, adapter) if plan.adapter == "float" else (model, None)
        # a recipe search (profile recipe = "auto") over the merged model may also try the base + this LoRA in float
        lora = None
        if adapter is not None and xadapter is None and not cfg.finetune.model_dump().get("quant_aware"):
            lora = (base, adapter)
        int4 = plan.int4.overrides if plan.int4 else {}
        b.stage(f"export.{key}", export_dir, {"model": xmodel, "calibration": calib, "target": target.model_dump(mode="json", exclude={"source"}),
                                              **({"float_adapter": xadapter} if xadapter else {})},
                {"precision": plan.precision, **({"adapter": "float"} if xadapter else {}), **({"int4": int4} if int4 else {}),
                 **({"side_int8": True} if plan.side_int8 else {}), **({"mixed": plan.mixed} if plan.mixed else {}),
                 **({"pack": True} if plan.pack else {}), **({"recipe": plan.recipe} if plan.recipe else {})},
                lambda: run_export(xmodel, export_dir, plan, xadapter, lora), target=key)

        report_dir = b.work / f"validate-{key}"
        vopts = {k: v for k, v in cfg.validation.model_dump().items() if k not in ("data", "prompts", "reference", "rows", "drop_overlap")}
        vopts["require_device"] = require_device
        reference = {"merged": model, "base": base, "none": None}[cfg.validation.reference]
        vstate = b.stage(f"validate.{key}", report_dir,
                         {"model": export_dir, "reference": reference, "data": vdata, "prompts": prompts,
                          "target": target.model_dump(mode="json", exclude={"source"})}, vopts,
                         lambda: run_validate(export_dir, target, reference, vdata, prompts, report_dir, vopts), target=key)
        report = read_json(report_dir / "report.json") or {}
        passed = bool(report.get("passed")) and vstate.get("status") != "failed"
        vs_float = None
        if float_model is not None:
            # the promise of a quant-aware build: the bundle keeps the target's budgets against the float fine-tune,
            # not only against the model it was trained as (its own merge). Latency is the bundle's, measured above.
            float_dir = b.work / f"validate-float-{key}"
            fopts = {**vopts, "latency": False}
            fstate = b.stage(f"validate-float.{key}", float_dir,
                             {"model": export_dir, "reference": float_model, "data": vdata, "prompts": prompts,
                              "target": target.model_dump(mode="json", exclude={"source"})}, fopts,
                             lambda: run_validate(export_dir, target, float_model, vdata, prompts, float_dir, fopts), target=key)
            vs_float = read_json(float_dir / "report.json") or {}
            vs_float_passed = bool(vs_float.get("passed")) and fstate.get("status") != "failed"
            vs_float = {"report": vs_float, "passed": vs_float_passed, "dir": float_dir}
            passed = passed and vs_float_passed

        final = b.output / key
        rejected = b.output / "rejected" / key
        dest, other = (final, rejected) if passed else (rejected, final)
        # a stale bundle from an earlier run must not stay where it no longer belongs
        for stale in (other, other.with_name(other.name + ".tar.gz")):
            if stale.is_dir():
                artifacts.check_replaceable(stale, what="stale bundle folder")  # never delete what edgetune did not write
                shutil.rmtree(stale)
            elif stale.is_file():
                stale.unlink()
        signed = {"signed_by": b.sign[1], "config_sha256": b.sign[2]} if b.sign else {}  # a new key or config: re-sign
        float_dir = vs_float["dir"] if vs_float else None
        b.stage(f"bundle.{key}", dest, {"model": export_dir, "report": report_dir, **({"vs_float": float_dir} if float_dir else {})},
                {"archive": tc.archive, "name": f"{cfg.name}-{key}", "passed": passed, **signed},
                lambda: run_bundle(export_dir, dest, target, report_dir, tc.archive, f"{cfg.name}-{key}", b.sign, float_dir), target=key)
        manifest = read_json(dest / "manifest.json") or {}
        export_results = (artifacts.read_record(export_dir) or {}).get("results") or {}
        rows.append(summary_row(key, dest, manifest, report, passed, tc.archive, base_task, vs_float,
                                 own={"merged": "the quant-aware model's own fp32 merge", "base": "the fp32 base"}[cfg.validation.reference]
                                 if float_model is not None else None, search=export_results.get("recipe"),
                                 recipe_name=export_results.get("recipe_name")))
        if not passed:
            failed_targets.append(key)

    result = {
        "name": cfg.name,
        "config": str(Path(config)),
        "output": str(b.output),
        "passed": not failed_targets,
        "signed_by": b.sign[1] if b.sign else None,
        "targets": rows,
        "validation_data": held_out_info,
        "task": task_summary(base_task, rows),
        "stages": [s.__dict__ for s in b.stages],
        "skipped_all": all(s.status in ("skipped", "reused") for s in b.stages if s.stage != "materialize"),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    artifacts.write_json(b.output / "build-summary.json", result)
    if failed_targets:
        raise CheckFailed(f"{len(failed_targets)} target(s) missed their budgets: {', '.join(failed_targets)} "
                          f"(bundles kept for inspection in {b.output / 'rejected'})", result=result)
    return result
