"""The example build configs parse, and the CMake / Makefile integrations build a real bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.build import load_config
from edgetune.bundle import verify
from edgetune.targets import load_target

from test_build import write_config

REPO = Path(__file__).resolve().parent.parent
EDGETUNE = Path(sys.executable).parent / "edgetune"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples").glob("*.toml")))
def test_example_configs_are_valid(name):
    cfg, root = load_config(REPO / "examples" / name)
    assert root == REPO / "examples"
    for t in cfg.targets:
        load_target(root / t.name if t.name.endswith(".toml") else t.name)
        if t.calibration:
            assert (root / t.calibration).is_file()
    assert (root / cfg.validation.data).exists() or "shared/data" in cfg.validation.data
    if cfg.data.train and "shared/data" not in cfg.data.train:
        assert (root / cfg.data.train).is_file()
    if cfg.validation.prompts:
        assert (root / cfg.validation.prompts).is_file()


def test_make_demo_runs_the_default_config():
    text = (REPO / "Makefile").read_text()
    assert "edgetune build examples/smollm2-lora-cpu.toml" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_example_builds_and_installs_a_verified_bundle(tmp_path, tiny_llama):
    cfg = write_config(tmp_path / "cfg", tiny_llama)
    bld, prefix = tmp_path / "cmake-build", tmp_path / "prefix"
    run = lambda *a: subprocess.run(a, capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run("cmake", "-S", str(REPO / "examples" / "cmake"), "-B", str(bld), f"-DEDGETUNE_CONFIG={cfg}",
            f"-DEDGETUNE_EXECUTABLE={EDGETUNE}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("cmake", "--build", str(bld))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run("cmake", "--install", str(bld), "--prefix", str(prefix))
    assert r.returncode == 0, r.stdout + r.stderr
    installed = prefix / "share" / "edgetune_bundle_example" / "models" / "cpu-x86"
    res = verify(installed)
    assert res["ok"] and res["kind"] == "decoder" and res["files_checked"] >= 8
    # a second build is a no-op for edgetune (every stage skipped)
    r = run(str(EDGETUNE), "build", str(cfg), "--output", str(bld / "edgetune"), "--json", "--quiet")
    assert r.returncode == 0 and json.loads(r.stdout)["skipped_all"]
