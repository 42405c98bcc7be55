"""The source behind a stage: half of its code identity (``artifacts.code_identity``, in every stage fingerprint),
so an output made by other code is never "up to date".

edgetune's version alone does not say it: a git install, an editable checkout or a patched release keeps "0.1.0"
while the exporter changes (a build kept a stale export as "up to date" after the packing of f3910d7 changed
every GGUF graph). A stage's code identity hashes

* the source of the edgetune modules the stage can run: the import closure of its entry modules, read from their
  syntax trees (every ``import`` in a module, function-level ones included, so lazy imports count, and every string
  that names an edgetune module: ``importlib.import_module("edgetune....")``, a worker run as ``-m edgetune....``), and
* the versions of the libraries that shape artifacts (``artifacts.TRACKED_PACKAGES``, from package metadata).

The closure over-approximates (a module imported by one branch counts for all), never under: editing bundle.py
re-runs the bundle stage, not the fine-tune. A stage kind missing from ``STAGE_CODE`` takes the whole package.
Nothing here imports the modules it hashes (the device side may lack torch); parsing them costs ~0.3 s once
per process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# stage kind (a stage id up to its first '.' or '-': "export.cpu-x86" -> export, "finetune-float" -> finetune,
# "gguf-import" -> gguf) -> the modules whose code makes its output
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "finetune": ("edgetune.finetune",),
    "merge": ("edgetune.merge",),
    "task": ("edgetune.build.stages",),
    "export": ("edgetune.export", "edgetune.recipes"),
    "quantize": ("edgetune.export",),
    "validate": ("edgetune.validate",),
    "bundle": ("edgetune.bundle",),
    "gguf": ("edgetune.model_input",),
}


_MODULE_NAME = re.compile(r"edgetune(\.[A-Za-z_][A-Za-z0-9_]*)+")


def stage_kind(stage: str) -> str:
    return re.split(r"[.-]", stage, maxsplit=1)[0]


def _module_file(root: Path, name: str) -> Path | None:
    p = root.joinpath(*name.split(".")[1:])
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _imports(name: str, source: Path) -> frozenset[str]:
    """The edgetune modules ``source`` (module ``name``) imports anywhere; ``from x import y`` names x and x.y (y
    may be a module)."""
    st = source.stat()
    return _parsed_imports(name, source, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _parsed_imports(name: str, source: Path, _mtime_ns: int, _size: int) -> frozenset[str]:
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_bytes(), filename=str(source))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "edgetune")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "edgetune":
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value) \
                and name != __name__:  # (this module's table names modules as data)
            found.add(node.value)  # importlib.import_module("edgetune.export.encoder.pipeline"), `-m edgetune.finetune.worker`
    return frozenset(found)


def closure(entries: tuple[str, ...], root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """The edgetune modules ``entries`` can run (module name -> file): their imports, transitively, and every
    parent package (its ``__init__`` runs first)."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        source = _module_file(root, name)
        if source is None:  # a name imported from a module (a function), not a module
            continue
        seen[name] = source
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imports(name, source))
    return seen


def source_hash(stage: str, root: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the names and bytes of the modules of ``stage``'s kind (the whole package for unknown kinds)."""
    entries = STAGE_CODE.get(stage_kind(stage))
    files = closure(entries, root) if entries else {
        "edgetune." + ".".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.py")}
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name].read_bytes()).digest())
    return h.hexdigest()
