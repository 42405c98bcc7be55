"""The texts the LLM benchmark reads, and what each one may be used for (issue 33, "measure honestly first").

Until now the bench judged every recipe's perplexity on one text, the last 10 % of tinyshakespeare,
the same text the recipes had been tuned and picked on (calibration read the head of the same file).
A reviewer's re-measurement on held-out prose ranked the recipes differently. So every text here has
a role, and the quality columns come from texts nothing in the project fitted on:

* ``tune``: may be read by anything that calibrates, searches or picks (AWQ/GPTQ calibration,
  ``--recipe auto``, mixed precision): the head of tinyshakespeare (the first ~90 %, up to a line start);
* ``seen``: scored and reported, but recipes were chosen on it before this split existed: the
  tinyshakespeare tail. Kept as a column for continuity, labelled as what it is, never the goal's judge;
* ``judge``: nothing in the project calibrated, distilled, tuned, chose or tested on it: the Python
  Language Reference prose shipped in the interpreter's stdlib (``pydoc_data/topics.py``, written by the
  CPython documenters) and the licence texts in /usr/share/common-licenses (legal English). Both are on
  the machine already (no download); where one is absent its column is skipped with a note.

Every text is cut deterministically (from its start, at a line boundary) to what ``eval_tokens`` needs;
the reference pack then takes exactly ``eval_tokens`` token ids of it, the same ids for every engine.
``check_tune_only`` is the guard every calibration path in the bench goes through: a calibration text
sharing a line with a judge text raises instead of silently contaminating the judge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .common import ROOT

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LICENCE_DIR = Path("/usr/share/common-licenses")
# distinct licence texts, in this order (GPL-2/LGPL-* repeat much of GPL-3's wording; symlinks such as GPL -> GPL-3 dedupe)
LICENCES = ("GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "Artistic", "CC0-1.0")
TAIL_FRACTION = 0.9  # tinyshakespeare: head (tune) | tail (seen), split at the first line start after 90 %
CHARS_PER_TOKEN = 8  # character budget per wanted token: ample for English with SmolLM2's tokenizer (~4 chars/token)
GUARD_MIN_CHARS = 32  # lines at least this long (whitespace collapsed) must not be shared by tune and judge texts
ROLES = ("tune", "seen", "judge")


@dataclass(frozen=True)
class Source:
    """Where one text comes from; ``read()`` gives its full text, or None when it is not on this machine."""

    name: str
    kind: str
    role: str
    origin: str
    read: Callable[[], str | None] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Text:
    """A loaded text, cut to its budget (``text`` None: absent, ``note`` says why)."""

    name: str
    kind: str
    role: str
    origin: str
    text: str | None
    note: str | None = None

    def meta(self) -> dict:
        """What the results record about the text (not the text itself)."""
        return {"name": self.name, "kind": self.kind, "role": self.role, "origin": self.origin, "chars": len(self.text or ""),
                "note": self.note}


def normalise(text: str) -> str:
    """Tabs to spaces, no trailing blanks, at most one empty line in a row; indentation (code, lists) is kept."""
    lines = [ln.expandtabs(8).rstrip() for ln in text.replace("\r\n", "\n").replace("\f", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def cut(text: str, eval_tokens: int | None) -> str:
    """The start of ``text`` up to a line end, long enough for ``eval_tokens`` tokens (whole text when shorter)."""
    if not eval_tokens or len(text) <= eval_tokens * CHARS_PER_TOKEN:
        return text
    end = text.find("\n", eval_tokens * CHARS_PER_TOKEN)
    return text if end < 0 else text[: end + 1]


# ---------------------------------------------------------------- the sources

def shakespeare_split(path: Path = SHAKESPEARE) -> tuple[str, str, int] | None:
    """(head, tail, start of the tail): the one split point of tinyshakespeare, used by calibration and scoring alike."""
    if not Path(path).is_file():
        return None
    text = Path(path).read_text(encoding="utf-8")
    start = text.find("\n", int(len(text) * TAIL_FRACTION)) + 1
    return text[:start], text[start:], start


def python_docs() -> str | None:
    """The Python Language Reference topics of the running interpreter (pydoc_data), in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return normalise("\n\n".join(normalise(topics[k]) for k in sorted(topics))) if topics else None


