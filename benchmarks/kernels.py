"""`python -m benchmarks.kernels`: where a decode step's MatMulNBits time goes, per node shape, on this CPU's own
kernels and on the AVX2 kernels (the CPUID mask of benchmarks/cpumask.py), side by side.

One MatMulNBits node per row (M = 1, random weights, accuracy_level 4, one thread, median of rounds of ``--reps``
runs), in the shapes of issue 33's recipe on SmolLM2-135M (gate+up packed, q+k packed, v / o / down, the int8 head):
with and without zero points, so what the AVX2 kernels lose is seen per node, not per model. Each measurement runs in
a fresh process (the mask is per process).

    .venv/bin/python -m benchmarks.kernels [--reps 400] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# (label, N, K, bits, block): SmolLM2-135M (hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads, vocab 49152)
SHAPES = (
    ("gate+up (packed) 4-bit b32", 3072, 576, 4, 32),
    ("q+k (packed) 4-bit b32", 768, 576, 4, 32),
    ("o_proj 4-bit b32", 576, 576, 4, 32),
    ("v_proj 8-bit b128", 192, 576, 8, 128),
    ("down_proj 8-bit b128", 576, 1536, 8, 128),
    ("head 8-bit b64", 49152, 576, 8, 64),
)


def matmulnbits_model(path: Path, *, n: int, k: int, bits: int, block: int, zero_points: bool, level: int = 4,
                      seed: int = 0):
    """One MatMulNBits node ``[1, k] x [k, n]`` (input X, output Y) with random weights, saved at ``path``; returns the
    weights it stores as floats ``[n, k]`` (a K that is no multiple of the block is padded, as MatMulNBits pads).
    Without zero points the kernel's default ``2**(bits-1)`` applies. tests/test_avx2_emulation.py builds its cases
    with it too."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    q = rng.integers(0, 2 ** bits, size=(n, nb * block)).astype(np.uint8)
    s = (rng.random((n, nb)) * 0.1 + 0.01).astype(np.float32)
    z = rng.integers(0, 2 ** bits, size=(n, nb)).astype(np.uint8) if zero_points else np.full((n, nb), 2 ** (bits - 1), np.uint8)
    nib = (lambda a: (a[:, 0::2] | (a[:, 1::2] << 4)).astype(np.uint8)) if bits == 4 else (lambda a: a)
    inits = [helper.make_tensor("B", TensorProto.UINT8, (n, nb, block * bits // 8), nib(q).tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, (n * nb,), s.ravel())]
    if zero_points:  # 4-bit zero points: two a byte, each row padded to whole bytes
        zz = np.concatenate([z, np.zeros((n, 1), np.uint8)], 1) if bits == 4 and nb % 2 else z
        inits.append(helper.make_tensor("Z", TensorProto.UINT8, (nib(zz).size,), nib(zz).tobytes(), raw=True))
    node = helper.make_node("MatMulNBits", ["X", "B", "S"] + (["Z"] if zero_points else []), ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, (1, k))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, (1, n))], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), path)
    return (s.repeat(block, 1) * (q.astype(np.float32) - z.repeat(block, 1)))[:, :k]


def _time(path: str, k: int, reps: int, rounds: int) -> float:
    """Median microseconds per run of the one-node model (this process: run under the mask or not by the caller)."""
    import time

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = {"X": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    for _ in range(max(10, reps // 10)):
        sess.run(None, x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run(None, x)
        times.append(1e6 * (time.perf_counter() - t) / reps)
    return statistics.median(times)


def measure(shapes=SHAPES, *, reps: int = 400, rounds: int = 3, mask_lib: Path | None = None, work: Path | None = None) -> list[dict]:
    """One row per (shape, zero points): microseconds natively and, with ``mask_lib``, on the AVX2 kernels."""
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for label, n, k, bits, block in shapes:
            for zp in (True, False):
                path = Path(tmp) / f"{n}x{k}-{bits}-{block}-{int(zp)}.onnx"
                matmulnbits_model(path, n=n, k=k, bits=bits, block=block, zero_points=zp)
                row = {"node": label, "N": n, "K": k, "bits": bits, "block": block, "zero_points": zp}
                for key, lib in (("native_us", None), ("avx2_us", mask_lib)):
                    if key == "avx2_us" and lib is None:
                        continue
                    env = {**os.environ, **({"LD_PRELOAD": str(lib), "CPUID_MASK_REQUIRED": "1"} if lib else {})}
                    p = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--time-one", str(path), str(k), str(reps), str(rounds)],
                                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
                    if p.returncode != 0:
                        raise RuntimeError(f"{label}: {p.stderr.strip()[-300:]}")
                    row[key] = round(float(p.stdout.strip()), 1)
                if "avx2_us" in row:
                    row["avx2_vs_native"] = round(row["avx2_us"] / row["native_us"], 2)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    masked = any("avx2_us" in r for r in rows)
    head = "| node | zero points | this CPU µs |" + (" AVX2 kernels µs | AVX2 / this CPU |" if masked else "")
    out = [head, "|---|---|---|" + ("---|---|" if masked else "")]
    for r in rows:
        cells = [r["node"], "uint" if r["zero_points"] else "none", f"{r['native_us']:.1f}"]
        if masked:
            cells += [f"{r['avx2_us']:.1f}", f"{r['avx2_vs_native']:.2f}x"] if "avx2_us" in r else ["–", "–"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400, help="runs per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--no-mask", action="store_true", help="this CPU's kernels only (no AVX2 column)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    ap.add_argument("--time-one", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.time_one:
        path, k, reps, rounds = a.time_one
        print(_time(path, int(k), int(reps), int(rounds)))
        return 0
    lib = None
    if not a.no_mask:
        from .cpumask import MaskError, checked

        try:
            lib, _ = checked(Path(tempfile.gettempdir()) / "edgetune-cpumask")
        except MaskError as exc:
            print(f"benchmarks.kernels: no AVX2 column ({exc})", file=sys.stderr)
            lib = None
    rows = measure(reps=a.reps, rounds=a.rounds, mask_lib=lib)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        from .machine import machine

        m = machine()
        print(f"MatMulNBits, M = 1, accuracy_level 4, 1 thread, median of {a.rounds} x {a.reps} runs; {m.get('cpu')}, features "
              f"{', '.join(m.get('doctor_cpu_features') or m.get('cpu_features') or [])}"
              + ("; AVX2 kernels: AVX-512, AVX-VNNI and AMX hidden from CPUID (benchmarks/cpumask.py)" if lib else ""))
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
