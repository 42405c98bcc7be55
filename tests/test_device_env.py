"""The device side in a REAL device environment: a second venv with only the base install.

`make test` (and so `.ci/run`) builds ``.venv-device`` first: ``pip install -c constraints.txt .``
of a clean copy of this checkout, non-editable and without the ``[host]`` extra, so torch and
transformers are not installed there at all (not merely blocked by an import hook, which cannot
catch a module that only works because the host venv happened to import something first).
The host side of this test session makes the bundles (tiny random models); every command then
runs as ``.venv-device/bin/edgetune`` - the console script a device runs - in a scrubbed
environment (no PYTHONPATH, no user site, cwd outside the checkout).

Without ``.venv-device`` these tests skip, except in CI (``CI=true``, set by ``.ci/run``), where a
missing device venv is a failure. ``EDGETUNE_DEVICE_VENV`` points them at another venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

VENV = Path(os.environ.get("EDGETUNE_DEVICE_VENV") or ROOT / ".venv-device")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
HOST_ONLY = ("torch", "transformers", "optimum", "peft", "accelerate", "bitsandbytes", "neural_compressor", "deepspeed")
TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France. "
    "Edge devices run small language models with int4 weights. Turn on the kitchen lights. "
) * 12


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "EDGETUNE_"))}
    env.update(PYTHONNOUSERSITE="1", HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               EDGETUNE_CACHE=str(home / "cache"), PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


class Device:
    """Runs commands inside the device venv."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.env = _clean_env(workdir)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV / "bin" / "python"), "-I", "-c", code], capture_output=True, text=True,
                              cwd=self.workdir, env=self.env, timeout=120)

    def edgetune(self, *args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV / "bin" / "edgetune"), *map(str, args)], capture_output=True, text=True,
                              input=stdin, cwd=self.workdir, env=self.env, timeout=timeout)

    def json(self, *args: str) -> tuple[subprocess.CompletedProcess, object]:
        p = self.edgetune(*args, "--json")
        assert p.returncode == 0, f"edgetune {' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr}"
        return p, json.loads(p.stdout)


def _stale_files(installed: Path) -> list[str]:
    """Package files whose installed copy differs from this checkout (or is missing)."""
    stale = []
    for src in sorted((ROOT / "edgetune").rglob("*.py")):
        rel = src.relative_to(ROOT / "edgetune")
        dst = installed / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            stale.append(str(rel))
    return stale


@pytest.fixture(scope="session")
def device(tmp_path_factory) -> Device:
    if not (VENV / "bin" / "edgetune").is_file():
        msg = f"device venv {VENV} not found: run `make device-venv` (a base-only `pip install .`)"
        if IN_CI:
            pytest.fail(msg + " - required in CI")
        pytest.skip(msg)
    dev = Device(tmp_path_factory.mktemp("device-home"))
    p = dev.python("import edgetune, importlib.util as u, json; "
                   f"print(json.dumps({{'file': edgetune.__file__, 'host': [m for m in {HOST_ONLY!r} if u.find_spec(m)]}}))")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    installed = Path(info["file"]).parent
    # the venv must prove the base install alone: no host package may be importable there
    assert info["host"] == [], f"host packages are installed in the device venv: {info['host']}"
    stale = _stale_files(installed)
    if stale:
        pytest.fail(f"the device venv's edgetune ({installed}) is not this checkout's ({', '.join(stale[:5])} differ): "
                    "run `make device-venv`")
    return dev


@pytest.fixture(scope="module")
def llm_bundle(module_tmp, tiny_llama) -> Path:
    """Host side: fp32 export of the tiny Llama, validated against the PyTorch model (the report
    holds the reference pack), bundled with that report, plus its reproducible .tar.gz."""
    import onnxruntime_genai.models.builder as b

    from edgetune.bundle import make_bundle
    from edgetune.validate import validate

    root = module_tmp("device-llm")
    export = root / "export"
    extra = b.parse_extra_options("", str(tiny_llama), str(export), "fp32", "cpu", str(root / "cache"), [])
    b.create_model("", str(tiny_llama), str(export), "fp32", "cpu", str(root / "cache"), **extra)
    (root / "eval.txt").write_text(TEXT)
    (root / "prompts.txt").write_text("Hello\nTurn on the lights\n")
    validate(export, target="cpu-x86", reference=tiny_llama, data=root / "eval.txt", prompts=root / "prompts.txt",
             out=root / "report", latency=False, window=64, stride=32, max_tokens=6)
    make_bundle(export, root / "bundle", target="cpu-x86", report=root / "report", archive=True)
    return root / "bundle"


