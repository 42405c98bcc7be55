"""The device runner and validation against a stored pack work without torch/transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent(
    """
    import sys
    class Block:
        BLOCKED = ("torch", "transformers", "optimum", "peft", "accelerate", "safetensors.torch")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED or name in self.BLOCKED:
                raise ImportError(f"blocked on the device: {name}")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_blocker_really_blocks():
    p = _run("import torch")
    assert p.returncode != 0 and "blocked on the device: torch" in p.stderr


def test_device_modules_import_without_torch():
    p = _run(
        """
        import edgetune.device.llm, edgetune.device.encoder, edgetune.device.metrics, edgetune.device.measure
        import edgetune.device.report, edgetune.device.bench, edgetune.validate, edgetune.validate.reference, edgetune.profiling
        import edgetune.commands.validate, edgetune.commands.profile
        import sys
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules), "torch leaked"
        print("ok")
        """
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_validate_against_pack_runs_without_torch(tmp_path, tiny_llama):
    """Build a pack on the host (torch), then validate on a 'device' where torch cannot be imported."""
    from test_validate import TEXT, genai_export

    from edgetune.validate.reference import build_decoder_reference

    fp32 = genai_export(tiny_llama, tmp_path / "fp32")
    build_decoder_reference(tiny_llama, TEXT, window=64, stride=32, max_new_tokens=6, prompts=["Hello"]).save(tmp_path / "pack")
    p = _run(
        f"""
        import json
        from edgetune.cli import main
        main(["validate", {str(fp32)!r}, "-t", "cpu-x86", "-r", {str(tmp_path / "pack")!r}, "--json", "-q",
              "--repeats", "1", "--max-tokens", "4", "--prompt-tokens", "8", "-o", {str(tmp_path / "rep")!r}])
        """
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["passed"] and r["accuracy"]["top1_agreement"] == 1.0 and r["accuracy"]["generation_agreement"] == 1.0
    assert abs(r["accuracy"]["perplexity_increase_pct"]) < 0.01 and r["latency"]["decode_tokens_per_s"]["p50"] > 0
