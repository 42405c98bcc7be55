"""`edgetune build`: the whole pipeline from one TOML file, incremental and resumable.

Stages: materialize -> finetune -> merge -> export (per target) -> validate (per target)
-> bundle (per target). Each stage writes its folder under ``<output>/.work/`` atomically
(``artifacts.stage_output``) and the build keeps, per stage, a small state file with the
stage's fingerprint (content hashes of its inputs + its options) and the signature of the
output it made. A stage whose fingerprint and output are unchanged is skipped; an
interrupted build re-runs only the stages that did not finish (fine-tuning also resumes
from its last checkpoint).

Bundles land in ``<output>/<target>/`` (+ ``<target>.tar.gz``) only when validation
passed. A bundle that misses a budget is still written, to ``<output>/rejected/<target>/``,
so it can be inspected and run, but never where a deploy script picks bundles up; the
build then exits 1 after printing the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import artifacts, console
# the config's schema and checks (re-exported: `edgetune.build.load_config` is the documented entry)
from .build_config import (STATE_DIR, BuildConfig, DataCfg, FinetuneCfg, Int4Cfg, ModelCfg, TargetCfg,  # noqa: F401
                           ValidateCfg, _under, float_finetune_options, load_config, unknown_keys)
from .errors import BadInput, CheckFailed

def _plan(config, i: int, t: TargetCfg, target, calibration: Path | None):
    """A target's export plan, decided once before any work and handed to the export. Its ``int4`` overrides
    apply only to an int4 decoder export and are checked here, once: the export reuses the checked options."""
    from .plan import ExportPlan, Int4Plan

    plan = ExportPlan(target, t.precision, Int4Plan(target, t.int4_options()) if t.int4 else None, t.adapter, calibration)
    if plan.int4 is not None:
        if plan.llm_precision != "int4":
            raise BadInput(f"{config}: targets[{i}].int4 is set but the target exports at {plan.llm_precision}",
                           hint="set precision = \"int4\" for that target, or drop its int4 table")
        try:
            plan.int4.options  # computed (and checked) now; the export reads the same Int4Plan
        except BadInput as exc:
            raise BadInput(f"{config}: targets[{i}].int4: {exc.message}", hint=exc.hint) from None
    return plan


@dataclass
class StageInfo:
    stage: str
    target: str | None
    status: str  # ran | skipped | reused (copied from the stage cache, made by another build) | failed
    seconds: float
    out: str


@dataclass
class Build:
    cfg: BuildConfig
    root: Path
    force: bool = False
    output_override: Path | None = None
    stages: list[StageInfo] = field(default_factory=list)
    sign: tuple[Any, str, str] | None = None  # [bundle] sign: (private key, its fingerprint, the config's SHA-256)

    @property
    def output(self) -> Path:
        return self.output_override or self.path(self.cfg.output)

    @property
    def work(self) -> Path:
        return self.output / ".work"

    def path(self, value: str) -> Path:
        return _under(self.root, value)

    def maybe_path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = self.path(value)
        if not p.exists():
            raise BadInput(f"{value} not found (resolved to {p})", hint="paths in a build config are relative to the config file")
        return p

    # -- the incremental stage runner -------------------------------------------------
    def stage(self, sid: str, out: Path, inputs: dict[str, Any], options: dict[str, Any], body: Callable[[], Any],
              *, target: str | None = None, shared: str | None = None) -> dict[str, Any]:
        """Run ``body`` unless the state says ``out`` was made from the same inputs and options.

        ``shared`` (a stage kind, e.g. "finetune"): the output is also kept in ``$EDGETUNE_CACHE/stages/`` under a
        key of that kind, the inputs' content and the options, and taken from there when another build (another
        output folder) made it: a quant-aware build's float fine-tune is the plain LoRA build's "finetune"."""
        hashes = artifacts.input_hashes(inputs)
        fp = artifacts.fingerprint(sid, hashes, options)
        state_file = self.work / STATE_DIR / f"{sid}.json"
        state = _read_json(state_file)
        t0 = time.perf_counter()
        label = f"{sid}"
        kept = _shared_dir(shared, hashes, options) if shared else None
        if not self.force and state and state.get("fingerprint") == fp and _signature(out) == state.get("output"):
            if kept is not None and state.get("status") == "ran" and _signature(kept) is None:
                _copy_folder(out, kept)  # made before the stage cache was: kept now, for the other builds
            self.stages.append(StageInfo(sid.split(".")[0], target, "skipped", round(time.perf_counter() - t0, 2), str(out)))
            console.log(f"[{label}] up to date, skipped")
            return state
        status, error = "ran", None
        if kept is not None and not self.force and _signature(kept) is not None and _copy_folder(kept, out):
            status = "reused"
            console.log(f"[{label}] reused from the stage cache ({kept})")
        else:
            with console.step(label):
                try:
                    with console.results_only_stdout():  # stdout carries only the result (--json); libraries print there
                        body()
                except CheckFailed as exc:  # the stage wrote its output (a report) and then failed a gate
                    status, error = "failed", exc.one_line()
            if kept is not None and status == "ran":
                _copy_folder(out, kept)  # best effort: a cache that cannot be written costs the next build time only
        state = {"fingerprint": fp, "output": _signature(out), "status": status, "error": error}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(state_file, state)
        self.stages.append(StageInfo(sid.split(".")[0], target, status, round(time.perf_counter() - t0, 2), str(out)))
        return state


def _shared_dir(kind: str, hashes: dict[str, str], options: dict[str, Any]) -> Path:
    from .models import cache_root

    return cache_root() / "stages" / artifacts.fingerprint(kind, hashes, options)[:32]


def _copy_folder(src: Path, dest: Path) -> bool:
    """Copy the folder ``src`` to ``dest`` through a temp folder and a rename (a stage output, or the stage
    cache's copy of one); ``dest`` replaced only when edgetune wrote it. False when it could not be done."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.copy")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            artifacts.check_replaceable(dest, what="stage output")
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        console.log(f"[stage cache] {src} -> {dest} not copied ({exc.strerror or exc})")
        return False
    return True


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _signature(out: Path) -> str | None:
    """What identifies the output a stage made: its record or manifest (+ archive), cheap to read."""
    parts = []
    for name in (artifacts.RECORD_NAME, "manifest.json", "signature.json", "report.json"):
        f = out / name
        if f.is_file():
            parts.append(artifacts.sha256_file(f))
    arc = out.with_name(out.name + ".tar.gz")
    if (out / "manifest.json").is_file() and arc.is_file():
        parts.append(artifacts.sha256_file(arc))
    return artifacts.sha256_bytes("|".join(parts).encode()) if parts else None


# -- stage bodies: the real stage functions ----------------------------------------------------

def _finetune(base: Path, data: Path, out: Path, options: dict[str, Any]) -> None:
    from .finetune import FinetuneOptions, finetune, work_dir

    opts = FinetuneOptions.from_dict(options)
    if (work_dir(out) / "spec.json").is_file():
        try:  # an interrupted run: continue from its last checkpoint
            finetune(base, data, out, options=opts, resume=True)
            return
        except BadInput:
            console.log("[finetune] the interrupted run had other inputs; starting over")
    finetune(base, data, out, options=opts)


def _merge(base: Path, adapter: Path, out: Path) -> None:
    from .merge import merge

    merge(base, adapter, out)


def _export(model: Path, out: Path, plan, float_adapter: Path | None = None) -> None:
    from .export import export

    opts: dict[str, Any] = {"calibration": plan.calibration} if plan.calibration else {}
    if float_adapter:
        opts["float_adapter"] = float_adapter
    if plan.int4:
        opts["int4"] = plan.int4  # checked by _plan: the export uses those options, it does not check them again
    export(model, out, target=plan.target, precision=plan.precision, **opts)


# -- the orchestrator -------------------------------------------------------------------------

def _held_out(b: "Build", vdata: Path, train: Path | None) -> tuple[Path, dict[str, Any]]:
    """The validation data actually used: ``[validate] rows`` selected, never overlapping the
    training examples the fine-tune saw (same input after folding case and whitespace).

    Overlap is refused (BadInput, exit 2) unless ``drop_overlap`` splits it off explicitly.
    When rows are selected or examples dropped, the result is written to ``.work/validate-data.jsonl``.
    """
    from .data import content_key, load_dataset, parse_rows, write_jsonl

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


def _task_base(base: Path, data: Path, out: Path) -> None:
    """Greedy answers of the base model to the task data (one batched PyTorch pass) and their scores."""
    from .data import load_dataset, task_examples
    from .device.metrics import task_scores
    from .reference import task_answers

    examples = task_examples(load_dataset(data))
    with artifacts.stage_output(out, "task-base", inputs={"model": base, "data": data}, options={}) as run:
        got = task_answers(base, examples)
        sc = task_scores([e["gold"] for e in examples], got["answers"])
        sc.pop("correct")
        artifacts.write_json(run.dir / "task.json", {**sc, "answers": got["answers"], "computed_with": got["computed_with"]})
        run.results.update({k: v for k, v in sc.items() if isinstance(v, (int, float, str))})


def build(config: str | os.PathLike, *, force: bool = False, output: str | os.PathLike | None = None,
          require_device: bool | None = None) -> dict[str, Any]:
    """Run the build described by ``config``; returns the summary (raises CheckFailed after
    writing everything when a target missed its budgets).

    ``require_device`` (default: ``[validate] require_device``, false): a target whose execution
    provider this machine lacks is fatal (exit 3) instead of a cross-build (accuracy on the CPU
    provider with the same graph, latency "not measured")."""
    from .models import materialize

    cfg, root = load_config(config)
    b = Build(cfg, root, force=force, output_override=Path(output).resolve() if output else None)
    if cfg.bundle.sign:  # the key is read before any work: a missing or unreadable key fails at once
        from .signing import file_mode_warning, fingerprint, load_private_key

        key = load_private_key(b.path(cfg.bundle.sign))
        b.sign = (key, fingerprint(key.public_key()), artifacts.sha256_file(config))
        if (warning := file_mode_warning(b.path(cfg.bundle.sign))):
            console.log(f"warning: {warning}")
    # fail before any work: profiles, paths, int4 overrides. Each target is resolved here, once, and its
    # Target and export plan are what the stages get.
    plans = [_plan(config, i, t, cfg.profile(t, root), b.maybe_path(t.calibration)) for i, t in enumerate(cfg.targets)]
    train = b.maybe_path(cfg.data.train)
    vdata = b.maybe_path(cfg.validation.data)
    prompts = b.maybe_path(cfg.validation.prompts)
    from .models import resolve

    resolve(str(b.path(cfg.model.base)) if b.path(cfg.model.base).exists() else cfg.model.base)  # alias or path exists
    # one build at a time per output folder: a second one (say fp32 while int4 runs) fails fast (exit 2)
    # instead of validating and bundling the other one's export
    with artifacts.output_lock(b.output, what="build output"):
        return _build(b, cfg, config, plans, train, vdata, prompts, materialize, require_device)


def _build(b: Build, cfg: BuildConfig, config, plans: list, train, vdata, prompts, materialize,
           require_device: bool | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    b.work.mkdir(parents=True, exist_ok=True)
    from .cleanup import sweep_work

    for folder in (b.work, b.work / STATE_DIR):  # what a killed build left, even beside stages this run skips
        sweep_work(folder)
    held_out = None
    if vdata is not None:
        vdata, held_out = _held_out(b, vdata, train)
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
        from .llm.proof import check_runtime_shapes

        check_runtime_shapes(info.config, str(info.path))
        from .plan import check_llm_precision

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
        from .data import load_dataset
        from .finetune.train import check_model_and_data

        # the model against the data, before the first training step (a base model given chat data, ...)
        extra = cfg.finetune.model_extra or {}
        check_model_and_data(extra.get("task", "auto"), load_dataset(train, limit=extra.get("limit")), info)
        from .finetune.memory import check_fits
        from .finetune.options import FinetuneOptions

        check_fits(Path(info.path), info.config, FinetuneOptions.from_dict(cfg.finetune.model_dump()))
        ft_opts = cfg.finetune.model_dump()
        ft_inputs: dict[str, Any] = {"model": base, "data": train}
        run_opts = ft_opts
        if ft_opts.get("quant_aware"):
            # the float fine-tune (same base, data and LoRA settings, no quant_aware): the model the user would
            # otherwise ship. Every bundle is validated against it too, and it is the distillation's teacher
            # by default. Kept in the stage cache: a plain LoRA build of the same settings shares it.
            float_adapter, float_model = b.work / "adapter-float", b.work / "merged-float"
            f_opts = float_finetune_options(ft_opts)
            b.stage("finetune-float", float_adapter, {"model": base, "data": train}, f_opts,
                    lambda: _finetune(base, train, float_adapter, f_opts), shared="finetune")
            b.stage("merge-float", float_model, {"base": base, "adapter": float_adapter}, {},
                    lambda: _merge(base, float_adapter, float_model))
            if ft_opts.get("quant_aware_distill"):
                teacher = ft_opts.get("quant_aware_teacher") or "finetune"
                ft_opts = {**ft_opts, "quant_aware_teacher": teacher}
                run_opts = {**ft_opts, "quant_aware_teacher": str(float_model) if teacher == "finetune" else None}
                if teacher == "finetune":
                    ft_inputs["teacher"] = float_model  # by content: the fingerprint does not depend on the folder's path
        adapter = b.work / "adapter"
        b.stage("finetune", adapter, ft_inputs, ft_opts, lambda: _finetune(base, train, adapter, run_opts),
                shared=None if ft_opts.get("quant_aware") else "finetune")
        merged = b.work / "merged"
        b.stage("merge", merged, {"base": base, "adapter": adapter}, {}, lambda: _merge(base, adapter, merged))
        model = merged

    # task accuracy of the base model (the "before" of the summary): one greedy pass on the host
    base_task = None
    if vdata is not None and cfg.finetune.method != "none" and _has_gold(vdata) and _is_decoder(base):
        task_dir = b.work / "task-base"
        b.stage("task.base", task_dir, {"model": base, "data": vdata}, {}, lambda: _task_base(base, vdata, task_dir))
        base_task = _read_json(task_dir / "task.json")

    rows = []
    failed_targets = []
    for tc, plan in zip(cfg.targets, plans):
        target = plan.target  # resolved once (build); the stages below get the object, the records its content
        key = target.name
        export_dir = b.work / f"export-{key}"
        calib = plan.calibration
        # adapter = "float": the base + the LoRA as float branches; validated against the merged model all the same
        xmodel, xadapter = (base, adapter) if plan.adapter == "float" else (model, None)
        int4 = plan.int4.overrides if plan.int4 else {}
        b.stage(f"export.{key}", export_dir, {"model": xmodel, "calibration": calib, "target": target.model_dump(mode="json", exclude={"source"}),
                                              **({"float_adapter": xadapter} if xadapter else {})},
                {"precision": plan.precision, **({"adapter": "float"} if xadapter else {}), **({"int4": int4} if int4 else {})},
                lambda: _export(xmodel, export_dir, plan, xadapter), target=key)

        report_dir = b.work / f"validate-{key}"
        vopts = {k: v for k, v in cfg.validation.model_dump().items() if k not in ("data", "prompts", "reference", "rows", "drop_overlap")}
        vopts["require_device"] = require_device
        reference = {"merged": model, "base": base, "none": None}[cfg.validation.reference]
        vstate = b.stage(f"validate.{key}", report_dir,
                         {"model": export_dir, "reference": reference, "data": vdata, "prompts": prompts,
                          "target": target.model_dump(mode="json", exclude={"source"})}, vopts,
                         lambda: _validate(export_dir, target, reference, vdata, prompts, report_dir, vopts), target=key)
        report = _read_json(report_dir / "report.json") or {}
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
                             lambda: _validate(export_dir, target, float_model, vdata, prompts, float_dir, fopts), target=key)
            vs_float = _read_json(float_dir / "report.json") or {}
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
                lambda: _bundle(export_dir, dest, target, report_dir, tc.archive, f"{cfg.name}-{key}", b.sign, float_dir), target=key)
        manifest = _read_json(dest / "manifest.json") or {}
        rows.append(_summary_row(key, dest, manifest, report, passed, tc.archive, base_task, vs_float,
                                 own={"merged": "the quant-aware model's own fp32 merge", "base": "the fp32 base"}[cfg.validation.reference]
                                 if float_model is not None else None))
        if not passed:
            failed_targets.append(key)

    result = {
        "name": cfg.name,
        "config": str(Path(config)),
        "output": str(b.output),
        "passed": not failed_targets,
        "signed_by": b.sign[1] if b.sign else None,
        "targets": rows,
        "validation_data": held_out,
        "task": _task_summary(base_task, rows),
        "stages": [s.__dict__ for s in b.stages],
        "skipped_all": all(s.status in ("skipped", "reused") for s in b.stages if s.stage != "materialize"),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    artifacts.write_json(b.output / "build-summary.json", result)
    if failed_targets:
        raise CheckFailed(f"{len(failed_targets)} target(s) missed their budgets: {', '.join(failed_targets)} "
                          f"(bundles kept for inspection in {b.output / 'rejected'})", result=result)
    return result


def _validate(export_dir: Path, target, reference: Path | None, data: Path | None, prompts: Path | None, out: Path, vopts: dict) -> None:
    from .validate import validate

    validate(export_dir, target=target, reference=reference, data=data, out=out, prompts=prompts, **vopts)


def _bundle(export_dir: Path, dest: Path, target, report_dir: Path, archive: bool, name: str, sign=None,
            float_report: Path | None = None) -> None:
    from .bundle import archive_path, make_bundle

    arc = archive_path(dest)
    if arc.exists() and not archive:
        arc.unlink()
    make_bundle(export_dir, dest, target=target, report=report_dir if (report_dir / "report.json").is_file() else None,
                archive=archive, name=name, sign=sign[0] if sign else None, build_config_sha256=sign[2] if sign else None,
                float_report=float_report if float_report is not None and (report_dir / "report.json").is_file() else None)


def _has_gold(data: Path) -> bool:
    from .data import load_dataset, task_examples

    return bool(task_examples(load_dataset(data)))


def _is_decoder(model: Path) -> bool:
    from .models import inspect

    try:
        return inspect(model).kind == "decoder"
    except BadInput:
        return False


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _task_summary(base_task: dict | None, rows: list[dict]) -> dict | None:
    """Task accuracy base -> fine-tuned -> each bundle (percent, the primary metric)."""
    firsts = [r["task_figures"] for r in rows if r.get("task_figures")]
    if not firsts and not base_task:
        return None
    metric = (firsts[0]["metric"] if firsts else base_task.get("metric"))
    return {"metric": metric,
            "base": base_task.get(metric) if base_task else None,
            "finetuned": next((t["finetuned"] for t in firsts if t.get("finetuned") is not None), None),
            "bundles": {r["target"]: r["task_figures"]["bundle"] for r in rows if r.get("task_figures")}}


FLOAT_REFERENCE = "the float fine-tune's fp32 merge (same base, data and LoRA settings, without quant_aware)"


def _accuracy_text(acc: dict) -> str | None:
    for k, fmt in (("perplexity_increase_pct", "ppl {:+.2f}%"), ("accuracy_drop", "acc drop {:.3f}"), ("top1_agreement", "top1 {:.3f}")):
        if acc.get(k) is not None:
            return fmt.format(acc[k])
    return None


def _vs_float_row(vs_float: dict) -> dict[str, Any]:
    """A bundle's figures against the float fine-tune (a quant-aware build): what the summary and its table show."""
    rep = vs_float["report"]
    acc = {k: v for k, v in (rep.get("accuracy") or {}).items() if isinstance(v, (int, float))}
    task = rep.get("task") or {}
    metric = task.get("metric")
    tfig = {"metric": metric, "float_finetune": (task.get("reference") or {}).get(metric), "bundle": (task.get("model") or {}).get(metric),
            "drop": task.get("drop")} if metric else None
    text = ", ".join(x for x in (_accuracy_text(acc), f"top1 {acc['top1_agreement']:.3f}" if "top1_agreement" in acc else None,
                                  f"task {_pct(tfig['bundle'])} of {_pct(tfig['float_finetune'])}" if tfig else None) if x)
    failed = list(rep.get("failed") or ([] if vs_float["passed"] else ["validation"]))
    text = f"{text}: {'pass' if vs_float['passed'] else 'FAIL ' + ','.join(failed)}"
    return {"reference": FLOAT_REFERENCE, "passed": vs_float["passed"], "failed": failed, "accuracy_figures": acc,
            "task_figures": tfig, "report": str(vs_float["dir"] / "report.json"), "text": text}


def _summary_row(key: str, dest: Path, manifest: dict, report: dict, passed: bool, archive: bool,
                 base_task: dict | None = None, vs_float: dict | None = None, own: str | None = None) -> dict[str, Any]:
    figs = manifest.get("figures") or {}
    acc = report.get("accuracy") or {}
    lat = report.get("latency") or {}
    dev = report.get("device") or {}
    task = report.get("task") or {}
    metric = task.get("metric")
    tfig = None
    if metric and report.get("model", {}).get("kind") == "decoder":
        tfig = {"metric": metric, "base": base_task.get(metric) if base_task else None,
                "finetuned": (task.get("reference") or {}).get(metric), "bundle": (task.get("model") or {}).get(metric),
                "drop": task.get("drop"), "exact_match": (task.get("model") or {}).get("exact_match"),
                "valid_format": (task.get("model") or {}).get("valid_format")}
    elif metric:  # encoders: the fine-tuned fp32 reference and the bundle
        tfig = {"metric": metric, "base": None, "finetuned": (task.get("reference") or {}).get(metric),
                "bundle": (task.get("model") or {}).get(metric), "drop": task.get("drop")}

    def p50(k):
        v = lat.get(k)
        return v.get("p50") if isinstance(v, dict) else None

    accuracy = _accuracy_text(acc)
    latency = None
    if p50("decode_tokens_per_s") is not None:
        latency = f"{p50('decode_tokens_per_s'):.1f} tok/s"
        if p50("time_to_first_token_ms") is not None:
            latency += f", ttft {p50('time_to_first_token_ms'):.0f} ms"
    elif isinstance(lat.get("latency_ms"), dict):
        latency = f"p50 {lat['latency_ms'].get('p50'):.2f} ms"
    if dev and not dev.get("available", True):
        latency = f"not measured (no {dev.get('execution_provider')} here)"
    failed = list(report.get("failed") or [])
    vs = _vs_float_row(vs_float) if vs_float is not None else None
    if vs is not None and not vs["passed"]:
        failed += [f"{f} vs float fine-tune" for f in vs["failed"]]
    if not passed and not failed:
        failed = ["validation"]
    row = {
        "target": key,
        "precision": manifest.get("precision"),
        "size_mb": round(figs["size_mb"], 2) if isinstance(figs.get("size_mb"), (int, float)) else None,
        "accuracy": accuracy,
        "latency": latency,
        "result": "pass" if passed else "FAIL: " + ",".join(failed),
        "bundle": str(dest),
        "archive": str(dest.with_name(dest.name + ".tar.gz")) if archive else None,
        "base": _pct(tfig["base"]) if tfig else None,
        "fine-tuned": _pct(tfig["finetuned"]) if tfig else None,
        "task": _pct(tfig["bundle"]) if tfig else None,
        "task_metric": metric,
        "accuracy_figures": {k: v for k, v in acc.items() if isinstance(v, (int, float))},
        "task_figures": tfig,
        "device": dev or None,
        "latency_figures": {"decode_tokens_per_s_p50": p50("decode_tokens_per_s"), "time_to_first_token_ms_p50": p50("time_to_first_token_ms"),
                            "latency_ms_p50": (lat.get("latency_ms") or {}).get("p50") if isinstance(lat.get("latency_ms"), dict) else None},
    }
    if vs is not None:  # a quant-aware build: the figures above are against `reference`, these against the float fine-tune
        row["reference"] = own
        row["vs float FT"] = vs.pop("text")
        row["vs_float_finetune"] = vs
    return row


def summary_text(result: dict[str, Any]) -> str:
    ran = [s for s in result["stages"] if s["status"] == "ran" and s["stage"] != "materialize"]
    skipped = [s for s in result["stages"] if s["status"] in ("skipped", "reused")]
    head = f"build {result['name']}: {len(ran)} stage(s) ran, {len(skipped)} skipped, {result['seconds']:.1f}s"
    cols = ["target", "precision", "size_mb"]
    if any(r.get("task") for r in result["targets"]):
        cols += ["base", "fine-tuned", "task"]  # task accuracy (exact match or token F1, %): base -> fine-tuned -> bundle
    qat = any(r.get("vs_float_finetune") for r in result["targets"])
    table = console.table(result["targets"], cols + ["accuracy"] + (["vs float FT"] if qat else []) + ["latency", "result", "bundle"])
    t = result.get("task") or {}
    note = f"\ntask accuracy = {t['metric']} on the held-out [validate] data (base -> fine-tuned fp32 -> bundle)" if t else ""
    if qat:
        own = next(r.get("reference") for r in result["targets"] if r.get("vs_float_finetune"))
        note += (f"\nfine-tuned, task, accuracy: against {own}; vs float FT: the same bundle against {FLOAT_REFERENCE}, "
                 "the same budgets (latency measured once); a bundle passes only if it keeps both")
    return f"{head}\n{table}{note}"


__all__ = ["BuildConfig", "load_config", "build", "summary_text"]
