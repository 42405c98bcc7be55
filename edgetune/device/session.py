"""onnxruntime session options and providers from a target profile (device side)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import MissingDependency

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def resolve_target(target: Any):
    """A Target from a name/path/Target, or None."""
    if target is None:
        return None
    from ..targets import resolve

    return resolve(target)


def session_options(target: Any = None, *, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    t = resolve_target(target)
    if t is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[t.graph.optimization_level])
        if t.session.intra_op_threads:
            so.intra_op_num_threads = t.session.intra_op_threads
        if t.session.inter_op_threads:
            so.inter_op_num_threads = t.session.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if t.session.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_mem_pattern = t.session.enable_mem_pattern
        so.enable_cpu_mem_arena = t.session.enable_cpu_mem_arena
        if not t.session.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def providers(target: Any = None) -> list[Any]:
    """Providers (with options) for InferenceSession; raises MissingDependency if the target EP is absent."""
    import onnxruntime as ort

    t = resolve_target(target)
    if t is None:
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    wanted = t.ort_providers
    if wanted[0] not in available:
        raise MissingDependency(
            f"execution provider {wanted[0]} (target '{t.name}') is not available in this onnxruntime "
            f"(available: {', '.join(sorted(available))})",
            hint="install the onnxruntime build for this accelerator (e.g. onnxruntime-gpu) or pick a CPU target",
        )
    out: list[Any] = []
    for name in wanted:
        if name not in available:
            continue
        if name == wanted[0] and t.runtime.provider_options:
            out.append((name, {k: str(v) for k, v in t.runtime.provider_options.items()}))
        else:
            out.append(name)
    return out


def create_session(model_path: str | os.PathLike, target: Any = None, *, profile_prefix: str | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), sess_options=session_options(target, profile_prefix=profile_prefix), providers=providers(target))
