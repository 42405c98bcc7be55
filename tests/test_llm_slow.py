"""SmolLM2-135M: real exports (each costs about a minute on a 2-core CPU, so they are shared)."""

from __future__ import annotations

import json

import pytest

from edgetune.export import export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4_export(smollm2_dir, tmp_path_factory):
    return export(smollm2_dir, tmp_path_factory.mktemp("smol") / "int4", target="cpu-x86", precision="int4")


def test_int4_answers_paris(int4_export):
    from edgetune.device import llm

    model = llm.load(int4_export)
    answer = llm.generate(model, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in answer, answer
    rec = json.loads((int4_export / "edgetune.json").read_text())["results"]
    assert rec["tokenizer_check"]["mismatches"] == 0
    assert rec["matmulnbits"] and all(a["bits"] == 4 and a["block_size"] == 32 for a in rec["matmulnbits"])


def test_gpu_cuda_int4_export_is_produced_on_cpu(smollm2_dir, tmp_path):
    out = export(smollm2_dir, tmp_path / "cuda", target="gpu-cuda", precision="int4")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in json.dumps(cfg["model"]["decoder"]["session_options"]).lower()
    assert json.loads((out / "edgetune.json").read_text())["results"]["builder_provider"] == "cuda"
