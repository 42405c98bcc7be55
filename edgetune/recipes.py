"""Recipes: an export as the profile says, or the automatic recipe search (try int4/int8 recipes, validate each
against the target's budgets, keep the fastest that passes). The search composes two stages, export and validate,
so it sits above both (as `build` does): the export package never imports validate.

:func:`export_with_recipe` is what `edgetune export` and `edgetune build` call: the recipe asked for (``--recipe``),
else the profile's ``[quantization] recipe`` when nothing else was asked; ``profile`` is the plain
:func:`edgetune.export.export`.

``auto_export(model_dir, out, target=...)`` (CLI ``edgetune export --recipe auto``; the build default
for a profile with ``[quantization] recipe = "auto"``):

1. Each candidate of :data:`edgetune.quant.RECIPE_CANDIDATES` (data: add a dict to extend) is exported with
   :func:`edgetune.export.decoder.dispatch.export_llm` into a work folder next to ``out``
   (``.<out>.recipes/<name>``); mixed-precision candidates reuse one sensitivity measurement
   (:mod:`edgetune.export.decoder.mixed`) made on the first export of the same algorithm.
2. On CPU targets whose profile accuracy_level is not 4, a **level-4 twin** of each candidate is
   made by rewriting the MatMulNBits accuracy_level attribute (the weights are the same; only the
   compute type changes), so validation decides whether int8 activations are good enough on this
   model (onnxruntime #29849), never a silent default. Zero points included: onnxruntime #29853 (MLAS's AVX2
   M=1 CompInt8 kernel wrong for them in a direct MLAS test) does not show through MatMulNBits in onnxruntime 1.32 on
   an emulated AVX2-only CPU (tests/test_avx2_emulation.py).
3. Each one is validated with :func:`edgetune.validate.validate` (perplexity, KL, top-1, generation
   agreement, task metrics if the validator reports them, size, latency and decode tok/s) against the
   target's budgets, on the eval data (default: the calibration texts) vs the PyTorch reference
   (computed once, then its stored pack is reused).
   The ``float_adapter`` candidates (the base's own GGUF blocks + the LoRA as float side branches: the fine-tune kept
   exactly) are tried when the search is given the base and the adapter of the merged model (``lora``; the build
   does), exported from the base with the adapter and validated against the merged model like the others.
4. The passing candidate with the highest measured decode tok/s wins; it is exported again into
   ``out`` when it is a twin (so its record is its own), else moved there. The record's
   ``results.recipe`` holds the search table. Nothing passes -> CheckFailed (exit 1) with the table;
   ``out`` is not written. The work folder is removed either way.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from . import artifacts, console
from .errors import BadInput, CheckFailed, EdgetuneError, UnloadableGraph
from .quant import INT4_ALGORITHMS
from .quant import NAMED_RECIPES, SEARCH_FLAGS
from .quant import RECIPE_CANDIDATES as CANDIDATES  # (data: the profile checks names against it)
from .plan import export_recipe
from .targets import resolve

TABLE_KEYS = ("size_mb", "perplexity_increase_pct", "kl_divergence", "top1_agreement", "generation_agreement",
              "task_accuracy", "decode_tokens_per_s")


def _measured(mixed) -> bool:
    """A mixed request whose layers come from a sensitivity measurement (a fraction or a count)."""
    return bool(mixed) and "layers" not in mixed and "modules" not in mixed


def _export_call(cand: dict[str, Any], alg: str, model_dir: Path, calibration: Path, lora, sens_by_alg: dict):
    """``(source, export_llm options)`` of a candidate (its int4 options and precision aside), None for a float-adapter
    candidate without a LoRA. A measured mixed candidate reuses the algorithm's sensitivity when there is one."""
    if cand.get("float_adapter"):
        return None if lora is None else _float_adapter_source(cand, lora)
    kw: dict[str, Any] = {}
    mixed = copy.deepcopy(cand.get("mixed"))
    if _measured(mixed):
        if alg in sens_by_alg:
            from .export.decoder.mixed import choose

            sens = sens_by_alg[alg]
            mixed = {"layers": choose(sens["ranking"], count=mixed.get("count"), fraction=mixed.get("fraction")), "sensitivity": sens}
        else:
            kw["calibration"] = calibration
    if cand.get("precision", "int4") == "int4" and INT4_ALGORITHMS[alg].calibrated:
        kw["calibration"] = calibration
    if mixed:
        kw["mixed"] = mixed
    if cand.get("pack"):
        kw["pack"] = True
    return model_dir, kw


