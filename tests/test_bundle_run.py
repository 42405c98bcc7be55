"""`edgetune run` on real (tiny) bundles, in a process where torch/transformers cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from edgetune.bundle import make_bundle

# Runs the CLI with torch, transformers, optimum, peft and friends made unimportable, and
# fails if any of them was imported anyway.
DEVICE_ONLY = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "transformers", "optimum", "peft", "accelerate", "bitsandbytes", "neural_compressor", "deepspeed", "safetensors")
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked on the device: {name}")
            return None
    sys.meta_path.insert(0, Block())
    from edgetune.cli import main
    try:
        main(sys.argv[1:])
    finally:
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        if leaked:
            print("LEAKED " + " ".join(leaked), file=sys.stderr)
            sys.exit(99)
    """
)


def device_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DEVICE_ONLY, *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def llm_bundle(module_tmp, tiny_llama):
    import onnxruntime_genai.models.builder as b

    root = module_tmp("run")
    out = root / "export"
    extra = b.parse_extra_options("", str(tiny_llama), str(out), "fp32", "cpu", str(root / "cache"), [])
    b.create_model("", str(tiny_llama), str(out), "fp32", "cpu", str(root / "cache"), **extra)
    make_bundle(out, root / "bundle", target="cpu-x86", archive=True)
    return root / "bundle"


@pytest.fixture(scope="module")
def encoder_bundle(module_tmp, tiny_bert):
    from edgetune.export.encoder.pipeline import export_encoder

    root = module_tmp("run-enc")
    exp = export_encoder(tiny_bert, root / "export", target="cpu-x86", precision="fp32")
    make_bundle(exp, root / "bundle", target="cpu-x86")
    return root / "bundle"


def test_run_llm_bundle_device_only(llm_bundle):
    r = device_cli("run", str(llm_bundle), "--prompt", "Turn on the lights", "--prompt", "hello", "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [x["prompt"] for x in res["results"]] == ["Turn on the lights", "hello"]
    assert res["load_s"] > 0 and res["providers"][-1] == "cpu"
    assert all(1 <= x["new_tokens"] <= 6 and x["prompt_tokens"] > 3 for x in res["results"])
    assert "[verify] ok" in r.stderr


def test_run_archive_and_chat_device_only(llm_bundle):
    arc = llm_bundle.with_name(llm_bundle.name + ".tar.gz")
    r = device_cli("run", str(arc), "--chat", "-n", "3", "--json", stdin="hi\nand now?\n\nignored\n")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert [x["prompt"] for x in res] == ["hi", "and now?"]
    # the second turn carries the history: its prompt is longer than the first one's
    assert res[1]["prompt_tokens"] > res[0]["prompt_tokens"] + 3


def test_verify_device_only_and_run_refuses_a_tampered_bundle(llm_bundle, tmp_path):
    import shutil

    r = device_cli("verify", str(llm_bundle))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(llm_bundle, bad)
    data = bytearray((bad / "model" / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (bad / "model" / "model.onnx").write_bytes(bytes(data))
    r = device_cli("run", str(bad), "-p", "hi", "-n", "2")
    assert r.returncode == 2 and "model/model.onnx: changed" in r.stderr and r.stdout == ""


def test_run_encoder_bundle_device_only(encoder_bundle):
    r = device_cli("run", str(encoder_bundle), "--text", "win a free prize now", "--text", "see you at lunch", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    labels = json.loads((encoder_bundle / "manifest.json").read_text())["labels"]
    assert len(rows) == 2 and all(x["label"] in labels and 0.0 < x["probability"] <= 1.0 for x in rows)
    r = device_cli("run", str(encoder_bundle), stdin="one\ntwo\nthree\n")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 3


def test_run_wrong_mode_is_bad_input(encoder_bundle, llm_bundle):
    r = device_cli("run", str(encoder_bundle), "--prompt", "hi")
    assert r.returncode == 2 and "encoder" in r.stderr
    r = device_cli("run", str(llm_bundle))
    assert r.returncode == 2 and "--prompt" in r.stderr
