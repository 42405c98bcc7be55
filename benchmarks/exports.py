"""`make bench`: exports, cached under <out>/exports keyed by their options, the model and the exporter code,
each made in its own process (`python -m benchmarks.run --export-worker SPEC`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgetune.artifacts import code_identity
from edgetune.quant import algorithms

from .common import TARGET, child_env, key


def exporter_fingerprint() -> str:
    """Changes when the export code (the import closure of edgetune.export) or a library that shapes the graph
    changes, so a cached export is never stale: the export stage's own code identity."""
    return code_identity("export")[:12]


def export_worker(spec_json: str) -> int:
    """Child process: one `edgetune.export.export` call; the outcome goes to spec['result'] as JSON."""
    spec = json.loads(spec_json)
    from edgetune import console
    from edgetune.errors import EdgetuneError
    from edgetune.export import export

    console.configure(quiet=True)
    t0 = time.perf_counter()
    try:
        extra = {"calibration": spec["calibration"]} if spec.get("calibration") else {}
        export(spec["model"], spec["out"], target=spec["target"], precision=spec["precision"], int4=spec.get("int4"), **extra)
        res = {"ok": True}
    except EdgetuneError as e:
        res = {"ok": False, "type": type(e).__name__, "exit_code": e.exit_code, "error": e.one_line()}
    except Exception as e:  # noqa: BLE001 - reported as a row, not a crash
        res = {"ok": False, "type": type(e).__name__, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


def export_spec(v: dict, model_dir: Path, root: Path, model_key: str | None = None) -> tuple[dict, Path]:
    """The export options of a variant and its cache folder (keyed by options, model and exporter code).

    ``model_key``: the model's content hash, for folders whose name does not change with their
    content (a build's ``.work/merged``); default: the folder name."""
    spec = {"precision": v["precision"], "int4": v.get("int4"), "target": TARGET}
    if v.get("calibration"):
        spec["calibration"] = str(v["calibration"])
    k = key({**spec, "model": model_key or model_dir.name, "exporter": exporter_fingerprint()})
    return spec, root / "exports" / f"{v['slug']}-{k}"


def calibrated_algorithms() -> tuple[str, ...]:
    """int4 algorithms that run a calibration pass (edgetune's quantization table says which)."""
    return algorithms(calibrated=True)


# calibrated algorithms whose export takes ~10 min or more on 2 cores (a GPTQ pass); awq's search takes about a minute
SLOW_CALIBRATED = algorithms(slow=True)


_BUILT: set[str] = set()  # exported in this run (so --fresh rebuilds each variant once)


def export_variant(v: dict, model_dir: Path, root: Path, s: dict, fresh: bool, model_key: str | None = None) -> tuple[Path | None, dict]:
    """(folder, info) where info has status ok|refused|failed|timed out, error, export_s, cached."""
    spec, folder = export_spec(v, model_dir, root, model_key)
    if (not fresh or str(folder) in _BUILT) and (folder / "edgetune.json").is_file():
        return folder, {"status": "ok", "cached": True}
    shutil.rmtree(folder, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = logs / f"export-{folder.name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.run", "--export-worker",
           json.dumps({**spec, "model": str(model_dir), "out": str(folder), "result": str(result)})]
    t0 = time.perf_counter()
    with open(logs / f"export-{folder.name}.log", "w") as lf:
        try:
            subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=s["export_timeout_s"], env=child_env())
        except subprocess.TimeoutExpired:
            shutil.rmtree(folder, ignore_errors=True)
            return None, {"status": "timed out", "error": f"export took longer than {s['export_timeout_s']} s (raise --export-timeout)"}
    dt_s = round(time.perf_counter() - t0, 1)
    if not result.is_file():
        tail = (logs / f"export-{folder.name}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return None, {"status": "failed", "error": f"export process died: {tail[0][:300]}", "export_s": dt_s}
    res = json.loads(result.read_text())
    if not res["ok"]:
        refused = res.get("type") in ("BadInput", "CheckFailed", "MissingDependency")
        return None, {"status": "refused" if refused else "failed", "error": res["error"], "export_s": dt_s}
    _BUILT.add(str(folder))
    return folder, {"status": "ok", "cached": False, "export_s": dt_s}