@pytest.fixture(scope="module")
def encoder_bundle(module_tmp, tiny_bert) -> Path:
    from edgetune.bundle import make_bundle
    from edgetune.export.encoder.pipeline import export_encoder

    root = module_tmp("device-enc")
    exp = export_encoder(tiny_bert, root / "export", target="cpu-x86", precision="fp32")
    make_bundle(exp, root / "bundle", target="cpu-x86")
    return root / "bundle"


def test_device_venv_is_a_base_install(device):
    """Non-editable, outside the checkout, no host packages; the base runtime imports."""
    p = device.python("import edgetune, onnxruntime, onnxruntime_genai, tokenizers, numpy; print(edgetune.__file__)")
    assert p.returncode == 0, p.stderr
    where = Path(p.stdout.strip()).resolve()
    assert str(VENV.resolve()) in str(where) and "site-packages" in where.parts, where
    for name in ("torch", "transformers"):
        p = device.python(f"import {name}")
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, f"{name} is importable on the device"


# README "Device footprint": the goal for the whole base venv (pip and setuptools included).
FOOTPRINT_GOAL_MIB = 300


def test_device_venv_footprint_within_goal(device):
    """Catches a heavy package slipping into the base install (sizes are deterministic for the pins)."""
    total = sum(f.stat().st_size for f in VENV.rglob("*") if f.is_file() and not f.is_symlink())
    mib = total / 2**20
    assert mib <= FOOTPRINT_GOAL_MIB, f"the device venv is {mib:.0f} MiB, over the README goal of {FOOTPRINT_GOAL_MIB} MiB"


def test_help_lists_every_command(device):
    from edgetune.cli import COMMANDS

    p = device.edgetune("--help")
    assert p.returncode == 0, p.stderr
    for name in COMMANDS:
        assert f"  {name}" in p.stdout, f"{name} missing from --help"
    for name in ("run", "verify", "finetune"):  # subcommand help loads the command's module
        p = device.edgetune(name, "--help")
        assert p.returncode == 0 and "Usage: edgetune " + name in p.stdout, p.stderr


def test_targets_list_finds_the_installed_profiles(device):
    _, rows = device.json("targets", "list")
    names = {r["name"] for r in rows}
    assert {"cpu-x86", "cpu-arm64", "gpu-cuda", "fpga-vitisai"} <= names
    # a regular install reads them from <venv>/share/edgetune/targets, not from this checkout
    assert all(Path(r["source"]).resolve().is_relative_to(VENV.resolve()) for r in rows), rows[0]["source"]


def test_doctor_reports_what_this_device_can_run(device):
    _, r = device.json("doctor")
    assert r["host_extra_installed"] is False and r["versions"]["torch"] is None
    assert "CPUExecutionProvider" in r["execution_providers"]
    assert r["onnxruntime_genai"]["available"] is True
    runnable = {t["name"] for t in r["targets"] if t["runs_here"]}
    assert "cpu-arm64" not in runnable or r["machine"]["machine"] in ("aarch64", "arm64")
    assert {"cpu-x86", "cpu-arm64"} & runnable  # the CPU provider is always present
    assert not {t["name"] for t in r["targets"] if t["name"].startswith("gpu-")} & runnable or "CUDAExecutionProvider" in r["execution_providers"]
    hosts = {c["command"]: c for c in r["commands"]}
    for name in ("finetune", "merge", "export", "build"):
        assert hosts[name]["available"] is False and "torch" in hosts[name]["missing"], hosts[name]
    for name in ("run", "verify", "validate", "profile", "bundle"):
        assert hosts[name]["available"] is True, hosts[name]
    p = device.edgetune("doctor")
    assert p.returncode == 0
    assert "not available on this machine" in p.stdout and "finetune" in p.stdout and "pip install" in p.stdout


def test_verify_folder_and_archive(device, llm_bundle, tmp_path):
    p = device.edgetune("verify", llm_bundle)
    assert p.returncode == 0 and p.stdout.startswith("ok: ") and "decoder" in p.stdout, p.stderr
    arc = llm_bundle.with_name(llm_bundle.name + ".tar.gz")
    _, r = device.json("verify", arc)
    assert r["ok"] is True and r["files_checked"] >= 5 and r["kind"] == "decoder"
    bad = tmp_path / "bad"
    shutil.copytree(llm_bundle, bad)
    with open(bad / "model" / "genai_config.json", "a") as f:
        f.write(" ")
    p = device.edgetune("verify", bad)
    assert p.returncode == 2 and "model/genai_config.json" in p.stderr


