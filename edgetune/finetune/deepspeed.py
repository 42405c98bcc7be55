"""DeepSpeed ZeRO configs for the HF Trainer, and the multi-process launcher.

The presets leave batch sizes, clipping and precision as ``"auto"`` so the Trainer fills
them from its own arguments (no two sources of truth). ``offload`` is ZeRO-3 with the
optimizer state and parameters in CPU memory (for GPUs too small for the model).
"""

from __future__ import annotations

import json
import os
import re
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


# Top-level keys of a DeepSpeed JSON config (DeepSpeed 0.18 docs, "Configuration JSON", and the keys
# deepspeed/runtime/config.py reads). DeepSpeed ignores a key it does not know, so a misspelt one
# (`gradient_cliping`) silently changes nothing: we refuse it before launching.
DEEPSPEED_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "disable_allgather",
    "communication_data_type", "seq_parallel_communication_data_type", "gradient_allreduce_op", "data_types",
    "flops_profiler", "activation_checkpointing", "sparse_attention", "aio", "autotuning", "comms_logger",
    "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "data_efficiency", "curriculum_learning",
    "compression_training", "checkpoint", "pipeline", "nebula", "hybrid_engine", "eigenvalue",
    "progressive_layer_drop", "quantize_training", "dataloader_drop_last", "compile", "timers", "graph_harvesting",
    "weight_quantization", "use_data_before_expert_parallel_", "expert_parallel", "vocabulary_size", "log_level",
    "disable_python_gc", "managed_gradient_accumulation", "mics_shard_size", "mics_hierarchical_params_gather",
    "load_universal_checkpoint", "use_node_local_storage", "fp16_master_weights_and_gradients", "zenflow",
)
# zero_optimization keys when DeepSpeed is not importable (its DeepSpeedZeroConfig is used when it is).
_ZERO_KEYS_FALLBACK = (
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
    "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint", "offload_param",
    "offload_optimizer", "sub_group_size", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "mics_shard_size", "mics_hierarchical_params_gather",
    "use_multi_rank_bucket_allreduce", "prefetch_bucket_size", "param_persistence_threshold",
    "model_persistence_threshold", "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
)


def _zero_model():
    """DeepSpeed's own pydantic model of zero_optimization, or None where DeepSpeed is not importable."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return None
    try:
        with console.results_only_stdout():  # DeepSpeed's accelerator logger prints on import
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # a broken DeepSpeed: the launch reports it; check against our list
        return None
    return DeepSpeedZeroConfig


def _model_keys(model) -> set[str]:
    keys = set()
    for name, f in model.model_fields.items():
        keys.add(name)
        if f.alias:
            keys.add(f.alias)
    return keys


def _unknown(where: str, keys, known, source) -> BadInput | None:
    import difflib

    bad = sorted(k for k in keys if k not in known)
    if not bad:
        return None
    parts = []
    for k in bad:
        close = difflib.get_close_matches(k, sorted(known), n=1)
        parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return BadInput(f"{source}: unknown DeepSpeed {where} key(s): {', '.join(parts)}",
                    hint="DeepSpeed ignores keys it does not know; fix the spelling (see deepspeed.ai/docs/config-json)")


def check_config(cfg: Any, source: str = "DeepSpeed config") -> dict[str, Any]:
    """Check a DeepSpeed config before anything is launched: top-level keys against our list,
    zero_optimization (and its offload sections) against DeepSpeed's own config model where
    importable. Values "auto" (filled by the HF Trainer) are not validated."""
    if not isinstance(cfg, dict):
        raise BadInput(f"{source}: a DeepSpeed config must be a JSON object", hint="start from examples/deepspeed/*.json")
    err = _unknown("top-level", cfg, set(DEEPSPEED_TOP_LEVEL_KEYS), source)
    if err:
        raise err
    zero = cfg.get("zero_optimization")
    if zero is None:
        raise BadInput(f"{source} has no 'zero_optimization' section", hint="start from examples/deepspeed/*.json")
    if not isinstance(zero, dict):
        raise BadInput(f"{source}: zero_optimization must be an object", hint='e.g. {"stage": 2}')
    model = _zero_model()
    known = _model_keys(model) if model is not None else set(_ZERO_KEYS_FALLBACK)
    err = _unknown("zero_optimization", zero, known, source)
    if err:
        raise err
    if model is not None:
        from pydantic import ValidationError

        subs = {"offload_optimizer": model.model_fields["offload_optimizer"].annotation,
                "offload_param": model.model_fields["offload_param"].annotation}
        for name, ann in subs.items():
            sub = zero.get(name)
            sub_model = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), None)
            if isinstance(sub, dict) and sub_model is not None:
                err = _unknown(f"zero_optimization.{name}", sub, _model_keys(sub_model), source)
                if err:
                    raise err
        concrete = {k: v for k, v in zero.items() if v != "auto"}
        try:
            model(**concrete)
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            raise BadInput(f"{source}: zero_optimization.{loc}: {e['msg']}", hint="fix the value (see deepspeed.ai/docs/config-json)") from None
        except Exception:  # a check DeepSpeed runs needs the runtime (accelerator, dist): leave it to the launch
            pass
    return cfg


def resolve_config(spec: str) -> dict[str, Any]:
    """A preset name or a user JSON file -> the config dict handed to TrainingArguments (checked)."""
    if spec in ("zero2", "zero3", "offload"):
        return preset(spec)
    p = Path(spec)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read DeepSpeed config {p} ({exc})", hint="give a valid JSON file") from None
    return check_config(cfg, str(p))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_cause(output: str) -> str | None:
    """The line of a failed torchrun's output that names the cause: the last ``...Error: ...`` / ``...Exception: ...``
    line of a worker's traceback (torchrun's closing summary, a banner of ``=`` and ``-`` lines, names none; it was
    what the one-line error showed), else the last line that is not a banner."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\w(Error|Exception)\b:", line) and "ChildFailedError" not in line:
            return line[:300]
    rest = [line for line in lines if set(line) - set("=- ")]
    return rest[-1][:300] if rest else None


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
        cause, hint = None, "rerun without --quiet to see the workers' log"
        if console.MODE.quiet:  # the workers' output was captured: keep it, and name its cause
            log = Path(spec_file).parent / "workers.log"
            log.write_text(proc.stderr or "")
            cause, hint = failure_cause(proc.stderr or ""), f"the workers' log is {log}"
        raise EdgetuneError(f"the {num_processes}-process DeepSpeed run failed (exit {proc.returncode}){': ' + cause if cause else ''}",
                            hint=f"{hint}; add --resume to continue from the last checkpoint")
