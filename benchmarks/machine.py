"""`make bench`: the machine and the package versions a run records (results.json `machine`, `versions`)."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> dict:
    from edgetune.artifacts import machine_info

    info = machine_info()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                info.setdefault("cpu_model_lscpu", v.strip())
            if k.strip() == "Flags":
                flags = set(v.split())
                info["cpu_features"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "fma", "f16c"})
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    try:  # what `edgetune doctor` reports: the features the kernels pick their paths by
        from edgetune.doctor import cpu_features

        feats = cpu_features()
        info["doctor_cpu_features"] = sorted(k for k, v in feats.items() if v)
        info["doctor_cpu_features_absent"] = sorted(k for k, v in feats.items() if not v)
    except Exception:  # noqa: BLE001 - the machine block never stops a run
        pass
    info["python"] = platform.python_version()
    info["loadavg_start"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return info


def versions() -> dict:
    from importlib import metadata

    from edgetune.artifacts import package_versions

    v = package_versions()
    for name in ("llama-cpp-python", "matplotlib"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return v


def have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