def graph_difference(a: Path, b: Path) -> str | None:
    """What differs between two exports' graphs when accuracy_level is not counted (None: nothing): the nodes,
    inline tensors and external-data layout of ``model.onnx``, and the bytes of every other weight file."""
    from . import onnx_graph

    def graph(folder: Path) -> list:
        g = onnx_graph.read(folder / "model.onnx").graph
        nodes = [(n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output),
                  sorted(a.SerializeToString() for a in n.attribute if not (n.op_type == "MatMulNBits" and a.name == "accuracy_level")))
                 for n in g.node]
        return [nodes] + [[x.SerializeToString() for x in getattr(g, f)] for f in ("initializer", "input", "output", "value_info")]

    def weights(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith((".data", ".onnx_data", ".bin")))

    if graph(a) != graph(b):
        return "model.onnx's nodes or tensors"
    if weights(a) != weights(b):
        return f"weight files {weights(a)} vs {weights(b)}"
    return next((f"{n}'s bytes" for n in weights(a) if artifacts.sha256_file(a / n) != artifacts.sha256_file(b / n)), None)


def _float_adapter_source(cand: dict[str, Any], lora: tuple) -> tuple[Path, dict[str, Any]]:
    """A ``float_adapter`` candidate's export input and options: the base, its LoRA as float side branches, the fusion."""
    return Path(lora[0]), {"float_adapter": Path(lora[1]), "fuse": cand.get("fuse", True)}


def export_with_recipe(model, out, *, target, precision=None, **options) -> Path:
    """:func:`edgetune.export.export`, or for a decoder the automatic recipe search when ``recipe="auto"`` is asked or,
    with no precision, int4, adapter or mixed option given, when the profile's ``[quantization] recipe`` is auto.
    ``data``, ``candidates``, ``validate_options``, ``time_budget_s`` (default: the profile's ``recipe_candidates`` and
    ``recipe_time_budget_s``) and ``lora_search`` ((base, adapter) of a merged ``model``: the
    float-adapter candidates) are the search's."""
    from .export import export
    from .model_input import inspect, materialize

    lora_search = options.pop("lora_search", None)
    folder = Path(model) if Path(model).is_dir() else Path(materialize(model).path)
    info = inspect(folder)
    if info.kind != "decoder":
        return export(folder, out, target=target, precision=precision, **options)  # refuses recipe options itself
    target = resolve(target)  # once, for the recipe and the export
    asked = options.get("recipe") is not None
    recipe = export_recipe(target, options.pop("recipe", None), precision,
                           options_given=any(options.get(k) for k in ("int4", "adapters", "mixed", "pack", "float_adapter")))
    if recipe in NAMED_RECIPES:
        if search_only := [flag for k, flag in SEARCH_FLAGS.items() if k in options]:
            raise BadInput(f"{', '.join(search_only)} only apply to --recipe auto", hint="add --recipe auto")
        return export_named(folder, out, target=target, name=recipe, asked=asked, precision=precision, **options)
    if recipe not in ("profile", "auto"):
        raise BadInput(f"unknown recipe '{recipe}'", hint=f"use profile, auto or a candidate: {', '.join(NAMED_RECIPES)}")
    if recipe != "auto":
        return export(folder, out, target=target, precision=precision, recipe=recipe, **options)
    from .export.decoder.proof import check_runtime_shapes

    check_runtime_shapes(info.config, str(folder))  # before the first candidate's export
    options.pop("task", None)
    search = {k: options.pop(k) for k in ("data", "candidates", "validate_options", "time_budget_s") if k in options}
    search.setdefault("candidates", target.quantization.recipe_candidates)
    search.setdefault("time_budget_s", target.quantization.recipe_time_budget_s)
    if precision is not None or {k for k in options if k != "calibration"}:
        raise BadInput("--recipe auto chooses precision and int4 options itself",
                       hint="drop --precision/--int4-*/--mixed-8bit/--adapter, or use --recipe profile")
    return auto_export(folder, out, target=target, lora=lora_search, **options, **search)


