"""Runtime LoRA adapters: one base graph + <name>.onnx_adapter files == the merged models, adapter by adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgetune.artifacts import hash_path
from edgetune.cli import main
from edgetune.errors import BadInput
from edgetune.export import export

IDS = [5, 17, 42, 99, 7, 3, 250, 11]
NEW = 12


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def make_lora(base, out, *, targets, seed, dora=False, r=4, alpha=8):
    """Random non-zero LoRA weights (init_lora_weights=False), saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=dora, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def loras(tiny_llama, module_tmp):
    root = module_tmp("loras")
    # different modules and ranks: the graph takes the union, each adapter fills its part
    return {"chat": make_lora(tiny_llama, root / "chat", targets=["q_proj", "v_proj", "down_proj"], seed=1),
            "sql": make_lora(tiny_llama, root / "sql", targets=["k_proj", "o_proj", "gate_proj", "up_proj"], seed=2, r=8, alpha=16)}


@pytest.fixture(scope="module")
def multi(tiny_llama, loras, module_tmp):
    return export(tiny_llama, module_tmp("multi") / "x", target="cpu-x86", precision="fp32",
                  adapters=[loras["chat"], loras["sql"]])


@pytest.fixture(scope="module")
def merged_exports(tiny_llama, loras, module_tmp):
    """The reference: edgetune merge each adapter, then export the merged model in fp32 (and the base)."""
    from edgetune.merge import merge

    root = module_tmp("merged")
    out = {None: export(tiny_llama, root / "base", target="cpu-x86", precision="fp32")}
    for name, path in loras.items():
        m = merge(tiny_llama, path, root / f"m-{name}")
        out[name] = export(m, root / f"x-{name}", target="cpu-x86", precision="fp32")
    return out


