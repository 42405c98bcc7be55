"""Operator coverage report against a profile's operator list (fast)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetune.export.encoder.coverage import coverage, node_flops

from encoder_helpers import run_cli


@pytest.fixture
def odd_model(tmp_path):
    """x[1,8,16] -MatMul W[16,32]-> h -Add b-> a -Einsum(bij,bkj->bik)-> e[1,8,8] -TopK(k=2)-> v, i."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(32, np.float32), "b"),
        numpy_helper.from_array(np.array([2], np.int64), "k"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["a"], name="add"),
        helper.make_node("Einsum", ["a", "a"], ["e"], name="einsum", equation="bij,bkj->bik"),
        helper.make_node("TopK", ["e", "k"], ["v", "i"], name="topk"),
    ]
    g = helper.make_graph(
        nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", "seq", 2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", "seq", 2])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    p = tmp_path / "odd.onnx"
    onnx.save(m, p)
    return p


# FLOPs by hand at batch 1, sequence 8
MM = 2 * 8 * 32 * 16  # 2*M*N*K = 8192
ADD = 8 * 32  # 256
EINSUM = 2 * 1 * 8 * 32 * 8  # b,i,j,k = 1,8,32,8 -> 4096
TOPK = 64 * 3  # 64 elements, log2(8) = 3 compares each
TOTAL = MM + ADD + EINSUM + TOPK


def test_unsupported_operators_counted_with_flops_share(odd_model):
    r = coverage(odd_model, ["MatMul", "Add", "Gemm"], batch=1, sequence_length=8)
    assert r["nodes"] == 4 and r["unsupported_nodes"] == 2
    assert r["unsupported_by_op"] == {"Einsum": 1, "TopK": 1}
    assert [row["node"] for row in r["unsupported"]] == ["einsum", "topk"]
    assert r["total_flops"] == TOTAL
    assert r["unsupported_flops"] == EINSUM + TOPK
    assert r["unsupported_pct_flops"] == round(100 * (EINSUM + TOPK) / TOTAL, 3)
    assert r["unsupported_pct_nodes"] == 50.0


def test_everything_supported_when_list_empty_and_shapes_scale(odd_model):
    r = coverage(odd_model, [], batch=1, sequence_length=8)
    assert r["unsupported_nodes"] == 0 and r["unsupported_pct_flops"] == 0.0
    r2 = coverage(odd_model, ["MatMul"], batch=2, sequence_length=8)  # doubling the batch doubles the work
    assert r2["total_flops"] == 2 * TOTAL
    assert r2["unsupported_by_op"] == {"Add": 1, "Einsum": 1, "TopK": 1}


def test_timing_share_from_onnxruntime_profile(odd_model):
    r = coverage(odd_model, ["MatMul", "Add"], batch=1, sequence_length=8, timing=True)
    assert 0.0 < r["unsupported_pct_time"] < 100.0
    assert all(row["time_us"] > 0 for row in r["unsupported"])


def test_node_flops_gemm_transposed():
    n = helper.make_node("Gemm", ["a", "w"], ["y"], transB=1)
    assert node_flops(n, {"a": [4, 16], "w": [32, 16], "y": [4, 32]}) == 2 * 4 * 32 * 16


def test_cli_coverage_only_and_fail_on_fallback(odd_model, tmp_path):
    prof = tmp_path / "board.toml"
    prof.write_text('extends = "fpga-vitisai"\nname = "board"\n[graph]\nsequence_length = 8\n[operators]\nsupported = ["MatMul", "Add"]\n')
    r = run_cli("quantize", str(odd_model), "-t", str(prof), "--coverage-only", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["target"] == "board" and rep["unsupported_by_op"] == {"Einsum": 1, "TopK": 1}
    assert rep["unsupported_flops"] == EINSUM + TOPK
    r = run_cli("quantize", str(odd_model), "-t", str(prof), "--coverage-only")
    assert r.returncode == 0 and "2 of 4 nodes fall back to the CPU" in r.stdout and "einsum" in r.stdout
    r = run_cli("quantize", str(odd_model), "-t", str(prof), "--coverage-only", "--fail-on-fallback")
    assert r.returncode == 1 and "fall back to the CPU on board" in r.stderr
    r = run_cli("quantize", str(odd_model), "-t", "cpu-x86")
    assert r.returncode == 2 and "--out is required" in r.stderr
