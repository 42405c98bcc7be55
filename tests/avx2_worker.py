"""Run by tests/test_avx2_emulation.py, natively and under ``qemu-x86_64 -cpu Haswell`` (an x86 CPU with AVX2 and no
AVX-512 or VNNI, emulated): what onnxruntime's CPU kernels compute there. Imports only what a device has (numpy,
onnxruntime, onnxruntime-genai), so it runs with the device venv's Python.

    python avx2_worker.py features                 -> JSON: the CPU features numpy reads from cpuid (as onnxruntime does)
    python avx2_worker.py run DIR                  -> JSON: each DIR/*.onnx (input X, output Y) run on DIR/x.npy, 1 thread
    python avx2_worker.py decode FOLDER OUT ID...  -> OUT.npy: the logits of each step of a genai model, the first two ids
                                                      as the prompt, then one id per step (M = 1: the decode kernels)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def features() -> dict:
    from numpy._core._multiarray_umath import __cpu_features__ as f

    return {k: bool(f.get(k)) for k in ("AVX2", "FMA3", "F16C", "AVX512F", "AVX512VNNI")}


def run(folder: str) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    x = np.load(Path(folder) / "x.npy")
    return {p.stem: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0].ravel().tolist()
            for p in sorted(Path(folder).glob("*.onnx"))}


def decode(folder: str, out: str, ids: list[int]) -> None:
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    steps = []
    for chunk in [ids[:2]] + [[t] for t in ids[2:]]:
        gen.append_tokens(np.array([chunk], dtype=np.int32))
        logits = np.asarray(gen.get_logits())
        steps.append(logits.reshape(-1, logits.shape[-1])[-1])
    np.save(out, np.stack(steps).astype(np.float32))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "features":
        print(json.dumps(features()))
    elif cmd == "run":
        print(json.dumps(run(sys.argv[2])))
    elif cmd == "decode":
        decode(sys.argv[2], sys.argv[3], [int(a) for a in sys.argv[4:]])
    else:
        raise SystemExit(f"unknown command {cmd}")
