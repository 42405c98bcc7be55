"""A fixed float LoRA over a (quantized) base: `export BASE --float-adapter A` and build `adapter = "float"`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.errors import BadInput
from edgetune.export import export
from test_adapters import IDS, NEW, make_lora, run_cli


@pytest.fixture(scope="module")
def lora(tiny_llama, module_tmp):
    return make_lora(tiny_llama, module_tmp("fa") / "chat", targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=5)


@pytest.fixture(scope="module")
def merged_fp32(tiny_llama, lora, module_tmp):
    from edgetune.merge import merge

    root = module_tmp("fa-merged")
    return export(merge(tiny_llama, lora, root / "m"), root / "x", target="cpu-x86", precision="fp32")


def graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def lora_nodes(g):
    inits = {i.name: i for i in g.initializer}
    return [(n.op_type, inits[n.input[1]].data_type if n.input[1] in inits else None) for n in g.node
            if "lora_" in n.name and n.op_type != "Add"]


def test_fp32_base_plus_float_adapter_equals_merged(tiny_llama, lora, merged_fp32, tmp_path):
    from edgetune.device import llm as dev

    out = export(tiny_llama, tmp_path / "f", target="cpu-x86", precision="fp32", float_adapter=lora)
    got, want = dev.load(out), dev.load(merged_fp32)
    assert np.abs(dev.logits(got, IDS) - dev.logits(want, IDS)).max() < 1e-4
    assert dev.generate_ids(got, IDS, NEW, ignore_eos=True) == dev.generate_ids(want, IDS, NEW, ignore_eos=True)
    # one self-contained graph: no adapter files, no LoRA graph inputs
    assert not list(out.glob("*.onnx_adapter")) and not [i for i in graph(out).input if "lora" in i.name]
    res = json.loads((out / "edgetune.json").read_text())["results"]
    fa, check = res["float_adapter"], res["float_adapter_check"]
    assert fa["modules"] == 8 and fa["branch_ops"] == {"MatMul": 16} and fa["branch_weight_dtypes"] == {"float32": 16}
    assert check["passed"] and check["vs"]["peft_unmerged"]["max_abs_diff"] < 1e-4 and check["vs"]["merged"]["max_abs_diff"] < 1e-4
    assert check["adapter_effect_max_abs"] > 1e-2  # the adapter really changes the model


@pytest.mark.parametrize("head", ["int4", "int8"])
def test_int4_base_keeps_the_branches_float(tiny_llama, lora, tmp_path, head):
    from edgetune.targets import load_target

    q = load_target("cpu-x86").quantization.int4
    out = export(tiny_llama, tmp_path / "q", target="cpu-x86", precision="int4", float_adapter=lora, int4={"lm_head": head})
    g = graph(out)
    assert lora_nodes(g) == [("MatMul", 1)] * 16  # float32 initializers, never MatMulNBits
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")} | {"head": n.name.startswith("/lm_head/")}
             for n in nbits]
    body = [a for a in attrs if not a["head"]]
    assert len(body) == 2 * 7 and all(a["bits"] == 4 and a["block_size"] == q.block_size
                                      and a.get("accuracy_level", 0) == q.accuracy_level for a in body)
    assert [a["bits"] for a in attrs if a["head"]] == ([8] if head == "int8" else [4])
    # the contract with base transcoders: each branch adds to its base linear's output tensor
    made_by = {o: n for n in g.node for o in n.output}
    adds = [n for n in g.node if n.name.endswith("/lora/Add")]
    assert len(adds) == 8 and all(made_by[a.input[0]].op_type == "MatMulNBits" and "lora_" not in made_by[a.input[0]].name
                                  and made_by[a.input[1]].name.endswith("/lora_B/MatMul") for a in adds)
    res = json.loads((out / "edgetune.json").read_text())["results"]
    check = res["float_adapter_check"]
    # informational for a quantized base: its distance to the merged fp32 model is recorded
    assert check["passed"] is None and 0 < check["vs"]["merged"]["max_abs_diff"] < 1.0


def test_runtime_adapter_with_int8_head(tiny_llama, lora, tmp_path):
    """`--adapter A --int4-lm-head int8`: the head option must not reach the LoRA MatMuls (was: 'bits 8' on all of them)."""
    out = export(tiny_llama, tmp_path / "r", target="cpu-x86", precision="int4", adapters=[lora], int4={"lm_head": "int8"})
    g = graph(out)
    assert [op for op, _ in lora_nodes(g)] == ["MatMul"] * 16
    heads = [n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    assert len(heads) == 1 and next(a.i for a in heads[0].attribute if a.name == "bits") == 8
    assert json.loads((out / "edgetune.json").read_text())["results"]["lm_head"]["kind"] == "int8"


def test_dora_and_combinations_refused(tiny_llama, lora, tmp_path, capsys):
    dora = make_lora(tiny_llama, tmp_path / "dora", targets=["q_proj"], seed=3, dora=True)
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--precision", "int4", "--float-adapter", str(dora),
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "DoRA" in err and "edgetune merge" in err and "Traceback" not in err
    with pytest.raises(BadInput, match="cannot be combined"):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", float_adapter=lora, adapters=[lora])
    with pytest.raises(BadInput, match="not 'hqq'"):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", precision="int4", float_adapter=lora, int4={"algorithm": "hqq"})
    assert not (tmp_path / "x").exists()


def test_build_with_float_adapter_target(tiny_llama, tmp_path, capsys):
    from edgetune.bundle import verify
    from test_build import write_config

    cfg = write_config(tmp_path, tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "int4"\nadapter = "float"\narchive = false\n')
    code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code in (0, 1), err  # 1: a missed budget still writes the bundle (rejected/)
    res = json.loads((tmp_path / "out" / "build-summary.json").read_text())
    bundle = tmp_path / "out" / ("cpu-x86" if res["passed"] else "rejected/cpu-x86")
    assert verify(bundle)["ok"]
    rec = json.loads((tmp_path / "out" / ".work" / "export-cpu-x86" / "edgetune.json").read_text())
    assert set(rec["inputs"]) >= {"model", "float_adapter"} and rec["results"]["float_adapter"]["modules"] > 0
    assert "merged" not in rec["inputs"]["model"]["path"]  # the base, not the merged model
    report = json.loads((tmp_path / "out" / ".work" / "validate-cpu-x86" / "report.json").read_text())
    assert report["reference"]["source"] == str(tmp_path / "out" / ".work" / "merged")  # still validated against the merged model
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "adapter" in manifest["provenance"]["summary"]
    code, out, err = run_cli(["run", str(bundle), "--raw", "-p", "Turn on the", "-n", "4", "--json"], capsys)
    assert code == 0 and json.loads(out)["results"][0]["output"]


def test_build_over_a_gguf_base_takes_the_kernels_level_and_side_int8(tmp_path, capsys):
    """A gguf target's int4 = { accuracy_level = 4 } and side_int8 reach its export (the demo's settings + the option)."""
    pytest.importorskip("gguf")
    from test_build import write_config
    from test_gguf_transcode import FOUR_BIT
    from tiny_gguf import write_tiny_llama_gguf
    from tiny_models import build_bpe_tokenizer

    src = tmp_path / "gguf"
    build_bpe_tokenizer(src)
    base = write_tiny_llama_gguf(src / "q4.gguf", src, override=FOUR_BIT)
    target = '[[targets]]\nname = "cpu-x86"\nprecision = "gguf"\nadapter = "float"\nint4 = { accuracy_level = 4 }\nside_int8 = true\narchive = false\n'
    cfg = write_config(tmp_path / "b", base, targets=target)
    # the tiny GGUF has no chat template: text records
    (tmp_path / "b" / "train.jsonl").write_text("".join(json.dumps({"text": f"Turn on the lights in room {i}."}) + "\n" for i in range(16)))
    code, _, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code in (0, 1), err  # 1: a missed budget still writes the bundle (rejected/)
    rec = json.loads((tmp_path / "b" / "out" / ".work" / "export-cpu-x86" / "edgetune.json").read_text())
    res = rec["results"]
    assert rec["options"]["fuse"] == "int8" and res["fusion"]["side_int8"]["matmuls"] > 0, res["fusion"]
    assert res["quantization"]["accuracy_level"] == 4 and {m["accuracy_level"] for m in res["matmulnbits"]} == {4}
    # side_int8 on a target that has no GGUF transcode: refused before any work
    cfg = write_config(tmp_path / "c", base, targets='[[targets]]\nname = "cpu-x86"\nprecision = "int4"\nside_int8 = true\n')
    code, _, err = run_cli(["build", str(cfg), "--quiet"], capsys)
    assert code == 2 and "targets[0].side_int8 stores the fused side weights of a GGUF transcode" in err, err
    assert not (tmp_path / "c" / "out").exists()


def test_float_target_needs_a_lora_finetune(tiny_llama, tmp_path, capsys):
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'name = "x"\n[model]\nbase = "{tiny_llama}"\n[[targets]]\nname = "cpu-x86"\nadapter = "float"\n')
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "adapter = \"float\" needs a LoRA fine-tune" in err
