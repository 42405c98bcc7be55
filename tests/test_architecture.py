"""The shape of the code: import direction and the one quantization table (issue 32).

Imports are read from the source (``ast``), top-level and inside functions alike: a lazy import is
still a dependency. Nodes are edgetune's sub-packages (``edgetune.export.decoder``, ``edgetune.finetune``, ...)
and its top-level modules (``edgetune.merge``, ``edgetune.quant``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "edgetune"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> edgetune modules it imports (relative and absolute, at any depth of the file)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[mod] |= {t for t in targets if t in mods and t != mod}
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _node(mod: str) -> str:
    """The package a module belongs to, at any depth (``edgetune.export.decoder.builder`` -> ``edgetune.export.decoder``,
    ``edgetune.build.runner`` -> ``edgetune.build``), or the top-level module itself."""
    parts = mod.split(".")
    depth = 1
    while depth < len(parts) and PKG.joinpath(*parts[1:depth + 1]).is_dir():
        depth += 1
    return ".".join(parts[:depth]) if depth > 1 else mod


def test_no_import_cycle_between_packages_and_top_level_modules():
    """finetune <-> the decoder export (qat imported its quantize, its dispatcher imported finetune.qat) was one."""
    graph: dict[str, set[str]] = {}
    for mod, targets in _imports(_modules()).items():
        graph.setdefault(_node(mod), set()).update(_node(t) for t in targets if _node(t) != _node(mod))
    assert _cycles(graph) == []


def test_no_import_cycle_between_files():
    """The last one was the decoder export: export/decoder/dispatch.py and its variants (adapters, float_adapter,
    gguf_export) imported each other. Now export -> variants -> builder (the core), one way."""
    assert _cycles(_imports(_modules())) == []


def test_the_export_core_knows_no_variant():
    """export/decoder/builder.py is what the variants build on: it imports none of them, nor the dispatcher."""
    graph = _imports(_modules())
    variants = {"edgetune.export.decoder.dispatch", "edgetune.export.decoder.adapters", "edgetune.export.decoder.float_adapter", "edgetune.export.decoder.gguf_export"}
    assert not graph["edgetune.export.decoder.builder"] & variants
    assert {"edgetune.export.decoder.adapters", "edgetune.export.decoder.float_adapter", "edgetune.export.decoder.gguf_export", "edgetune.export.decoder.builder"} <= \
        graph["edgetune.export.decoder.dispatch"]


def test_device_code_never_imports_host_stages():
    graph = _imports(_modules())
    host = ("edgetune.export", "edgetune.finetune", "edgetune.merge", "edgetune.build", "edgetune.recipes",
            "edgetune.model_input", "edgetune.validate.reference")
    for mod, targets in graph.items():
        if mod.startswith("edgetune.device"):
            assert not [t for t in targets if t.startswith(host)], mod


# the pipeline's stages in order: a stage may use an earlier one (validate reads exports), never a later one
STAGES = ("edgetune.finetune", "edgetune.merge", "edgetune.export", "edgetune.validate", "edgetune.bundle")


def _stage(mod: str) -> int | None:
    return next((i for i, s in enumerate(STAGES) if mod == s or mod.startswith(s + ".")), None)


def test_no_stage_imports_a_later_stage():
    """finetune -> merge -> export -> validate -> bundle, one way (``build`` and ``recipes`` compose stages and sit
    above them). The last back-arrow was the recipe search inside the decoder export, which imported validate."""
    back = [f"{mod} -> {t}" for mod, targets in _imports(_modules()).items() if _stage(mod) is not None
            for t in targets if _stage(t) is not None and _stage(t) > _stage(mod)]
    assert back == []


def test_the_tree_reads_as_the_pipeline():
    """A home per stage: each stage is one package or module under its own name, and no other module is named like
    a stage's part (no top-level llm/encoder/seq2seq/reference beside export and validate)."""
    for stage in STAGES:
        name = stage.split(".")[1]
        assert (PKG / name).is_dir() or (PKG / f"{name}.py").is_file(), stage
    for gone in ("llm", "encoder", "seq2seq", "reference.py", "validate_translation.py", "models.py", "build_config.py"):
        assert not (PKG / gone).exists(), gone


# ---------------------------------------------------------------------------- the quantization table

