"""The incremental stage runner of `edgetune build`: a stage runs unless its state file says its output was made
from the same inputs and options by the same code (the fingerprint: content hashes + options + the stage's code
identity, ``artifacts.code_identity``) and is still there, unchanged; a stage
kind may also share outputs between builds through ``$EDGETUNE_CACHE/stages/``."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import artifacts, console
from ..errors import BadInput, CheckFailed
from .config import STATE_DIR, BuildConfig, _under


@dataclass
class StageInfo:
    stage: str
    target: str | None
    status: str  # ran | skipped | reused (copied from the stage cache, made by another build) | failed
    seconds: float
    out: str


@dataclass
class Build:
    cfg: BuildConfig
    root: Path
    force: bool = False
    output_override: Path | None = None
    stages: list[StageInfo] = field(default_factory=list)
    sign: tuple[Any, str, str] | None = None  # [bundle] sign: (private key, its fingerprint, the config's SHA-256)

    @property
    def output(self) -> Path:
        return self.output_override or self.path(self.cfg.output)

    @property
    def work(self) -> Path:
        return self.output / ".work"

    def path(self, value: str) -> Path:
        return _under(self.root, value)

    def maybe_path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = self.path(value)
        if not p.exists():
            raise BadInput(f"{value} not found (resolved to {p})", hint="paths in a build config are relative to the config file")
        return p

    # -- the incremental stage runner -------------------------------------------------
    def stage(self, sid: str, out: Path, inputs: dict[str, Any], options: dict[str, Any], body: Callable[[], Any],
              *, target: str | None = None, shared: str | None = None) -> dict[str, Any]:
        """Run ``body`` unless the state says ``out`` was made from the same inputs and options.

        ``shared`` (a stage kind, e.g. "finetune"): the output is also kept in ``$EDGETUNE_CACHE/stages/`` under a
        key of that kind, the inputs' content and the options, and taken from there when another build (another
        output folder) made it: a quant-aware build's float fine-tune is the plain LoRA build's "finetune"."""
        hashes = artifacts.input_hashes(inputs)
        fp = artifacts.fingerprint(sid, hashes, options)
        state_file = self.work / STATE_DIR / f"{sid}.json"
        state = read_json(state_file)
        t0 = time.perf_counter()
        label = f"{sid}"
        kept = shared_dir(shared, hashes, options) if shared else None
        plain = json.loads(json.dumps(options, sort_keys=True, default=str))  # as the state file keeps them
        made = {"inputs": hashes, "option_values": plain, "code": artifacts.code_identity(sid)}
        signature = _signature(out)
        if not self.force and state and state.get("fingerprint") == fp and signature == state.get("output"):
            if kept is not None and state.get("status") == "ran" and _signature(kept) is None:
                _copy_folder(out, kept)  # made before the stage cache was: kept now, for the other builds
            self.stages.append(StageInfo(sid.split(".")[0], target, "skipped", round(time.perf_counter() - t0, 2), str(out)))
            console.log(f"[{label}] up to date, skipped")
            return state
        if not self.force and state:
            console.log(f"[{label}] runs again: {why_again(state, made, signature)}")
        status, error = "ran", None
        if kept is not None and not self.force and _signature(kept) is not None and _copy_folder(kept, out):
            status = "reused"
            console.log(f"[{label}] reused from the stage cache ({kept})")
            _touch(kept)  # recently used: the last to be pruned
        else:
            with console.step(label):
                try:
                    with console.results_only_stdout():  # stdout carries only the result (--json); libraries print there
                        body()
                except CheckFailed as exc:  # the stage wrote its output (a report) and then failed a gate
                    status, error = "failed", exc.one_line()
            if kept is not None and status == "ran" and _copy_folder(out, kept):  # best effort: a cache that cannot be
                prune_stage_cache(kept.parent)  # written costs the next build time only
        state = {"fingerprint": fp, "output": _signature(out), "status": status, "error": error, "made_from": made}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(state_file, state)
        self.stages.append(StageInfo(sid.split(".")[0], target, status, round(time.perf_counter() - t0, 2), str(out)))
        return state


def why_again(state: dict, made: dict, signature: str | None) -> str:
    """Why a stage that ran before runs again, from what its state recorded (``made_from``) and what it would be made
    from now: the inputs, options or code that changed, or an output that changed or is gone. A user who pulled a new
    edgetune and sees a ten-minute fine-tune start again learns that its code changed, not only that it runs."""
    before = state.get("made_from")
    if not isinstance(before, dict):  # a state written before the build recorded what a stage was made from
        return "made by an earlier edgetune that did not record what from"
    why = []
    old_in = before.get("inputs") or {}
    ins = sorted(k for k in set(old_in) | set(made["inputs"]) if old_in.get(k) != made["inputs"].get(k))
    if ins:
        why.append(f"input{'s' if len(ins) > 1 else ''} {', '.join(ins)} changed")
    old, new = before.get("option_values") or {}, made["option_values"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
        why.append(f"option{'s' if len(keys) != 1 else ''} {', '.join(keys)} changed")
    if before.get("code") != made["code"]:
        why.append("its code changed (edgetune's modules for this stage, or a library's version)")
    if not why and signature != state.get("output"):
        why.append("its output was changed or removed" if signature else "its output is gone")
    return "; ".join(why) or "its record changed"


STAGE_CACHE_KEEP = 8  # stage cache entries always kept: the most recently made or reused (~23 MB per SmolLM2 fine-tune)
STAGE_CACHE_MIN_AGE_S = 7 * 86400  # and any entry made or reused within a week


def prune_stage_cache(folder: Path, keep: int = STAGE_CACHE_KEEP, min_age_s: float = STAGE_CACHE_MIN_AGE_S) -> list[Path]:
    """Remove the entries of the stage cache ``folder`` that are neither among the ``keep`` most recently made or reused
    nor made or reused within ``min_age_s``; returns what went.

    Its keys hold the inputs' content, the options and the code identity, so every edgetune upgrade that touches a
    cached stage's modules, and every change of data or settings, adds an entry that the older ones never replace.
    Only folders edgetune wrote (a stage record) are removed; anything else in the folder is left alone."""
    try:
        entries = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and artifacts.is_edgetune_output(p)]
    except OSError:
        return []
    dated = []
    for p in entries:  # each entry's time read once; one that another build removed meanwhile is skipped
        try:
            dated.append((p.stat().st_mtime, p))
        except OSError:
            continue
    dated.sort(reverse=True)
    gone, now = [], time.time()
    for mtime, p in dated[keep:]:
        if now - mtime < min_age_s:
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    if gone:
        console.log(f"[stage cache] removed {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} unused for a week or more ({folder})")
    return gone


def _touch(p: Path) -> None:
    try:
        os.utime(p)
    except OSError:
        pass


def shared_dir(kind: str, hashes: dict[str, str], options: dict[str, Any]) -> Path:
    from ..model_input import cache_root

    return cache_root() / "stages" / artifacts.fingerprint(kind, hashes, options)[:32]


def _copy_folder(src: Path, dest: Path) -> bool:
    """Copy the folder ``src`` to ``dest`` through a temp folder and a rename (a stage output, or the stage
    cache's copy of one); ``dest`` replaced only when edgetune wrote it. False when it could not be done."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.copy")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            artifacts.check_replaceable(dest, what="stage output")
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        console.log(f"[stage cache] {src} -> {dest} not copied ({exc.strerror or exc})")
        return False
    return True


def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _signature(out: Path) -> str | None:
    """What identifies the output a stage made: its record or manifest (+ archive), cheap to read."""
    parts = []
    for name in (artifacts.RECORD_NAME, "manifest.json", "signature.json", "report.json"):
        f = out / name
        if f.is_file():
            parts.append(artifacts.sha256_file(f))
    arc = out.with_name(out.name + ".tar.gz")
    if (out / "manifest.json").is_file() and arc.is_file():
        parts.append(artifacts.sha256_file(arc))
    return artifacts.sha256_bytes("|".join(parts).encode()) if parts else None