def licences(folder: Path = LICENCE_DIR, names: Iterable[str] = LICENCES) -> str | None:
    """The licence texts that exist in ``folder`` (symlinks followed; one copy of each file), in ``names`` order."""
    seen: set[str] = set()
    parts: list[str] = []
    for n in names:
        p = Path(folder) / n
        if not p.is_file():
            continue
        real = str(p.resolve())
        body = normalise(p.read_text(encoding="utf-8", errors="replace"))
        if real in seen or body in parts:
            continue
        seen.add(real)
        parts.append(body)
    return "\n".join(parts) if parts else None


def sources(shakespeare: Path | None = None, licence_dir: Path | None = None) -> list[Source]:
    """Every text the bench knows, in report order: the judge texts first, then the seen one, then the tune one."""
    sp = Path(shakespeare or SHAKESPEARE)
    ld = Path(licence_dir or LICENCE_DIR)

    def part(i: int) -> Callable[[], str | None]:
        return lambda: (lambda s: None if s is None else s[i])(shakespeare_split(sp))

    return [
        Source("python-docs", "documentation prose", "judge",
               "Python Language Reference topics in the interpreter's stdlib (pydoc_data/topics.py), sorted by topic", python_docs),
        Source("licences", "legal prose", "judge", f"licence texts in {ld} ({', '.join(LICENCES)}; those present, deduplicated)",
               lambda: licences(ld)),
        Source("shakespeare-tail", "verse drama", "seen",
               f"last 10% of {sp.name}, from a line start", part(1)),
        Source("shakespeare-head", "verse drama", "tune", f"first 90% of {sp.name}, up to that line start", part(0)),
    ]


def load(role: str | Iterable[str] = ("judge", "seen"), eval_tokens: int | None = None, **where) -> list[Text]:
    """The texts of ``role`` (one role or several), each cut to ``eval_tokens``; absent ones with a note.

    The ``seen`` text is not cut (its reference packs, keyed by the text's hash, stay those of earlier runs)."""
    roles = {role} if isinstance(role, str) else set(role)
    out = []
    for s in sources(**where):
        if s.role not in roles:
            continue
        full = s.read()
        if full is None:
            out.append(Text(s.name, s.kind, s.role, s.origin, None, f"{s.name} ({s.kind}) not on this machine: its columns are skipped"))
        else:
            out.append(Text(s.name, s.kind, s.role, s.origin, full if s.role != "judge" else cut(full, eval_tokens)))
    return out


# ---------------------------------------------------------------- the guard

def _lines(text: str) -> set[str]:
    return {x for x in (" ".join(ln.split()) for ln in text.splitlines()) if len(x) >= GUARD_MIN_CHARS}


def check_tune_only(texts: Iterable[str], what: str, **where) -> None:
    """Raise when a text meant for calibration/search shares a line with any judge text (the full texts, not the cuts)."""
    judge = [(s.name, s.read()) for s in sources(**where) if s.role == "judge"]
    judge_lines = {ln: name for name, body in judge if body for ln in _lines(body)}
    for t in texts:
        for ln in _lines(t):
            if ln in judge_lines:
                raise AssertionError(f"{what} shares text with the judge text {judge_lines[ln]!r} ({ln[:80]!r}): "
                                     "nothing that calibrates or picks a recipe may read a judge text")


def file_texts(path: Path) -> list[str]:
    """The strings of a calibration file: every string value of a .jsonl/.json file, else the whole text."""
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    if Path(path).suffix not in (".jsonl", ".json"):
        return [raw]

    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)

    lines = raw.splitlines() if Path(path).suffix == ".jsonl" else [raw]
    return [s for ln in lines if ln.strip() for s in strings(json.loads(ln))]


def check_calibration_file(path: Path, **where) -> Path:
    """``check_tune_only`` on a calibration file; returns the path so a caller can guard where it passes it on."""
    check_tune_only(file_texts(path), f"calibration file {path}", **where)
    return Path(path)