def export_named(folder: Path, out, *, target, name: str, asked: bool, precision=None, **options) -> Path:
    """One candidate recipe by name (``--recipe NAME``, a build target's ``recipe``, a profile's ``[quantization] recipe``):
    exported as the search exports it (its precision, int4 options over the profile's, mixed layers, packing; the
    calibration given, else the generic set), validated by whoever calls (``edgetune build`` does), not searched. From a
    profile (``asked`` False) a GGUF not fine-tuned keeps its own weights: the exact transcode stays its default."""
    from .export import export
    from .export.decoder.gguf_export import gguf_source

    if not asked:
        try:
            if gguf_source(folder) is not None:
                return export(folder, out, target=target, **options)
        except BadInput:
            pass  # its GGUF moved: the export says so and uses the profile's precision
    flag = {"int4": "--int4-*", "mixed": "--mixed-8bit", "pack": "--pack-siblings", "adapters": "--adapter", "fuse": "--no-fuse/--side-int8",
            "float_adapter": "--float-adapter"}
    extra = sorted(k for k in options if k not in ("calibration", "task"))
    if precision is not None or extra:
        flags = ["--precision"] * (precision is not None) + [flag.get(k, f"--{k.replace('_', '-')}") for k in extra]
        raise BadInput(f"--recipe {name} sets the precision and quantization options itself; {', '.join(flags)} given too",
                       hint=f"drop {', '.join(flags)}, or use --recipe profile with your own options")
    cand = next(copy.deepcopy(c) for c in CANDIDATES if c["name"] == name)
    int4 = dict(cand.get("int4") or {})
    note = None
    if int4.get("smooth_8bit") and not asked:  # the profile's default: a layout the folds do not know loses only them
        from .export.decoder.smooth import supported

        if not supported(folder):
            int4["smooth_8bit"] = False
            note = "without --smooth-8bit: its folds do not know this model's layer layout"
            console.warn(f"recipe {name} {note}")
    _, kw = _export_call(cand, int4.get("algorithm", target.quantization.int4.algorithm), folder, options.get("calibration"), None, {})
    out = export(folder, out, target=target, precision=cand.get("precision"), int4=int4, **kw)
    record = artifacts.read_record(out)
    record["results"]["recipe_name"] = name  # which named recipe made it (the options above are in the record already)
    if note:
        record["results"]["recipe_note"] = note
    artifacts.write_json(Path(out) / artifacts.RECORD_NAME, record)
    return out


def candidate_list(names=None) -> list[dict[str, Any]]:
    """The candidates by name (or as dicts), in the given order; None = all of :data:`CANDIDATES`."""
    if names is None:
        return [copy.deepcopy(c) for c in CANDIDATES]
    by_name = {c["name"]: c for c in CANDIDATES}
    out = []
    for n in names:
        if isinstance(n, dict):
            if "name" not in n:
                raise BadInput("a recipe candidate needs a name", hint="e.g. {'name': 'mine', 'precision': 'int4', 'int4': {...}}")
            out.append(copy.deepcopy(n))
        elif n in by_name:
            out.append(copy.deepcopy(by_name[n]))
        else:
            raise BadInput(f"unknown recipe candidate '{n}'", hint=f"choose from {', '.join(by_name)}")
    if not out:
        raise BadInput("no recipe candidates given", hint=f"choose from {', '.join(by_name)}")
    return out