def genai_logits(folder, ids, adapter=None):
    """Last-position logits straight from an onnxruntime-genai generator (adapter set the documented way)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    gen = og.Generator(model, og.GeneratorParams(model))
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(folder / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    return np.asarray(gen.get_logits()).reshape(-1)


def test_each_adapter_equals_its_merged_model(multi, merged_exports):
    from edgetune.device import llm as dev

    m = dev.load(multi)
    assert sorted(m.adapter_files) == ["chat", "sql"]
    results = {}
    for name in ["chat", "sql", None, "chat"]:  # switch back and forth on one loaded model
        dev.set_adapter(m, name)
        ref = dev.load(merged_exports[name])
        got_lg, want_lg = dev.logits(m, IDS), dev.logits(ref, IDS)
        assert np.abs(got_lg - want_lg).max() < 1e-4, name
        got = dev.generate_ids(m, IDS, NEW, ignore_eos=True)
        assert got == dev.generate_ids(ref, IDS, NEW, ignore_eos=True), name
        # onnxruntime-genai's own logits with the adapter set on the generator
        assert np.abs(genai_logits(multi, IDS, name) - genai_logits(merged_exports[name], IDS)).max() < 1e-4, name
        results[name] = got_lg
    # the adapters really differ from each other and from the base
    assert np.abs(results["chat"] - results[None]).max() > 1e-2
    assert np.abs(results["sql"] - results[None]).max() > 1e-2
    assert np.abs(results["chat"] - results["sql"]).max() > 1e-2


def test_record_files_and_export_check(multi, loras):
    rec = json.loads((multi / "edgetune.json").read_text())
    res = rec["results"]
    assert [a["name"] for a in res["adapters"]] == ["chat", "sql"]
    for a in res["adapters"]:
        assert a["sha256"] == hash_path(loras[a["name"]]) and (multi / a["file"]).is_file()
        assert rec["inputs"][f"adapter.{a['name']}"]["sha256"] == a["sha256"]
    assert {a["name"]: a["rank"] for a in res["adapters"]} == {"chat": 4, "sql": 8}
    assert res["adapter_inputs"] == 2 * (3 + 4) * 2  # A and B per targeted module, 2 layers
    check = res["adapter_check"]
    assert check["passed"] and set(check["adapters"]) == {"(base)", "chat", "sql"}
    assert all(v["max_abs_diff"] < 1e-4 and v["top1_agreement"] == 1.0 for v in check["adapters"].values())
    assert res["kind"] == "decoder" and res["precision"] == "fp32" and res["tokenizer_check"]["mismatches"] == 0
    index = json.loads((multi / "adapters.json").read_text())
    assert set(index["adapters"]) == {"chat", "sql"} and len(index["parameters"]) == 14


def test_int4_base_keeps_lora_float(tiny_llama, loras, tmp_path):
    import onnx

    out = export(tiny_llama, tmp_path / "q", target="cpu-x86", precision="int4", adapters=[loras["chat"]])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora_ops = {n.op_type for n in graph.node if "/lora_" in n.name}
    assert lora_ops == {"MatMul"} and any(n.op_type == "MatMulNBits" for n in graph.node)
    res = json.loads((out / "edgetune.json").read_text())["results"]
    assert res["matmulnbits"] and res["matmulnbits"][0]["bits"] == 4
    fig = res["adapter_check"]["adapters"]
    # int4 is informational (the base weights are quantized); the adapter adds no error of its own
    assert res["adapter_check"]["passed"] is None and fig["chat"]["max_abs_diff"] < 3 * fig["(base)"]["max_abs_diff"] + 0.05


def test_dora_is_refused(tiny_llama, tmp_path, capsys):
    dora = make_lora(tiny_llama, tmp_path / "dora", targets=["q_proj"], seed=3, dora=True)
    with pytest.raises(BadInput, match="DoRA.*merge"):
        export(tiny_llama, tmp_path / "x", target="cpu-x86", precision="fp32", adapters=[dora])
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--precision", "fp32", "--adapter", str(dora),
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "DoRA" in err and "edgetune merge" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_adapters_exit_2(tiny_llama, loras, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    loha = tmp_path / "loha"
    shutil.copytree(loras["chat"], loha)
    cfg = json.loads((loha / "adapter_config.json").read_text())
    (loha / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    wrong = tmp_path / "wrong"
    shutil.copytree(loras["chat"], wrong)
    w = load_file(str(wrong / "adapter_model.safetensors"))
    key = next(k for k in w if "q_proj.lora_A" in k)
    w[key] = np.zeros((w[key].shape[0], w[key].shape[1] + 3), np.float32)
    save_file(w, str(wrong / "adapter_model.safetensors"))
    for folder, words in ((loha, "not LoRA"), (wrong, "does not fit base"), (tmp_path, "no adapter_config.json")):
        code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--adapter", str(folder), "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and words in err and "Traceback" not in err, err
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--adapter", str(loras["chat"]), "--adapter", str(loras["chat"]),
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "two adapters are named 'chat'" in err
    code, _, err = run_cli(["export", str(tiny_llama), "-t", "cpu-x86", "--int4-algorithm", "hqq", "--adapter", str(loras["chat"]),
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not 'hqq'" in err and "rtn" in err
    assert not (tmp_path / "x").exists()


DEVICE_ONLY = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "transformers", "optimum", "peft", "accelerate", "bitsandbytes", "safetensors")
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked on the device: {name}")
            return None
    sys.meta_path.insert(0, Block())
    from edgetune.cli import main
    main(sys.argv[1:])
    """
)


def test_bundle_carries_adapters_and_run_selects_one(multi, tmp_path):
    from edgetune.bundle import make_bundle, verify
    from edgetune.device import llm as dev

    manifest = make_bundle(multi, tmp_path / "bundle", target="cpu-x86")
    files = {f["path"] for f in manifest["files"]}
    assert {"model/chat.onnx_adapter", "model/sql.onnx_adapter", "model/adapters.json"} <= files
    assert verify(tmp_path / "bundle")["ok"]

    def run(*extra):
        return subprocess.run([sys.executable, "-c", DEVICE_ONLY, "run", str(tmp_path / "bundle"), "--raw", "-p", "Turn on the",
                               "-n", "6", "--json", *extra], capture_output=True, text=True, timeout=300)

    outs = {}
    for name in ("chat", "sql", None):
        r = run("--adapter", name) if name else run()
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["adapter"] == name
        outs[name] = res["results"][0]["output"]
        m = dev.load(multi, adapter=name)
        assert outs[name] == dev.decode(m, dev.generate_ids(m, dev.encode(m, "Turn on the"), 6))
    assert len(set(outs.values())) > 1
    r = run("--adapter", "nope")
    assert r.returncode == 2 and "adapter 'nope'" in r.stderr and "chat, sql" in r.stderr
