"""`edgetune profile`: trace parsing (fallbacks) and a real encoder profile."""

from __future__ import annotations

import json

from edgetune.profiling import parse_trace, profile


def test_parse_trace_aggregates_and_calls_out_fallbacks(tmp_path):
    ev = [
        {"cat": "Session", "name": "model_run", "dur": 999},
        {"cat": "Node", "name": "mm1_kernel_time", "dur": 300, "args": {"op_name": "MatMul", "provider": "OpenVINOExecutionProvider"}},
        {"cat": "Node", "name": "mm1_kernel_time", "dur": 100, "args": {"op_name": "MatMul", "provider": "OpenVINOExecutionProvider"}},
        {"cat": "Node", "name": "gelu_kernel_time", "dur": 500, "args": {"op_name": "Gelu", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "gelu_fence_before", "dur": 7, "args": {"op_name": "Gelu"}},
    ]
    (tmp_path / "t.json").write_text(json.dumps(ev))
    r = parse_trace(tmp_path / "t.json", "OpenVINOExecutionProvider")
    assert r["total_us"] == 900
    assert [o["op_type"] for o in r["by_op_type"]] == ["Gelu", "MatMul"]
    mm = r["by_op_type"][1]
    assert mm["calls"] == 2 and mm["nodes"] == 1 and abs(mm["pct"] - 400 / 9) < 1e-9
    assert [n["node"] for n in r["fallbacks"]] == ["gelu"]
    assert r["by_provider"]["CPUExecutionProvider"] == {"nodes": 1, "total_us": 500}
    assert parse_trace(tmp_path / "t.json", "CPUExecutionProvider")["fallbacks"] == []


def test_profile_encoder_export(tmp_path, tiny_bert):
    from edgetune.export.encoder.pipeline import export_encoder

    exp = export_encoder(tiny_bert, tmp_path / "exp", target="cpu-x86", precision="int8-dynamic")
    r = profile(exp, target="cpu-x86", top=50, repeats=2, sequence_length=32, trace_out=tmp_path / "trace.json")
    ops = {o["op_type"] for o in r["top_op_types"]}
    assert r["kind"] == "encoder" and r["total_ms"] > 0 and r["workload"] == {"sequence_length": 32, "repeats": 2}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear"}, ops  # int8 kernels ran
    assert all(n["calls"] == 2 for n in r["top_nodes"])
    assert json.loads((tmp_path / "trace.json").read_text())
