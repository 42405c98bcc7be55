"""Defensive readers for the files a model folder or bundle loads (device side).

A bundle's ``tokenizer.json``, ``genai_config.json``, ``config.json`` and ``tokenizer_config.json``
are parsed here before any library or native code uses them. A truncated, non-UTF-8, absurdly
nested (200,000 levels) or wrongly shaped file is BadInput (exit 2) naming the file, never an
internal error: the tokenizers library says only "recursion limit exceeded" or "EOF while
parsing", and onnxruntime-genai parses the same files again in native code.

Device-only imports: the standard library and tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import BadInput, MissingDependency

_HINT = "the file is damaged or was modified; re-export the model (or copy the bundle again)"


def read_json(path: str | Path, *, kind: str = "JSON", object_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``path``; BadInput naming the file when it is not one.

    ``object_keys``: keys whose values must be JSON objects too (e.g. ``model`` in genai_config.json).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except RecursionError:
        raise BadInput(f"{p}: {kind} file nested too deeply to be read", hint=_HINT) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{p}: {kind} file is not UTF-8 text ({exc.reason} at byte {exc.start})", hint=_HINT) from exc
    except ValueError as exc:  # json.JSONDecodeError
        detail = exc.args[0] if exc.args else str(exc)
        raise BadInput(f"{p}: {kind} file is not valid JSON ({str(detail)[:160]})", hint=_HINT) from exc
    if not isinstance(data, dict):
        raise BadInput(f"{p}: {kind} file is not a JSON object (found {type(data).__name__})", hint=_HINT)
    for key in object_keys:
        if not isinstance(data.get(key), dict):
            raise BadInput(f"{p}: {kind} file has no '{key}' object", hint=_HINT)
    return data


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, checked as JSON first; BadInput naming the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise MissingDependency("tokenizers is not installed", hint="pip install tokenizers") from exc
    p = Path(path)
    read_json(p, kind="tokenizer")  # truncation and absurd nesting, with a clear message
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BadInput(f"{p}: tokenizer file cannot be loaded ({detail})", hint=_HINT) from exc


# what onnxruntime-genai's tokenizer reads next to tokenizer.json (in native code)
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer(folder: str | Path) -> None:
    """Parse ``folder/tokenizer.json`` and its side files (when present) before native code reads them."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        load_tokenizer(folder / "tokenizer.json")
    for name in TOKENIZER_SIDE_FILES:
        if (folder / name).is_file():
            read_json(folder / name, kind=name.removesuffix(".json").replace("_", " "))


__all__ = ["read_json", "load_tokenizer", "check_tokenizer"]
