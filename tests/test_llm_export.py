"""Decoder export through onnxruntime-genai's builder, on the tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.cli import main
from edgetune.errors import BadInput
from edgetune.export import export
from edgetune.llm.export import matmulnbits_attributes


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(scope="module")
def fp32_export(tiny_llama, tmp_path_factory):
    return export(tiny_llama, tmp_path_factory.mktemp("x") / "fp32", target="cpu-x86", precision="fp32")


def test_fp32_logits_match_pytorch(tiny_llama, fp32_export):
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    ids = [5, 17, 42, 99, 7, 3]
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    model = og.Model(str(fp32_export))
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens(np.array([ids], dtype=np.int32))
    got = np.asarray(gen.get_logits()).reshape(-1, want.shape[-1])[-1]
    assert np.abs(got - want).max() < 1e-3
    rec = json.loads((fp32_export / "edgetune.json").read_text())["results"]
    assert rec["kind"] == "decoder" and rec["precision"] == "fp32" and rec["matmulnbits"] == []
    assert rec["tokenizer_check"]["mismatches"] == 0


def test_genai_config_from_profile(fp32_export):
    cfg = json.loads((fp32_export / "genai_config.json").read_text())
    assert cfg["search"]["max_length"] <= 512 and cfg["search"]["do_sample"] is False
    assert cfg["model"]["context_length"] <= 2048


@pytest.mark.parametrize("block_size,accuracy_level", [(32, 0), (64, 4)])
def test_int4_options_reach_graph(tiny_llama, tmp_path, block_size, accuracy_level):
    import onnxruntime_genai as og

    out = export(tiny_llama, tmp_path / "int4", target="cpu-x86", precision="int4",
                 int4={"block_size": block_size, "accuracy_level": accuracy_level})
    attrs = matmulnbits_attributes(out)
    assert attrs and all(a["bits"] == 4 and a["block_size"] == block_size and a.get("accuracy_level", 0) == accuracy_level for a in attrs)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[5, 6, 7]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 12


def test_phi3_int4_exports(tiny_phi3, tmp_path):
    out = export(tiny_phi3, tmp_path / "phi3", target="cpu-x86", precision="int4")
    rec = json.loads((out / "edgetune.json").read_text())["results"]
    assert rec["matmulnbits"] and rec["int4"]["algorithm"] == "rtn"


def test_unavailable_algorithm_is_bad_input(tiny_llama, tmp_path):
    with pytest.raises(BadInput, match="hqq"):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", precision="int4", int4={"algorithm": "hqq"})
    assert not (tmp_path / "x").exists()


def test_cli_export_json(tiny_llama, tmp_path, capsys):
    code, out, _ = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "e"),
                            "--precision", "int4", "--int4-block-size", "128", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["matmulnbits"][0]["block_size"] == 128


def test_cli_adapter_path_refused(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--out", str(tmp_path / "e"),
                            "--adapter", str(tmp_path)], capsys)
    assert code == 2 and "merge" in err
