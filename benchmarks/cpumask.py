"""`benchmarks.run --mask-cpu avx2`: measure an AVX2-only x86 CPU's kernels on this machine, at full speed.

onnxruntime (MLAS) chooses its kernels from CPUID when a process starts using it, so hiding AVX-512, AVX-VNNI and AMX
from CPUID (benchmarks/cpuid_mask.c, an LD_PRELOAD library: CPUID made to fault and answered with those bits cleared)
makes every onnxruntime process of the run take the AVX2 kernels a Haswell-to-Zen-3 CPU takes. llama.cpp picks its
kernels when it is compiled, so the peer must be built for AVX2 (`make peers-avx2`); the run refuses a peer built
with AVX-512 (its system info says so). What stays this machine's: its caches, memory bandwidth and clocks. The
same kernels under qemu-user's Haswell give the same bits (tests/test_avx2_emulation.py; docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("cpuid_mask.c")
MASKS = ("avx2",)
# what a process must see under the mask: the features MLAS dispatches on
EXPECTED = {"AVX2": True, "FMA3": True, "AVX512F": False, "AVX512VNNI": False}


class MaskError(RuntimeError):
    pass


def build(out_dir: Path) -> Path:
    """Compile the library into ``out_dir`` (once per source version)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    lib = Path(out_dir) / f"cpuid_mask-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".so.tmp")
        p = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if p.returncode != 0:
            raise MaskError(f"gcc could not build {SOURCE.name}: {p.stderr.strip()[-500:]}")
        tmp.replace(lib)
    return lib


def seen(lib: Path) -> dict:
    """The CPU features a fresh process sees under ``lib`` (numpy reads them from CPUID, as MLAS does)."""
    code = ("import json; from numpy._core._multiarray_umath import __cpu_features__ as f; "
            f"print(json.dumps({{k: bool(f.get(k)) for k in {sorted(EXPECTED)!r}}}))")
    env = {**os.environ, "LD_PRELOAD": str(lib), "CPUID_MASK_REQUIRED": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if p.returncode != 0:
        raise MaskError(f"a process under the CPUID mask failed (exit {p.returncode}): {p.stderr.strip()[-300:]} "
                        "(the mask needs Linux on x86-64 with CPUID faulting: /proc/cpuinfo lists cpuid_fault)")
    return json.loads(p.stdout)


def checked(out_dir: Path) -> tuple[Path, dict]:
    """The library, built, and what a process sees under it: the mask took (else MaskError)."""
    lib = build(out_dir)
    features = seen(lib)
    if features != EXPECTED:
        raise MaskError(f"under the mask a process sees {features}, not {EXPECTED}")
    return lib, features


def apply(mask: str, out_dir: Path) -> dict:
    """Build, check and set the mask for every process this run starts (LD_PRELOAD in the environment); the record."""
    if mask not in MASKS:
        raise MaskError(f"unknown CPU mask {mask!r}: choose from {', '.join(MASKS)}")
    lib, features = checked(out_dir)
    os.environ["LD_PRELOAD"] = " ".join(x for x in (str(lib), os.environ.get("LD_PRELOAD", "")) if x)
    os.environ["CPUID_MASK_REQUIRED"] = "1"  # a process where the mask cannot take exits 97 instead of measuring AVX-512
    return {"mask": mask, "library": str(lib), "source": str(SOURCE.relative_to(SOURCE.parents[1])), "seen": features,
            "hidden": "AVX-512 (all), AVX-VNNI, AMX (CPUID leaf 7)"}


def peer_refusal(system_info: str | None) -> str | None:
    """Why a llama.cpp build cannot be the AVX2 peer (its own system info line), or None."""
    if not system_info:
        return "llama.cpp's system info could not be read: cannot tell which instructions it was built for"
    flags = {k.strip(): v.strip() for k, _, v in (part.partition("=") for part in system_info.split("|")) if k.strip()}
    built = sorted(k for k, v in flags.items() if v == "1" and (k.startswith("AVX512") or k in ("AVX_VNNI", "AMX_INT8")))
    if built:
        return (f"the llama.cpp peer was built with {', '.join(built)}: under --mask-cpu avx2 it must be built for AVX2 "
                "(make peers-avx2, then --peers-venv .venv-peers-avx2)")
    return None