def _level4_runs(t) -> bool:
    """Whether a candidate made at accuracy_level 4 (int8 activations) may run on the target: the CPU's kernels. With
    zero points too, AVX2 included (tests/test_avx2_emulation.py: onnxruntime #29853 does not show through MatMulNBits)."""
    return t.runtime.execution_provider == "cpu"


def _level4_twin_ok(cand: dict, t, rec: dict) -> bool:
    if t.runtime.execution_provider != "cpu" or cand.get("precision") == "int8":
        return False
    # the builder's exports list every node's kernel path; a GGUF transcode (and a float adapter over it) its node groups
    body = [p for p in (rec.get("kernel_paths") or {}).get("nodes", []) or rec.get("matmulnbits") or [] if p["bits"] == 4]
    if not body or all(p["accuracy_level"] == 4 for p in body):
        return False
    return _level4_runs(t)


def _row(name: str, report: dict | None, rec: dict | None, error: str | None = None, failed: list[str] | None = None) -> dict[str, Any]:
    acc = (report or {}).get("accuracy") or {}
    lat = (report or {}).get("latency") or {}
    tps = (lat.get("decode_tokens_per_s") or {}).get("p50")
    row = {"recipe": name, "size_mb": (rec or {}).get("size_mb") or (report or {}).get("model", {}).get("size_mb"),
           "perplexity_increase_pct": acc.get("perplexity_increase_pct"), "kl_divergence": acc.get("kl_divergence"),
           "top1_agreement": acc.get("top1_agreement"), "generation_agreement": acc.get("generation_agreement"),
           "task_accuracy": acc.get("task_accuracy"), "task_accuracy_drop": acc.get("task_accuracy_drop"),
           "decode_tokens_per_s": tps,
           "passed": bool(report and report.get("passed")), "failed": failed or (report or {}).get("failed") or ([] if report else ["export"])}
    if error:
        row["error"] = error
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v, k):
        if v is None:
            return "-"
        if k == "kl_divergence":
            return f"{v:.4f}"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    head = "recipe | MB | dPPL% | KL | top1 | task | tok/s | s | passed"
    lines = [head] + [" | ".join([r["recipe"]] + [f(r.get(k), k) for k in ("size_mb", "perplexity_increase_pct", "kl_divergence",
                                                                       "top1_agreement", "task_accuracy", "decode_tokens_per_s", "seconds")]
                                 + ["yes" if r["passed"] else "no: " + ",".join(r["failed"])]) for r in rows]
    return "\n".join(lines)


