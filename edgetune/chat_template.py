"""Chat templates are rendered once in the Jinja sandbox when a model comes in (host side).

A model's chat template (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``,
from an HF folder or rebuilt from a GGUF's ``tokenizer.chat_template``) is Jinja code that
fine-tuning renders through transformers' sandbox and ``edgetune run`` through onnxruntime-genai.
A template that fails there (a sandbox escape attempt is a ``SecurityError``, a broken one a
``TemplateSyntaxError``/``UndefinedError``) used to surface as exit 4 at finetune or run time and
was copied unchecked by export and bundle. :func:`check_folder` renders each template once, on a
short sample conversation, in the sandbox transformers uses (rebuilt from jinja2), and refuses a failing one with
BadInput (exit 2) naming the file and the template error. Without jinja2 (a device-only install)
nothing is checked here; ``run`` maps a failing template to exit 2 itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BadInput

SAMPLE = [{"role": "user", "content": "Turn on the lights."}, {"role": "assistant", "content": "Done."},
          {"role": "user", "content": "Thanks!"}]


def templates(folder: str | Path) -> list[tuple[str, str]]:
    """(where, template text) of every chat template a model folder carries."""
    folder = Path(folder)
    out: list[tuple[str, str]] = []
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        out.append((str(jinja), jinja.read_text(encoding="utf-8")))
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        from .device.files import read_json

        cfg = read_json(cfg_path, kind="tokenizer config")
        tpl = cfg.get("chat_template")
        if isinstance(tpl, str):
            out.append((f"{cfg_path} (chat_template)", tpl))
        elif isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
            for item in tpl:
                if isinstance(item, dict) and isinstance(item.get("template"), str):
                    out.append((f"{cfg_path} (chat_template '{item.get('name')}')", item["template"]))
    return out


def _special(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        out[key] = v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else ""
    return out


def _environment():
    """The sandbox transformers renders chat templates in (``chat_template_utils._compile_jinja_template``:
    ImmutableSandboxedEnvironment, trim/lstrip blocks, loopcontrols, the ``generation`` tag, its
    ``tojson``, ``raise_exception`` and ``strftime_now``), built here from jinja2 alone: importing
    transformers' helper imports torch (~30 s on a loaded host) for what takes milliseconds."""
    import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # {% generation %}...{% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def render(template: str, **special: Any) -> str:
    """Render ``template`` on the sample conversation in the Jinja sandbox; raises what the template raises."""
    return _environment().from_string(template).render(messages=SAMPLE, add_generation_prompt=True, **special)


def check_folder(folder: str | Path) -> int:
    """Render every chat template of ``folder`` once; BadInput naming the file and the error if one fails.
    Returns how many were checked (0 without jinja2)."""
    import importlib.util

    if importlib.util.find_spec("jinja2") is None:
        return 0
    folder = Path(folder)
    found = templates(folder)
    special = _special(folder) if found else {}
    for where, tpl in found:
        try:
            render(tpl, **special)
        except Exception as exc:  # noqa: BLE001 - any failure of the template is the template's
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise BadInput(f"{where}: the chat template fails in the Jinja sandbox ({type(exc).__name__}{': ' + detail if detail else ''})",
                           hint="fix or remove the model's chat template (chat_template.jinja / tokenizer_config.json), "
                                "or use a model whose template renders") from exc
    return len(found)


__all__ = ["check_folder", "render", "templates", "SAMPLE"]
