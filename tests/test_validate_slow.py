"""SmolLM2-135M: int4 CPU export vs the fp32 PyTorch reference; fp32 export == PyTorch within 0.1%."""

from __future__ import annotations

import pytest

from conftest import shared_data

from edgetune.errors import CheckFailed
from test_validate import genai_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(module_tmp, smollm2_dir):
    root = module_tmp("smol-validate")
    text = shared_data("tinyshakespeare.txt").read_text()
    (root / "tail.txt").write_text(text[-6000:])  # ~1.5k tokens from the end of the play
    return root, smollm2_dir


def test_smollm2_fp32_export_equals_pytorch_and_int4_is_reported(smol):
    from edgetune.validate import validate

    root, hf = smol
    fp32 = genai_export(hf, root / "fp32", "fp32")
    with pytest.raises(CheckFailed) as exc:  # an fp32 SmolLM2 (~540 MB) is over cpu-x86's 400 MB size budget
        validate(fp32, target="cpu-x86", reference=hf, data=root / "tail.txt", out=root / "rep-fp32",
                 eval_tokens=1024, window=512, stride=256, max_tokens=16, latency=False)
    r32 = exc.value.result
    assert r32["failed"] == ["size_mb"]
    a = r32["accuracy"]
    print("fp32:", {k: a[k] for k in ("perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence", "top1_agreement")})
    assert abs(a["perplexity_increase_pct"]) < 0.1
    assert a["top1_agreement"] > 0.99 and r32["tokenizer"]["mismatches"] == 0
    int4 = genai_export(hf, root / "int4", "int4")
    try:
        r4 = validate(int4, target="cpu-x86", reference=root / "rep-fp32" / "reference", out=root / "rep-int4",
                      max_tokens=32, prompt_tokens=64, repeats=3)
    except CheckFailed as exc:
        # builder-default int4 RTN on a 135M model may miss the accuracy budgets (measured: ppl +29%,
        # KL 0.28, top-1 0.63); what must hold is that only accuracy checks can fail, and they are reported
        r4 = exc.result
        assert set(r4["failed"]) <= {"perplexity_increase_pct", "kl_divergence", "top1_agreement", "generation_agreement"}
    a4, lat = r4["accuracy"], r4["latency"]
    print("int4:", {k: a4[k] for k in ("perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence", "top1_agreement", "generation_agreement")},
          "decode tok/s p50", lat["decode_tokens_per_s"]["p50"], "peak MB", lat["peak_memory_mb"], "size MB", lat["size_mb"])
    assert a4["reference_perplexity"] == pytest.approx(a["reference_perplexity"])
    assert a4["perplexity"] > a["perplexity"] * 0.99 and 0 < a4["kl_divergence"] < 1 and 0.5 < a4["top1_agreement"] < 1
    assert lat["decode_tokens_per_s"]["p50"] > 1 and lat["peak_memory_mb"] > 50 and lat["size_mb"] < 200