def test_quantization_choices_come_from_the_table():
    """The CLI, the profile schema and the export's checks offer exactly the table's choices."""
    from typing import get_args

    import click

    from edgetune import quant
    from edgetune.commands.export import export
    from edgetune.commands.finetune import finetune
    from edgetune.targets import Int4, Precision

    def choices(cmd: click.Command, name: str) -> tuple:
        return tuple(next(p for p in cmd.params if p.name == name).type.choices)

    assert choices(export, "int4_algorithm") == tuple(quant.INT4_ALGORITHMS)
    assert choices(export, "precision") == quant.EXPORT_PRECISIONS
    assert choices(export, "int4_lm_head") == quant.LM_HEADS == choices(finetune, "quant_aware_lm_head")
    assert tuple(int(b) for b in choices(export, "int4_block_size")) == quant.BLOCK_SIZES
    assert choices(finetune, "quant_aware") == quant.QAT_SCHEMES
    assert get_args(Int4.model_fields["algorithm"].annotation) == tuple(quant.INT4_ALGORITHMS)
    assert get_args(Int4.model_fields["block_size"].annotation) == quant.BLOCK_SIZES
    assert get_args(Int4.model_fields["accuracy_level"].annotation) == quant.ACCURACY_LEVELS
    assert get_args(Int4.model_fields["lm_head"].annotation) == quant.LM_HEADS
    assert get_args(Precision.model_fields["llm"].annotation) == quant.LLM_PRECISIONS
    assert get_args(Precision.model_fields["encoder"].annotation) == quant.ENCODER_PRECISIONS


def test_the_quantization_choices_are_spelled_out_once():
    """No other product file lists the int4 algorithms or the lm_head choices literally."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "quant.py":
            continue
        text = path.read_text()
        for literal in ('"inc-gptq", "inc-awq"', '("int4", "int8", "fp32")', '["int4", "int8", "fp32"]', '"rtn", "k_quant"',
                        '"int8-dynamic", "int8-static"', '"planes", "int8"'):
            if literal in text:
                offenders.append(f"{path.relative_to(PKG)}: {literal}")
    assert offenders == []


@pytest.mark.parametrize("name", ["inc-awq", "inc-autoround", "no-such-algorithm"])
def test_unavailable_and_unknown_algorithms_are_exit_2_from_the_table(name):
    from edgetune import quant
    from edgetune.errors import BadInput

    with pytest.raises(BadInput) as exc:
        quant.int4_algorithm(name)
    if name in quant.INT4_ALGORITHMS:
        assert exc.value.message == quant.INT4_ALGORITHMS[name].refusal[0]
    else:
        assert "unknown int4 algorithm" in exc.value.message and "inc-autoround" not in exc.value.hint


def test_traits_drive_the_export_checks(tiny_llama, tmp_path):
    """An asymmetric-only algorithm asked for symmetric, int8 from a non-builder algorithm, an lm_head the
    algorithm cannot keep: each refused from its table entry before any work."""
    from edgetune.errors import BadInput
    from edgetune.plan import int4_options
    from edgetune.export.decoder.dispatch import export_llm
    from edgetune.targets import load_target

    t = load_target("cpu-x86")
    with pytest.raises(BadInput, match="asymmetric by construction"):
        int4_options(t, {"algorithm": "hqq", "symmetric": True})
    with pytest.raises(BadInput, match="quantizes lm_head to int4"):
        int4_options(t, {"algorithm": "gptq", "lm_head": "int8"})
    with pytest.raises(BadInput, match=r"int8 is made by the builder \(rtn or k_quant\)"):
        export_llm(tiny_llama, tmp_path / "x", target="cpu-x86", precision="int8", int4={"algorithm": "awq"})
    assert not (tmp_path / "x").exists()


def test_onnx_files_are_read_and_written_in_one_place():
    """``edgetune/onnx_graph.py`` reads and writes every ONNX file and indexes graphs (producers, consumers,
    constants): no other product file calls onnx's load/save or builds its own producer or consumer map
    (there were ~37 loads in 13 files and three private graph helpers)."""
    import re

    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "onnx_graph.py":
            continue
        text = path.read_text()
        for pattern in (r"\bonnx\.(load|save|load_model|save_model)\(", r"\{o: \w+ for \w+ in [\w.]+ for o in \w+\.output\}",
                        r"\.setdefault\(\w+, \[\]\)\.append\(n\)"):
            offenders += [f"{path.relative_to(PKG)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_the_targets_readme_names_every_profile_field():
    """targets/README.md is the profile schema a user reads: every field of every table is named there (it had fallen
    five fields behind the code: recipe, lm_head, int8_block_size ...)."""
    from pydantic import BaseModel

    from edgetune.targets import Target

    text = (PKG.parent / "targets" / "README.md").read_text()
    missing = []

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")
            elif name != "source" and f"`{name}`" not in text:  # (source: set by the loader, not written)
                missing.append(prefix + name)

    walk(Target)
    assert not missing, f"targets/README.md does not name {missing}"
