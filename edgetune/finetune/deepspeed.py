"""DeepSpeed ZeRO configs for the HF Trainer, and the multi-process launcher.

The presets leave batch sizes, clipping and precision as ``"auto"`` so the Trainer fills
them from its own arguments (no two sources of truth). ``offload`` is ZeRO-3 with the
optimizer state and parameters in CPU memory (for GPUs too small for the model).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import console
from ..errors import BadInput, EdgetuneError

_COMMON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    # the Trainer's torch optimizer is used as DeepSpeed's client optimizer (no compiled Adam)
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}


def preset(name: str) -> dict[str, Any]:
    if name == "zero2":
        zero = {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "allgather_bucket_size": 5e8, "reduce_bucket_size": "auto"}
    elif name == "zero3":
        zero = {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # gather the sharded weights when saving, so the saved adapter is complete
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    elif name == "offload":
        zero = {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    else:
        raise BadInput(f"unknown DeepSpeed preset '{name}'", hint="use zero2, zero3, offload or a JSON path")
    return {**_COMMON, "zero_optimization": zero}


def resolve_config(spec: str) -> dict[str, Any]:
    """A preset name or a user JSON file -> the config dict handed to TrainingArguments."""
    if spec in ("zero2", "zero3", "offload"):
        return preset(spec)
    p = Path(spec)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read DeepSpeed config {p} ({exc})", hint="give a valid JSON file") from None
    if not isinstance(cfg, dict) or "zero_optimization" not in cfg:
        raise BadInput(f"{p} has no 'zero_optimization' section", hint="start from examples/deepspeed/*.json")
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec_file: Path, num_processes: int) -> None:
    """Run the training worker in ``num_processes`` ranks on this machine with torchrun.

    Multi-node: run ``torchrun --nnodes N --node-rank R --master-addr ... -m
    edgetune.finetune.worker spec.json`` on every node (see docs/finetune.md).
    """
    from ..errors import require

    require("deepspeed", extra="deepspeed", purpose="--deepspeed")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={num_processes}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        "-m", "edgetune.finetune.worker", str(spec_file),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    console.log(f"[finetune] launching {num_processes} processes: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr if not console.MODE.quiet else subprocess.DEVNULL, stderr=subprocess.STDOUT if not console.MODE.quiet else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if console.MODE.quiet else []
        raise EdgetuneError(f"the {num_processes}-process DeepSpeed run failed (exit {proc.returncode}){': ' + tail[0] if tail else ''}", hint="rerun without --quiet to see the workers' log; add --resume to continue from the last checkpoint")
