"""No module of edgetune may rely on a submodule that something else imported first.

The fault this guards against (issue 17): ``import importlib`` and then ``importlib.util.find_spec``
works in the host venv only because some other package has imported ``importlib.util`` already;
in a fresh base install every command died with exit 4. The same holds for ``os``-style
attribute access on any package (``onnxruntime.quantization``, ``xml.etree``, ``email.utils``...).

The scan: for every ``name.attr`` in a module where ``name`` is a module bound by ``import``, and
``name.attr`` is itself a submodule that the file never imports explicitly, a fresh interpreter
checks that ``import name`` alone provides ``attr``. Static, then one small subprocess per package.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _attribute_uses(root: Path) -> dict[tuple[str, str], list[str]]:
    """(module, attr) -> where, for ``module.attr`` not imported explicitly in that file."""
    uses: dict[tuple[str, str], list[str]] = {}
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        bound: dict[str, str] = {}
        explicit: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    explicit.add(a.name)
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                explicit.add(node.module)
                explicit.update(f"{node.module}.{a.name}" for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                mod = bound[node.value.id]
                if f"{mod}.{node.attr}" not in explicit:
                    uses.setdefault((mod, node.attr), []).append(f"{f.relative_to(root)}:{node.lineno}")
    return uses


def _package_dirs(module: str) -> list[Path]:
    """Folders of package ``module`` found without importing it (or [] if not a package / not installed)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top) if top not in sys.modules else sys.modules[top].__spec__
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = [Path(p) for p in spec.submodule_search_locations]
    for part in rest:
        dirs = [d / part for d in dirs if (d / part).is_dir()]
    return dirs


def _is_submodule(dirs: list[Path], attr: str) -> bool:
    return any((d / attr).is_dir() or (d / f"{attr}.py").is_file() or any(d.glob(f"{attr}.*.so")) for d in dirs)


def test_scanner_finds_the_original_fault(tmp_path):
    (tmp_path / "m.py").write_text("import importlib\nimport os.path\ndef f():\n    return importlib.util.find_spec('x'), os.path.sep\n")
    uses = _attribute_uses(tmp_path)
    assert ("importlib", "util") in uses and ("os", "path") not in uses


def test_no_module_relies_on_an_implicitly_imported_submodule():
    candidates: dict[str, dict[str, list[str]]] = {}
    for (mod, attr), where in _attribute_uses(ROOT / "edgetune").items():
        if mod.split(".")[0] == "edgetune":
            continue
        dirs = _package_dirs(mod)
        if dirs and _is_submodule(dirs, attr):
            candidates.setdefault(mod, {})[attr] = where
    faults = []
    for mod, attrs in sorted(candidates.items()):
        # -S: no site, so no .pth file runs first (the host venv's setuptools/editable .pth files
        # import importlib.util at start-up, which is exactly what hid the original fault).
        code = (f"import sys; sys.path[:] = {sys.path!r}\nimport {mod}, json\n"
                f"print(json.dumps([a for a in {sorted(attrs)!r} if not hasattr({mod}, a)]))")
        p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        faults += [f"{mod}.{a} used at {', '.join(attrs[a][:3])} without `import {mod}.{a}`" for a in json.loads(p.stdout)]
    assert not faults, "\n".join(faults)
