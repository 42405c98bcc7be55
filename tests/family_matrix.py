"""The model-family matrix: family x stage -> the test that proves it, or why it is refused or not tested.

The one place the README's "Supported models" table comes from (``render_table``; ``test_family_matrix``
fails when README.md's table differs). The matrix tests (``tests/test_family_matrix.py``) read their
families from here (``families_proven_by``), so a "yes" cell is a test that runs, and a family removed
from a test here is a cell that stops saying "yes".

A cell is ``Yes`` (the tests named prove it; one test at least), ``Refused`` (exit 2 with the reason,
the test that asserts the refusal named) or ``NotTested`` (why, if known). ``test_family_matrix`` checks
that every test a cell names exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Yes:
    tests: tuple[str, ...]  # "test_module::test_function" (parametrized tests: the function)
    note: str = ""  # what exactly is proven, when "yes" alone would say too much or too little

    def __post_init__(self) -> None:
        if not self.tests:
            raise ValueError("a 'yes' cell names the test that proves it")


@dataclass(frozen=True)
class Refused:
    reason: str  # what the README says
    tests: tuple[str, ...]  # the tests that assert the refusal: exit 2, ``match`` in the error
    match: str  # a part of the error message


@dataclass(frozen=True)
class NotTested:
    why: str = ""


Cell = Yes | Refused | NotTested

# the matrix tests (tests/test_family_matrix.py)
PIPELINE = "test_family_matrix::test_whole_pipeline"
AWQ = "test_family_matrix::test_awq_export_bundle_run"
K_QUANT = "test_family_matrix::test_k_quant_export_bundle_run"
DORA = "test_family_matrix::test_dora_finetune_merge_export_run"
QLORA = "test_family_matrix::test_qlora_finetune_and_merge_on_cpu"
FLOAT_ADAPTER = "test_family_matrix::test_float_adapter_export_bundle_run"
RUNTIME_ADAPTER = "test_family_matrix::test_runtime_adapter_export_bundle_run"
# the family export proofs (tests/test_families.py)
EXPORTS = "test_families::test_family_exports_fp32_exactly_past_the_sliding_window_and_int4"

# column key -> header
COLUMNS = {
    "fp32": "fp32 export == PyTorch past the window",
    "int4": "int4 (RTN)",
    "default": "cpu-x86's default recipe (imatrix-gptq, 8-bit v/down/head smoothed, int8 activations)",
    "pipeline": "whole pipeline: LoRA finetune -> merge -> int4 -> validate -> bundle -> run",
    "awq": "AWQ",
    "k_quant": "k_quant",
    "gguf": "GGUF exact transcode",
    "dora": "DoRA finetune -> merge -> int4 -> run",
    "qlora": "QLoRA finetune -> merge (CPU)",
    "float_adapter": "float LoRA over int4 (`--float-adapter`) -> run",
    "runtime_adapter": "runtime LoRA (`--adapter`) -> run",
}

# family -> the layout label of its row
FAMILIES = {
    "llama": "llama (Llama 3.2, SmolLM2)",
    "mistral": "mistral (sliding window)",
    "qwen2": "qwen2",
    "qwen3": "qwen3 (q/k norms)",
    "phi3": "phi3 (Phi-3 / 3.5-mini: fused qkv, gate_up)",
    "phi4-mini": "Phi-4-mini layout (phi3 with partial rotary, LongRoPE)",
    "gemma2": "gemma2 ((1+w) norms, soft-capping, sliding window)",
    "gemma3_text": "gemma3_text (any `layer_types`)",
}

# the families each variant runs on: every family. The exports over the build's models are cheap (1-6 s);
# the fine-tunes over the build's base are 2 steps on the tiny model (DoRA then int4 -> bundle -> run,
# QLoRA on CPU then the merge gate against the 4-bit base), a few seconds each on an idle machine.
ALL = tuple(FAMILIES)
VARIANT_FAMILIES = {
    "awq": ALL,
    "k_quant": ALL,
    "dora": ALL,
    "qlora": ALL,
    "float_adapter": ALL,
    "runtime_adapter": ALL,
}
VARIANT_TESTS = {"awq": AWQ, "k_quant": K_QUANT, "dora": DORA, "qlora": QLORA, "float_adapter": FLOAT_ADAPTER,
                 "runtime_adapter": RUNTIME_ADAPTER}
# which layout a family's variant would follow, for the cells of the families a variant does not run on
_SAME_LAYOUT = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi4-mini": "phi3", "gemma3_text": "gemma2"}

_GGUF = {
    "llama": Yes(("test_gguf_transcode::test_tiny_llama_gguf_end_to_end",
                  "test_gguf_transcode::test_llama3_gguf_keeps_its_rope_scaling",
                  "test_llm_slow::test_gguf_transcode_keeps_the_gguf_weights"),
                 "tiny, and real SmolLM2 Q4_1 in a slow test; Llama 3.1+/3.2's llama3 rope scaling recovered from the GGUF's "
                 "rope_freqs (transformers' loader drops it)"),
    "mistral": Yes(("test_gguf_transcode::test_mistral_gguf_is_llama_cpps_llama_layout_with_an_untied_head_and_head_dim_128",),
                   "llama.cpp writes Mistral as `llama` (no sliding window); untied head, head_dim 128 != hidden/heads"),
    "qwen2": Yes(("test_gguf_transcode::test_qwen2_gguf_with_q_k_v_biases",), "q/k/v biases"),
    "qwen3": Yes(("test_gguf_transcode::test_qwen3_gguf_whose_head_dim_is_not_hidden_over_heads",), "head_dim 128 != hidden/heads"),
    "phi3": Yes(("test_gguf_transcode::test_phi3_gguf_with_fused_qkv_and_gate_up_takes_the_exact_path",),
                "llama.cpp's fused `attn_qkv` / `ffn_up`"),
    "phi4-mini": Yes(("test_gguf_transcode::test_phi4_mini_gguf_keeps_partial_rotary_and_longrope",),
                     "partial rotary and LongRoPE factors read from the GGUF (transformers' loader drops them)"),
    "gemma2": NotTested("no Gemma 2 GGUF on this machine and no tiny Gemma 2 GGUF writer yet (Gemma 3's real GGUF is "
                        "tested)"),
    "gemma3_text": Yes(("test_gemma3_slow::test_gemma3_gguf_reaches_the_device",),
                       "real Gemma 3 270M Q4_K_M (Q4_K/Q5_0/Q6_K/Q8_0, 262k SentencePiece vocabulary) in a slow test"),
}


# AWQ's own tests (tests/test_awq.py): the folds exact in float, and beating RTN on outlier channels
_AWQ_OWN = {
    "llama": ("test_awq::test_awq_export_is_exact_in_float_plain_on_the_kernel_and_beats_rtn",),
    "phi3": ("test_awq::test_awq_on_phi3_fused_qkv_and_gate_up_is_exact_and_beats_rtn",),
    "gemma2": ("test_awq::test_awq_folds_into_gemmas_one_plus_w_norms_exactly",),
    "gemma3_text": ("test_awq::test_awq_folds_into_gemmas_one_plus_w_norms_exactly",),
}


# the variants refused (exit 2) on a family they run on: (family, key) -> (the reason, a part of the error message).
# None since 2026-12-05: Phi-3's LoRA on its packed qkv_proj / gate_up_proj, refused before, is unpacked per part
# (the packed A shared, B's rows of the part) for float and runtime adapters (export/decoder/adapters.py: _unpacked_rows).
REFUSALS: dict[tuple[str, str], tuple[str, str]] = {}


def _variant(family: str, key: str) -> Cell:
    own = _AWQ_OWN.get(family, ()) if key == "awq" else ()
    if (family, key) in REFUSALS:
        reason, match = REFUSALS[family, key]
        return Refused(reason, (VARIANT_TESTS[key],), match)
    if family in VARIANT_FAMILIES[key]:
        fused = {"awq": "fused projections' folds", "float_adapter": "LoRA on the fused qkv / gate_up, per part",
                 "runtime_adapter": "LoRA on the fused qkv / gate_up, per part"}
        return Yes((VARIANT_TESTS[key], *own), fused.get(key, "") if family in ("phi3", "phi4-mini") else "")
    if own:
        return Yes(own, "folds exact in PyTorch; not exported")
    same = _SAME_LAYOUT.get(family)
    if (same, key) in REFUSALS:
        return NotTested(f"refused on {same}, the same layout")
    if same in VARIANT_FAMILIES[key]:
        return NotTested(f"proven on {same}, the same layout")
    return NotTested()


def _row(family: str) -> dict[str, Cell]:
    fp32_note = {"gemma2": "builder 0.18 slides transformers' layers",
                 "gemma3_text": "transformers 5's per-layer-type RoPE flattened for builder 0.18"}.get(family, "")
    pipeline_tests = (PIPELINE, "test_build::test_build_produces_verified_bundle_and_summary",
                      "test_demo_slow::test_demo_bundle_keeps_the_fine_tune") if family == "llama" else \
        (PIPELINE, "test_gemma3_slow::test_gemma3_demo_task_build") if family == "gemma3_text" else (PIPELINE,)
    row: dict[str, Cell] = {
        "fp32": Yes((EXPORTS,), fp32_note),
        "int4": Yes((EXPORTS, PIPELINE)),
        "default": Yes((EXPORTS,), "closer to PyTorch than RTN"),
        "pipeline": Yes(pipeline_tests),
        "gguf": _GGUF.get(family, NotTested()),
    }
    for key in VARIANT_FAMILIES:
        row[key] = _variant(family, key)
    return row


MATRIX: dict[str, dict[str, Cell]] = {family: _row(family) for family in FAMILIES}


def families_proven_by(test: str) -> list[str]:
    """The families whose cells name ``test`` ("test_module::test_function"): the test's parameters (a
    family whose cell is ``Refused`` is one too: the test asserts the refusal)."""
    return [f for f, row in MATRIX.items() if any(test in getattr(c, "tests", ()) for c in row.values())]


def _short(test: str) -> str:
    return test.split("::")[-1] if test.startswith("test_family_matrix::") else test.split("::")[0]


def _names(tests: tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in dict.fromkeys(_short(t) for t in tests))


def render_cell(cell: Cell) -> str:
    if isinstance(cell, Yes):
        return f"yes{', ' + cell.note if cell.note else ''} ({_names(cell.tests)})"
    if isinstance(cell, Refused):
        return f"refused (exit 2): {cell.reason} ({_names(cell.tests)})"
    return f"not tested{': ' + cell.why if cell.why else ''}"


def render_table() -> str:
    """The README's "Supported models" table (markdown, no trailing newline)."""
    lines = ["| family (layout) | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for family, label in FAMILIES.items():
        lines.append(f"| {label} | " + " | ".join(render_cell(MATRIX[family][c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    """The table under README's "## Supported models" heading (its first block of ``|`` lines)."""
    section = readme.split("## Supported models", 1)[1]
    lines, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    return "\n".join(lines)


def write_readme(readme: Path = TESTS.parent / "README.md") -> bool:
    """Replace README's "Supported models" table with the rendered one; whether it changed."""
    text = readme.read_text()
    new = text.replace(readme_table(text), render_table(), 1)
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":  # python tests/family_matrix.py: rewrite README.md's table from the matrix
    print("README.md updated" if write_readme() else "README.md already up to date")