def test_run_llm_bundle(device, llm_bundle):
    _, r = device.json("run", llm_bundle, "-p", "Turn on the lights", "-p", "hi", "-n", "5")
    assert [x["prompt"] for x in r["results"]] == ["Turn on the lights", "hi"]
    assert all(1 <= x["new_tokens"] <= 5 and x["prompt_tokens"] > 3 and isinstance(x["output"], str) for x in r["results"])
    p = device.edgetune("run", llm_bundle.with_name(llm_bundle.name + ".tar.gz"), "-p", "hi", "-n", "3")
    assert p.returncode == 0 and "[verify] ok" in p.stderr and "[run] loaded" in p.stderr, p.stderr


def test_validate_against_the_bundled_reference_pack(device, llm_bundle, tmp_path):
    pack = llm_bundle / "validation" / "reference"
    assert (pack / "reference.json").is_file()
    _, r = device.json("validate", llm_bundle, "-t", llm_bundle / "target.toml", "-r", pack, "-o", tmp_path / "rep", "-q",
                       "--repeats", "1", "--max-tokens", "4", "--prompt-tokens", "8")
    acc = r["accuracy"]
    # the fp32 export against the PyTorch model it came from: same greedy tokens, same perplexity
    assert r["passed"] is True and acc["top1_agreement"] == 1.0 and acc["generation_agreement"] == 1.0
    assert abs(acc["perplexity_increase_pct"]) < 0.01 and r["latency"]["decode_tokens_per_s"]["p50"] > 0
    assert r["reference"]["computed_with"] and (tmp_path / "rep" / "report.json").is_file()
    # a bundle given no target and no reference: the target.toml and the pack it carries, the same figures
    p = device.edgetune("validate", str(llm_bundle), "-o", str(tmp_path / "own"), "--json", "--repeats", "1",
                        "--max-tokens", "4", "--prompt-tokens", "8")
    assert p.returncode == 0, p.stderr
    own = json.loads(p.stdout)
    assert "[validate] target: the bundle's own (target.toml)" in p.stderr and "the bundle's reference pack" in p.stderr
    assert own["target"]["name"] == r["target"]["name"] and own["passed"] is True
    assert {k: own["accuracy"][k] for k in ("perplexity", "top1_agreement", "generation_agreement")} == \
        {k: acc[k] for k in ("perplexity", "top1_agreement", "generation_agreement")}
    # the archive as it was shipped: unpacked, checked against its manifest, the same figures; the report names it
    arc = llm_bundle.with_name(llm_bundle.name + ".tar.gz")
    p = device.edgetune("validate", str(arc), "-o", str(tmp_path / "arc"), "--json", "--repeats", "1", "--max-tokens", "4",
                        "--prompt-tokens", "8")
    assert p.returncode == 0, p.stderr
    packed = json.loads(p.stdout)
    assert "files match the manifest" in p.stderr and packed["model"]["path"] == str(arc)
    assert packed["accuracy"]["perplexity"] == acc["perplexity"] and packed["passed"] is True
    # an export carries no target: one line naming the option
    p = device.edgetune("validate", str(llm_bundle / "model"), "--no-latency")
    assert p.returncode == 2 and p.stderr.startswith("error: validate needs --target:") and "Traceback" not in p.stderr


def test_profile_llm_bundle(device, llm_bundle):
    _, r = device.json("profile", llm_bundle, "-t", "cpu-x86", "--repeats", "1", "--prompt-tokens", "8", "--decode-steps", "2")
    assert r["session_providers"][0] == "CPUExecutionProvider" and r["total_ms"] > 0
    assert r["top_op_types"] and r["fallback_nodes"] == 0
    _, own = device.json("profile", llm_bundle, "--repeats", "1", "--prompt-tokens", "8", "--decode-steps", "2")  # its target.toml
    assert own["target"] == r["target"] and own["total_ms"] > 0
    arc = llm_bundle.with_name(llm_bundle.name + ".tar.gz")
    _, packed = device.json("profile", arc, "--repeats", "1", "--prompt-tokens", "8", "--decode-steps", "2")
    assert packed["target"] == r["target"] and packed["model"] == str(arc) and packed["total_ms"] > 0


def test_run_encoder_bundle(device, encoder_bundle):
    _, r = device.json("run", encoder_bundle, "-x", "win a free prize now", "-x", "see you at lunch")
    labels = json.loads((encoder_bundle / "manifest.json").read_text())["labels"]
    assert [x["text"] for x in r["results"]] == ["win a free prize now", "see you at lunch"]
    assert all(x["label"] in labels and 0.0 < x["probability"] <= 1.0 for x in r["results"])


