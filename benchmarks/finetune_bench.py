"""LoRA vs QLoRA vs DoRA on SmolLM2-135M: training tokens/s and peak memory, side by side.

Each method runs in its own fresh process (so peak memory is that method's alone), through
the same `edgetune.finetune.finetune` a user calls, on the example smart-home chat data.

    .venv/bin/python -m benchmarks.finetune_bench [--steps 16] [--seq-len 96] [--batch 4]

Peak memory is the process's peak RSS (VmHWM) on CPU (model load included) and
torch.cuda.max_memory_allocated on a GPU. Tokens/s counts non-padding tokens over the
Trainer's training loop (loading and evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, child_env

DATA = ROOT / "examples" / "data" / "smarthome_train.jsonl"


def child(method: str, steps: int, seq_len: int, batch: int, model: str) -> None:
    from edgetune import console
    from edgetune.finetune import FinetuneOptions, finetune

    console.configure(quiet=True)
    with tempfile.TemporaryDirectory(prefix="ftbench-") as tmp:
        opts = FinetuneOptions(method=method, max_steps=steps, batch_size=batch, max_seq_len=seq_len, packing=True,
                               loss_on_answer_only=False, lr=1e-3, save_steps=10_000, eval_fraction=0.05, limit=120)
        t0 = time.perf_counter()
        out = finetune(model, DATA, Path(tmp) / "a", options=opts)
        wall = time.perf_counter() - t0
        r = json.loads((out / "edgetune.json").read_text())["results"]
    from edgetune.device.measure import peak_rss_mb

    peak = peak_rss_mb()  # VmHWM: unlike ru_maxrss, not inherited from the parent across fork+exec
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"method": method, "tokens_per_second": r["tokens_per_second"], "peak_mib": round(peak, 1), "wall_s": round(wall, 1),
                      "trainable": r["trainable_parameters"], "last_loss": r.get("last_loss"), "eval_loss": r.get("eval_loss"),
                      "base_eval_loss": r.get("base_eval_loss")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora,qlora,dora")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.steps, a.seq_len, a.batch, a.model)
    from edgetune.model_input import materialize

    model = str(materialize(a.model).path)  # convert once, outside the timed children
    rows = []
    for m in a.methods.split(","):
        cmd = [sys.executable, "-m", "benchmarks.finetune_bench", "--child", m, "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--model", model]
        p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if p.returncode != 0:
            print(f"{m}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive an interrupted run
    if not rows:
        sys.exit(1)
    ref = rows[0]
    print(f"SmolLM2 fine-tuning, {a.steps} steps x batch {a.batch} x {a.seq_len} tokens (packed), {os.cpu_count()} CPU threads")
    print(f"{'method':8} {'tok/s':>8} {'vs ' + ref['method']:>8} {'peak MiB':>9} {'vs ' + ref['method']:>8} {'trainable':>10} {'eval loss (base)':>18}")
    for r in rows:
        print(f"{r['method']:8} {r['tokens_per_second']:8.1f} {r['tokens_per_second'] / ref['tokens_per_second']:8.2f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / ref['peak_mib']:8.2f} {r['trainable']:10,} "
              f"{r['eval_loss']:8.3f} ({r['base_eval_loss']:.3f})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