def auto_export(model_dir, out, *, target, calibration=None, data=None, candidates=None, validate_options=None,
                twins: bool = True, sensitivity_options=None, lora: tuple[Path, Path] | None = None,
                time_budget_s: float | None = None) -> Path:
    """Search the recipes (see the module docstring); returns ``out``.

    ``sensitivity_options``: ``confirm`` / ``confirm_samples`` of :func:`edgetune.export.decoder.mixed.sensitivity`
    and ``samples`` (calibration texts used to rank, default all 32).
    ``lora``: ``(base, adapter)`` when ``model_dir`` is their merge: the ``float_adapter`` candidates export the base
    with the adapter as float side branches (``export --float-adapter``) and are validated against ``model_dir`` like
    the others. Without it the default list leaves them out, and one asked for by name is a row with the reason.
    ``time_budget_s``: a candidate starts only while the search has run for less than this (one that starts is exported
    and validated with its twin); the ones left are rows "not tried" (the profile's ``recipe_time_budget_s``).
    """
    from .export.decoder import kernels
    from .export.decoder.dispatch import export_llm
    from .export.decoder.mixed import sensitivity
    from .export.decoder.quantize import encode_calibration, load_calibration
    from .validate import validate

    model_dir, out = Path(model_dir), Path(out)
    t = resolve(target)
    cands = candidate_list(candidates)
    if candidates is None and lora is None:
        cands = [c for c in cands if not c.get("float_adapter")]
    calib = load_calibration(calibration)
    eval_data = Path(data) if data else calib.path
    if data is None:
        console.warn(f"recipe search: no eval data given; validating on the calibration texts {calib.path.name} (pass --eval-data)")
    vopts = {"latency": True, **(validate_options or {})}
    work = out.parent / f".{out.name}.recipes"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    dirs: dict[str, tuple[Path, dict]] = {}
    sens_by_alg: dict[str, dict] = {}
    reference: Path = model_dir
    token_ids = None
    try:
        for i, cand in enumerate(cands):
            name = cand["name"]
            if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
                rows.extend(_row(c["name"], None, None, error=f"not tried: the search's time budget ({time_budget_s:g} s) was spent",
                                 failed=["time budget"]) for c in cands[i:])
                break
            int4 = dict(cand.get("int4") or {})
            alg = int4.get("algorithm", t.quantization.int4.algorithm)
            mark = time.monotonic()  # each row's seconds: the candidate's export (+ a sensitivity) and validation; a twin's validation
            if int4.get("accuracy_level") == 4 and not _level4_runs(t):
                rows.append(_row(name, None, None, error="needs the CPU's int8-activation kernels (accuracy_level 4): "
                                                           f"this target's execution provider is {t.runtime.execution_provider}"))
                continue
            call = _export_call(cand, alg, model_dir, calib.path, lora, sens_by_alg)
            if call is None:
                rows.append(_row(name, None, None, error="needs the base model and its LoRA adapter (edgetune build with a "
                                                           "LoRA fine-tune gives them)"))
                continue
            src, kw = call
            folder = work / name
            try:
                with console.step(f"recipe {name}: export"):
                    export_llm(src, folder, target=t, precision=cand.get("precision"), int4=int4, **kw)
            except (BadInput, CheckFailed, UnloadableGraph) as e:
                rows.append(_row(name, None, None, error=str(e).splitlines()[0][:200]))
                rows[-1]["seconds"] = round(time.monotonic() - mark, 1)
                continue
            rec = artifacts.read_record(folder)["results"]
            # one sensitivity measurement per algorithm, from this candidate's own int4 weights
            if cand.get("precision", "int4") == "int4" and alg not in sens_by_alg and not cand.get("float_adapter"):
                m = (rec.get("quantization") or {}).get("mixed") or {}
                if m.get("sensitivity") and m["sensitivity"].get("ranking"):
                    sens_by_alg[alg] = m["sensitivity"]
                elif (INT4_ALGORITHMS[alg].mixed and not rec.get("packed")
                      and any(_measured(c.get("mixed")) and (c.get("int4") or {}).get("algorithm", t.quantization.int4.algorithm) == alg
                              for c in cands)):  # only where a later candidate of this algorithm will read it
                    # (measured on the builder's node names: never on a packed graph)
                    so = dict(sensitivity_options or {})
                    if token_ids is None:
                        token_ids = encode_calibration(model_dir, calib.texts[: so.pop("samples", None) or len(calib.texts)])
                    so.pop("samples", None)
                    with console.step(f"recipe search: sensitivity of the {alg} int4 weights"):
                        sens_by_alg[alg] = sensitivity(model_dir, folder, token_ids, **so)
            variants = [(name, folder, False)]
            if twins and _level4_twin_ok(cand, t, rec):
                twin = work / f"{name}@level4"
                shutil.copytree(folder, twin)
                kernels.set_accuracy_level(twin, 4)
                variants.append((f"{name}@level4", twin, True))
            for vname, vdir, is_twin in variants:
                with console.step(f"recipe {vname}: validate"):
                    try:
                        report = validate(vdir, target=t, reference=reference, data=eval_data if reference == model_dir else None,
                                          out=work / f"validate-{vname}", **vopts)
                    except CheckFailed as e:
                        report = e.result if isinstance(e.result, dict) else None
                if reference == model_dir and (work / f"validate-{vname}" / "reference" / "reference.json").is_file():
                    reference = work / f"validate-{vname}" / "reference"  # the PyTorch reference once, then its pack
                rows.append(_row(vname, report, rec if not is_twin else {**rec, "size_mb": rec.get("size_mb")}))
                rows[-1]["seconds"], mark = round(time.monotonic() - mark, 1), time.monotonic()
                dirs[vname] = (vdir, cand | {"twin": is_twin}, (src, int4, kw))
        passing = [r for r in rows if r["passed"]]
        search = {"candidates": [c["name"] for c in cands], "table": rows, "eval_data": str(eval_data),
                  "reference": str(model_dir), "calibration": str(calib.path), "twins": twins,
                  "lora": [str(x) for x in lora] if lora else None,
                  "sensitivity": {a: {"method": s["method"], "top": s["ranking"][:10]} for a, s in sens_by_alg.items()},
                  "time_budget_s": time_budget_s, "seconds": round(time.monotonic() - started, 1)}
        untried = [r["recipe"] for r in rows if r["failed"] == ["time budget"]]
        if not passing:
            hint = "relax the target's budgets, give calibration/eval data like the deployment's, or add candidates"
            if untried:
                hint = (f"{len(untried)} candidates were not tried within the time budget ({time_budget_s:g} s): raise it "
                        f"(--recipe-time-budget, [quantization] recipe_time_budget_s) or put them first (--recipe-candidates); or {hint}")
            raise CheckFailed(f"no recipe meets the budgets of {t.name}:\n{format_table(rows)}", hint=hint, result=search)
        best = max(passing, key=lambda r: r["decode_tokens_per_s"] or 0.0)
        search["chosen"] = best["recipe"]
        search["why"] = f"highest decode tok/s ({best['decode_tokens_per_s']}) of {len(passing)} passing of {len(rows) - len(untried)} tried"
        if untried:
            search["why"] += f" ({len(untried)} not tried within the time budget)"
        vdir, cand, (src, int4, kw) = dirs[best["recipe"]]
        final_work = work / "final"
        if cand["twin"]:  # re-export for a record of its own (level 4 as an option, not a patched graph): the same call
            m = (artifacts.read_record(vdir)["results"].get("quantization") or {}).get("mixed")
            if m and _measured(cand.get("mixed")):  # the layers the sensitivity chose, not a second measurement
                kw = {**kw, "mixed": {"layers": m["layers"], "sensitivity": m.get("sensitivity")}}
                if not INT4_ALGORITHMS[int4.get("algorithm", t.quantization.int4.algorithm)].calibrated:
                    kw.pop("calibration", None)
            with console.step(f"recipe {best['recipe']}: export with accuracy_level 4"):
                export_llm(src, final_work, target=t, precision=cand.get("precision"), int4={**int4, "accuracy_level": 4}, **kw)
            if (diff := graph_difference(vdir, final_work)) is not None:
                raise EdgetuneError(f"recipe search: the level-4 export of {cand['name']} is not the graph that was validated ({diff})",
                                    hint="a bug in edgetune: please report it with this line")
        else:
            shutil.move(str(vdir), str(final_work))
        rec = artifacts.read_record(final_work)
        inputs = {"model": model_dir, "calibration": calib.path, "data": eval_data}
        if cand.get("float_adapter"):
            inputs.update(base=Path(lora[0]), float_adapter=Path(lora[1]))
        with artifacts.stage_output(out, "export", inputs=inputs,
                                    options={"recipe": "auto", "candidates": cands, "twins": twins, "validate": vopts, "time_budget_s": time_budget_s,
                                             "target": t.model_dump(mode="json", exclude={"source"})}) as run:
            for f in final_work.iterdir():
                if f.name != artifacts.RECORD_NAME:
                    shutil.move(str(f), str(run.dir / f.name))
            run.results.update(rec["results"])
            run.results["recipe"] = search
            run.record["chosen_export"] = {k: rec.get(k) for k in ("options", "fingerprint", "inputs")}
        console.log(f"recipe search: {best['recipe']} ({search['why']})\n{format_table(rows)}")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table_json(out: Path) -> str:
    rec = artifacts.read_record(out) or {}
    return json.dumps(((rec.get("results") or {}).get("recipe") or {}).get("table"), indent=1)