@pytest.fixture(scope="module")
def ner_model(module_tmp) -> Path:
    from tiny_models import build_tiny_bert_ner

    return build_tiny_bert_ner(module_tmp("tiny-ner"))


def _torch_entities(model_dir: Path, text: str) -> list[tuple[str, str]]:
    """(label, span text) per entity from the PyTorch model: first sub-token of each word, BIO spans."""
    import re

    from edgetune.device.metrics import entities
    from encoder_helpers import torch_word_tags

    words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)]
    tags = torch_word_tags(model_dir, [w for w, _, _ in words])
    return [(lab, text[words[a][1]:words[b - 1][2]]) for lab, a, b in sorted(entities(tags), key=lambda s: s[1])]


def test_run_ner_bundle_prints_the_models_entities(device, ner_model, tmp_path):
    """A token-classification bundle once crashed `run` (exit 4, "truth value of an array is ambiguous")."""
    from edgetune.bundle import make_bundle
    from edgetune.export.encoder.pipeline import export_encoder

    exp = export_encoder(ner_model, tmp_path / "export", target="cpu-x86", precision="fp32")
    bundle = tmp_path / "bundle"
    make_bundle(exp, bundle, target="cpu-x86")
    texts = ["Paris is in France, said Anna Smith.", "the quick brown fox jumps over New York"]
    _, r = device.json("run", bundle, "-x", texts[0], "-x", texts[1])
    assert r["task"] == "token-classification" and [x["text"] for x in r["results"]] == texts
    got = [[(e["label"], e["text"]) for e in x["entities"]] for x in r["results"]]
    assert got == [_torch_entities(ner_model, t) for t in texts]
    assert any(got), "the random head tags nothing: the comparison would prove nothing"
    for t, x in zip(texts, r["results"]):
        for e in x["entities"]:
            assert t[e["start"]:e["end"]] == e["text"] and 0.0 < e["score"] <= 1.0 and e["label"] in ("LOC", "PER")
    human = device.edgetune("run", str(bundle), "-x", texts[0])
    assert human.returncode == 0 and "Traceback" not in human.stderr
    assert all(f"{lab}\t" in human.stdout and span in human.stdout for lab, span in got[0])


def test_run_qa_bundle_prints_the_pytorch_models_span_of_the_context(device, tmp_path):
    """Issue 29: a question-answering bundle answers in the base install: windows over a context longer than one
    graph window, span decoding in numpy; the answers are the PyTorch model's on the same windows."""
    from edgetune.bundle import make_bundle
    from edgetune.export.encoder.pipeline import export_encoder
    from edgetune.validate.reference import build_qa_reference
    from tiny_models import build_tiny_bert_qa, squad_records

    from edgetune.validate import validate

    model = build_tiny_bert_qa(tmp_path / "qa")
    exp = export_encoder(model, tmp_path / "export", target="cpu-x86", precision="fp32")
    recs = [squad_records(long_context_repeats=12)[i] for i in (0, -1)]  # a short context and one of 300+ tokens
    (tmp_path / "squad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    validate(exp, target="cpu-x86", reference=model, data=tmp_path / "squad.jsonl", out=tmp_path / "report", latency=False)
    bundle = tmp_path / "bundle"
    make_bundle(exp, bundle, target="cpu-x86", report=tmp_path / "report", archive=True)
    ref = build_qa_reference(model, recs, max_length=256, stride=85).meta["answers"]  # PyTorch, the device's windows
    args = [a for r in recs for a in ("-Q", r["question"], "-c", r["context"])]
    _, r = device.json("run", bundle.with_name("bundle.tar.gz"), *args)
    assert r["task"] == "question-answering" and [x["question"] for x in r["results"]] == [x["question"] for x in recs]
    assert r["results"][1]["windows"] > 1
    for x, rec, want in zip(r["results"], recs, ref):
        assert x["answer"] and rec["context"][x["start"]:x["end"]] == x["answer"] and 0.0 < x["score"] <= 1.0
        assert (x["answer"], x["start"], x["end"]) == (want["answer"], want["start"], want["end"])
    stdin = "".join(json.dumps({"question": x["question"], "context": x["context"]}) + "\n" for x in recs)
    p = device.edgetune("run", str(bundle), "--json", stdin=stdin)
    assert p.returncode == 0, p.stderr
    assert [x["answer"] for x in json.loads(p.stdout)["results"]] == [x["answer"] for x in r["results"]]
    human = device.edgetune("run", str(bundle), "-Q", recs[0]["question"], "-c", recs[0]["context"])
    assert human.returncode == 0 and "Traceback" not in human.stderr and r["results"][0]["answer"] in human.stdout
    bad = device.edgetune("run", str(bundle), "-x", "hello")
    assert bad.returncode == 2 and "--text is for classifiers and taggers" in bad.stderr
    # the bundled reference pack (PyTorch's answers) re-checked on the device: SQuAD EM/F1, same answers
    _, v = device.json("validate", bundle, "-t", "cpu-x86", "-r", bundle / "validation" / "reference", "-o", tmp_path / "dev-report",
                       "--no-latency")
    assert v["passed"] and v["accuracy"]["agreement_with_reference"] == 1.0 and v["accuracy"]["examples"] == 2
    assert v["accuracy"]["f1"] == v["accuracy"]["reference_f1"] and v["accuracy"]["exact_match"] == v["accuracy"]["reference_exact_match"]


def test_run_translation_bundle_prints_the_pytorch_greedy_translation(device, tmp_path):
    """Issue 29: a translation bundle (encoder + decoder-with-past graphs) translates in the base install: greedy
    decoding in numpy over onnxruntime, tokenizers only; the text is PyTorch's greedy generate of the same model."""
    from transformers import AutoTokenizer

    from edgetune.bundle import make_bundle
    from edgetune.device import seq2seq as S
    from edgetune.export.seq2seq import torch_export as T
    from edgetune.export.seq2seq.pipeline import export_seq2seq
    from edgetune.validate import validate
    from tiny_models import MT_PAIRS, build_tiny_marian, translation_records

    model = build_tiny_marian(tmp_path / "marian")
    exp = export_seq2seq(model, tmp_path / "export", target="cpu-x86", precision="fp32")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in translation_records()[:3]))
    validate(exp, target="cpu-x86", reference=model, data=tmp_path / "pairs.jsonl", out=tmp_path / "report", latency=False)
    bundle = tmp_path / "bundle"
    make_bundle(exp, bundle, target="cpu-x86", report=tmp_path / "report", archive=True)
    texts = [MT_PAIRS[1][0], "Good morning, how are you?"]
    tr = S.load(exp)
    tok = AutoTokenizer.from_pretrained(model)
    ids = T.torch_greedy(T.load(model), [tr.source_ids(t) for t in texts], max_new_tokens=16, suppress=[])
    want = [tok.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert any(want)
    _, r = device.json("run", bundle.with_name("bundle.tar.gz"), *[a for t in texts for a in ("-x", t)], "-n", "16")
    assert r["kind"] == "seq2seq" and [x["translation"] for x in r["results"]] == want
    p = device.edgetune("run", str(bundle), "--json", "-n", "16", stdin="".join(json.dumps({"source": t}) + "\n" for t in texts))
    assert p.returncode == 0, p.stderr
    assert [x["translation"] for x in json.loads(p.stdout)["results"]] == want
    human = device.edgetune("run", str(bundle), "-x", texts[0], "-n", "16")
    assert human.returncode == 0 and "Traceback" not in human.stderr and want[0] in human.stdout
    bad = device.edgetune("run", str(bundle), "-Q", "Who?", "-c", "Anna.")
    assert bad.returncode == 2 and "translation bundle" in bad.stderr
    # chrF/BLEU need sacrebleu, a host package: re-validating on the device is a missing package (exit 3), not a bug
    v = device.edgetune("validate", str(bundle), "-t", "cpu-x86", "-r", str(bundle / "validation" / "reference"),
                        "-o", str(tmp_path / "dev-report"), "--no-latency")
    assert v.returncode == 3 and "sacrebleu" in v.stderr and "Traceback" not in v.stderr


def test_host_only_command_exits_3_naming_the_package(device, tiny_llama, tmp_path):
    """A host command on the device is a missing package (exit 3, the install hint), not a bug."""
    (tmp_path / "d.txt").write_text("hello world\n" * 8)
    p = device.edgetune("finetune", tiny_llama, tmp_path / "d.txt", "-o", tmp_path / "a", "--max-steps", "1")
    assert p.returncode == 3, p.stderr
    assert any(f"'{m}' is not installed" in p.stderr for m in ("torch", "transformers", "peft")), p.stderr
    assert "edgetune[host]" in p.stderr and not (tmp_path / "a").exists()
