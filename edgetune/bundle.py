"""Deployable bundles: the model, its target profile, golden I/O, the validation report, a manifest.

Layout of a bundle folder::

    manifest.json          format version, every file (size + SHA-256), provenance, versions, figures
    target.toml            the resolved target profile the model was made and validated for
    model/                 the export folder (model.onnx + external data, tokenizer, genai_config/config)
    validation/            report.json, report.md, plots (when a report was given)
    validation/reference/  golden inputs/outputs (the reference pack) for re-validation on the device

``make_bundle`` writes the folder atomically (an interrupted bundle never looks complete) and,
with ``archive=True``, a reproducible ``<out>.tar.gz`` next to it. The manifest holds no
timestamps, host names or absolute paths, so the same inputs give byte-identical bundles.

``verify`` checks a bundle folder or archive against its manifest (missing, extra, changed,
truncated files, a tampered manifest). It imports only the standard library (and, for a
signed bundle or a ``key``, ``cryptography`` through edgetune.signing) and is safe on the device. The manifest's SHA-256 fields detect corruption and accidental edits; they are
not a signature: an attacker who can rewrite the files can rewrite the manifest too. For that,
``make_bundle(..., sign=KEY)`` adds ``signature.json`` and ``verify(..., key=PUB)`` checks it
(edgetune.signing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import RECORD_NAME, atomic_dir, output_lock, read_record
from .cleanup import temp_dir
from .errors import BadInput

FORMAT = "edgetune-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # edgetune.signing.SIGNATURE: written after the manifest, never listed in it
# What never ships in a bundle: stage records (timestamps, host paths) and training pickles.
_SKIP_NAMES = {RECORD_NAME, "training_args.bin"}
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _canonical_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def _self_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical_bytes(body)).hexdigest()


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy regular files below src (no records, no links), refusing anything that escapes."""
    dst.mkdir(parents=True, exist_ok=True)
    root = src.resolve()
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not Path(dirpath, d).is_symlink())
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name in _SKIP_NAMES or name.startswith(".") or p.is_symlink():
                continue
            if root not in p.resolve().parents:
                raise BadInput(f"{p} lies outside {src}", hint="bundles take regular files inside the model folder only")
            rel = p.relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)


def _model_folder(model: Path) -> tuple[str, Path]:
    for cand in (model, model / "model"):
        if (cand / "genai_config.json").is_file():
            return "decoder", cand
        if (cand / "model.onnx").is_file():
            return "encoder", cand
        if (cand / "seq2seq.json").is_file():  # translation: encoder.onnx + decoder.onnx (edgetune.device.seq2seq)
            return "seq2seq", cand
    raise BadInput(f"{model} is not an export folder (no genai_config.json, model.onnx or seq2seq.json)", hint="run `edgetune export` first")


def provenance(folder: Path, *, depth: int = 8) -> dict[str, Any]:
    """Content hashes of everything upstream of ``folder``, read from the stage records.

    Follows each record's input paths that are themselves stage outputs (export -> merge ->
    finetune -> base model), so a bundle names the base model, adapter, data set and
    calibration set it came from. Only names and hashes are kept (no host paths).
    """
    out: dict[str, Any] = {}
    seen: set[str] = set()

    def walk(p: Path, level: int) -> None:
        rec = read_record(p)
        if not rec or level > depth or str(p) in seen:
            return
        seen.add(str(p))
        stage = rec.get("stage", "unknown")
        entry = {name: info.get("sha256") for name, info in sorted((rec.get("inputs") or {}).items())}
        key = stage if stage not in out else f"{stage}.{level}"
        out[key] = {"inputs": entry, "fingerprint": rec.get("fingerprint"),
                    "options": rec.get("options") if stage in ("finetune", "merge") else None}
        out[key] = {k: v for k, v in out[key].items() if v is not None}
        for info in (rec.get("inputs") or {}).values():
            path = info.get("path")
            if path and Path(path).is_dir():
                walk(Path(path), level + 1)

    walk(folder, 0)
    # the figures people look for first
    flat: dict[str, str] = {}
    for stage, entry in out.items():
        for name, digest in entry.get("inputs", {}).items():
            if stage.startswith("finetune") and name == "model":
                flat.setdefault("base_model", digest)
            elif stage.startswith("finetune") and name == "data":
                flat.setdefault("dataset", digest)
            elif (stage.startswith("merge") and name == "adapter") or (stage.startswith("export") and name == "float_adapter"):
                flat.setdefault("adapter", digest)
            elif stage.startswith("merge") and name in ("base", "model"):
                flat.setdefault("base_model", digest)
            elif "calibration" in name and digest:
                flat.setdefault("calibration_set", digest)
            elif stage.startswith("export") and name == "model":
                flat.setdefault("exported_model", digest)
    return {"summary": flat, "stages": out}


def _figures(report: dict[str, Any] | None, model_results: dict[str, Any]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    if model_results.get("size_mb") is not None:
        figs["size_mb"] = model_results["size_mb"]
    if not report:
        return figs
    figs["size_mb"] = (report.get("model") or {}).get("size_mb", figs.get("size_mb"))
    figs["passed"] = report.get("passed")
    figs["failed_checks"] = report.get("failed") or []
    figs["accuracy"] = {k: v for k, v in (report.get("accuracy") or {}).items() if isinstance(v, (int, float, bool))}
    lat = report.get("latency") or {}
    keep = {}
    for key in ("time_to_first_token_ms", "decode_tokens_per_s", "latency_ms", "end_to_end_s"):
        if isinstance(lat.get(key), dict):
            keep[key] = {k: v for k, v in lat[key].items() if k in ("p50", "p90", "mean")}
    for key in ("load_time_s", "peak_memory_mb"):
        if lat.get(key) is not None:
            keep[key] = lat[key]
    figs["latency"] = keep
    if report.get("device"):
        figs["device"] = report["device"]  # latency "not measured" on a cross-build (the target's provider absent)
    if report.get("not_measured"):
        figs["not_measured"] = report["not_measured"]
    figs["checks"] = [{k: c.get(k) for k in ("name", "value", "limit", "op", "passed")} for c in report.get("checks") or []]
    vs = report.get("vs_float_finetune")
    if vs is not None:  # a quant-aware build: the same model against the float fine-tune, the same budgets
        figs["vs_float_finetune"] = {"passed": vs.get("passed"), "failed_checks": vs.get("failed") or [],
                                     "accuracy": {k: v for k, v in (vs.get("accuracy") or {}).items() if isinstance(v, (int, float, bool))}}
        figs["passed"] = bool(report.get("passed")) and bool(vs.get("passed"))
    figs["measured_on"] = {k: (report.get("machine") or {}).get(k) for k in ("system", "machine", "cpu", "cpu_count")}
    return figs


def make_bundle(model: str | os.PathLike, out: str | os.PathLike, *, target, report: str | os.PathLike | None = None,
                archive: bool = False, name: str | None = None, sign=None, build_config_sha256: str | None = None,
                float_report: str | os.PathLike | None = None) -> dict[str, Any]:
    """Bundle the export ``model`` (with the validation ``report`` folder) into ``out``; returns the manifest.

    ``float_report``: a quant-aware build's second validation of the same model, against the float fine-tune
    (``validation/vs-float-finetune/``; ``figures.vs_float_finetune``; ``figures.passed`` needs both).

    ``target`` is a profile name or path, or a resolved Target (written as ``target.toml``). With
    ``archive=True`` also writes ``<out>.tar.gz`` (reproducible). Writes are atomic, and the
    export must have been made for ``target`` (its record says so; otherwise exit 2). ``sign``
    (a private key or its PEM file, checked before any work) adds ``signature.json``
    binding the manifest, the target, ``build_config_sha256`` and the validation verdict.
    """
    from .targets import resolve

    signer = None
    if sign is not None:
        from .signing import as_private_key

        signer = as_private_key(sign)

    model = Path(model)
    if not model.exists():
        raise BadInput(f"model not found: {model}", hint="give an export folder (edgetune export ...)")
    if (model / MANIFEST).is_file():
        # a bundle's model/ carries no export record: a new manifest would guess its precision, lose its task, labels and
        # provenance, and skip the check that it was made for this target
        raise BadInput(f"{model} is a bundle (it has {MANIFEST}), not an export: a manifest made from it could not say what it holds",
                       hint="bundle the export it was made from (a build keeps it in OUTPUT/.work/export-<target>), or copy the bundle as it is")
    kind, folder = _model_folder(model)
    if kind == "decoder":
        from .chat_template import check_folder

        check_folder(folder)  # never ship a chat template that fails in the sandbox (exit 2 naming its error)
    t = resolve(target)
    rec = read_record(folder) or {}
    results = rec.get("results") or {}
    made_for = results.get("target")
    if made_for and made_for != t.name:
        # the graph is specialized for its target (builder provider, quantization recipe, static shapes):
        # a bundle must not claim another target's profile and budgets
        raise BadInput(f"{model} was exported for {made_for} ({results.get('execution_provider') or '?'}), not for {t.name} "
                       f"({t.runtime.execution_provider})",
                       hint=f"export it for {t.name} first (edgetune export ... -t {t.name}), or bundle with -t {made_for}")
    report_data = None
    report_dir = Path(report) if report else None
    if report_dir is not None:
        if not (report_dir / "report.json").is_file():
            raise BadInput(f"{report_dir} has no report.json", hint="give the folder written by `edgetune validate --out`")
        report_data = json.loads((report_dir / "report.json").read_text())
    if float_report is not None:
        if report_dir is None or not (Path(float_report) / "report.json").is_file():
            raise BadInput(f"{float_report} has no report.json (or no main report was given)", hint="give both validation folders")
        report_data = {**report_data, "vs_float_finetune": json.loads((Path(float_report) / "report.json").read_text()),
                       "_float_dir": Path(float_report)}
    out = Path(out)
    with output_lock(out, what="bundle folder"):  # the folder and its archive, as one write
        return _write_bundle(out, folder, kind, t, rec, results, report_dir, report_data, archive, name,
                             (signer, build_config_sha256))


def _write_bundle(out: Path, folder: Path, kind: str, t, rec: dict, results: dict, report_dir: Path | None,
                  report_data: dict | None, archive: bool, name: str | None, sign=(None, None)) -> dict[str, Any]:
    import tomli_w

    from .archive import pack
    from .plan import encoder_precision, llm_precision

    from .artifacts import _tree_bytes

    # a full disk names what the bundle needs (the model folder and the report), not what was written when it ran out
    needed = _tree_bytes(folder) + (_tree_bytes(report_dir) if report_dir is not None else 0)
    with atomic_dir(out, inputs=(folder, report_dir), needed_bytes=needed) as tmp:
        _copy_tree(folder, tmp / "model")
        profile = t.model_dump(mode="json", exclude={"source"}, exclude_none=True)
        (tmp / "target.toml").write_text(f"# resolved target profile '{t.name}' (edgetune {__version__})\n" + tomli_w.dumps(profile))
        if report_dir is not None:
            _copy_tree(report_dir, tmp / "validation")
        if report_data and report_data.get("_float_dir"):
            _copy_tree(report_data["_float_dir"], tmp / "validation" / "vs-float-finetune")
        files = []
        for dirpath, dirnames, filenames in os.walk(tmp):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                rel = p.relative_to(tmp).as_posix()
                files.append({"path": rel, "size": p.stat().st_size, "sha256": _sha256(p)})
        files.sort(key=lambda f: f["path"])
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name or out.name,
            "kind": kind,
            "model_dir": "model",
            "task": results.get("task"),
            "precision": results.get("precision") or (llm_precision(t) if kind == "decoder" else encoder_precision(t)),
            "target": {"name": t.name, "execution_provider": t.runtime.execution_provider,
                       "fallback_providers": list(t.runtime.fallback_providers), "file": "target.toml"},
            "labels": results.get("labels"),
            "validation": {"report": "validation/report.json", "reference": "validation/reference"} if report_dir else None,
            "provenance": provenance(folder),
            # versions of the tools that made the model (from its record), and of this bundler
            "versions": {"export": rec.get("versions") or {}, "edgetune": __version__},
            "figures": _figures(report_data, results),
            "files": files,
        }
        manifest = {k: v for k, v in manifest.items() if v is not None}
        manifest["manifest_sha256"] = _self_hash(manifest)
        (tmp / MANIFEST).write_bytes(_canonical_bytes(manifest))
        if sign[0] is not None:  # after the manifest, so signature.json is never in its file list
            from .signing import sign_folder

            sign_folder(tmp, sign[0], manifest_name=MANIFEST, build_config_sha256=sign[1])
    if archive:
        pack(out, archive_path(out))
    return manifest


def archive_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".tar.gz")


def read_manifest(folder: Path) -> dict[str, Any]:
    p = folder / MANIFEST
    if not p.is_file():
        raise BadInput(f"{folder} has no {MANIFEST}", hint="not a bundle, or an interrupted one: rebuild it with `edgetune bundle`")
    try:
        data = json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: manifest is not valid JSON ({exc.args[0] if exc.args else exc})", hint="the bundle is corrupted; rebuild or copy it again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadInput(f"{p}: not an edgetune bundle manifest", hint="rebuild the bundle with `edgetune bundle`")
    if data.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{p}: bundle format version {data.get('format_version')} is not supported (this edgetune reads {FORMAT_VERSION})",
                       hint="rebuild the bundle or use a matching edgetune")
    return data


def carried(model: str | os.PathLike) -> dict[str, Path]:
    """What a bundle folder carries for measuring it again on a device: ``target`` (its target.toml, the budgets and
    session options it was validated with) and ``reference`` (its reference pack), each present only when the bundle
    has it; {} for anything that is not a bundle folder (an export). The paths are the manifest's, refused when one
    escapes the bundle."""
    folder = Path(model)
    if not (folder / MANIFEST).is_file():
        return {}
    from .manifest_paths import named_paths, resolve

    manifest = read_manifest(folder)
    out: dict[str, Path] = {}
    target = resolve(folder, manifest, "target.file", "target.toml")
    if target.is_file():
        out["target"] = target
    if "validation.reference" in {name for name, _, _ in named_paths(manifest)}:
        ref = resolve(folder, manifest, "validation.reference", "validation/reference")
        if (ref / "reference.json").is_file():
            out["reference"] = ref
    return out


def _verify_folder(folder: Path, key=None) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    try:
        manifest = read_manifest(folder)
    except BadInput as exc:
        if not (folder / MANIFEST).is_file():
            raise
        # a damaged manifest is a damaged bundle: report it like any other file
        return {"manifest": {}, "problems": [{"path": MANIFEST, "problem": "corrupted", "detail": exc.message}],
                "files_checked": 0, "files_listed": 0, "signature": None}
    raw = (folder / MANIFEST).read_bytes()
    if manifest.get("manifest_sha256") != _self_hash(manifest) or raw != _canonical_bytes(manifest):
        problems.append({"path": MANIFEST, "problem": "changed", "detail": "manifest does not match its own checksum"})
    listed = {}
    for f in manifest.get("files") or []:
        rel = str(f.get("path", ""))
        pp = Path(rel)
        if not rel or pp.is_absolute() or ".." in pp.parts:
            problems.append({"path": rel, "problem": "unsafe", "detail": "manifest lists a path outside the bundle"})
            continue
        listed[rel] = f
    from .manifest_paths import problems as named_path_problems

    problems.extend(named_path_problems(folder, manifest, set(listed)))
    present = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for dn in dirnames:  # os.walk does not descend into folder symlinks: report them, never skip them
            if Path(dirpath, dn).is_symlink():
                problems.append({"path": Path(dirpath, dn).relative_to(folder).as_posix(), "problem": "unsafe",
                                 "detail": f"a symbolic link to a folder ({os.readlink(Path(dirpath, dn))}); bundles hold regular files only"})
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(folder).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                present[rel] = p
    checked = 0
    for rel, f in sorted(listed.items()):
        p = present.get(rel)
        if p is None:
            problems.append({"path": rel, "problem": "missing", "detail": "listed in the manifest, not in the bundle"})
            continue
        if p.is_symlink() or not p.is_file():
            problems.append({"path": rel, "problem": "changed", "detail": "not a regular file"})
            continue
        size = p.stat().st_size
        if size < int(f.get("size", -1)):
            problems.append({"path": rel, "problem": "truncated", "detail": f"{size} bytes, manifest says {f.get('size')}"})
        elif size != int(f.get("size", -1)):
            problems.append({"path": rel, "problem": "changed", "detail": f"{size} bytes, manifest says {f.get('size')}"})
        elif _sha256(p) != f.get("sha256"):
            problems.append({"path": rel, "problem": "changed", "detail": "SHA-256 differs from the manifest"})
        checked += 1
    for rel in sorted(set(present) - set(listed)):
        problems.append({"path": rel, "problem": "extra", "detail": "in the bundle, not in the manifest"})
    signature = None
    if key is not None or (folder / SIGNATURE).exists() or (folder / SIGNATURE).is_symlink():
        from .signing import check

        signature, sig_problems = check(folder, raw, manifest, key)
        problems = sig_problems + problems  # the signature's verdict first: it is what --key asks
    return {"manifest": manifest, "problems": problems, "files_checked": checked, "files_listed": len(listed),
            "signature": signature}


def verify(path: str | os.PathLike, key=None) -> dict[str, Any]:
    """Check a bundle folder or ``.tar.gz`` against its manifest; returns ``{ok, problems, ...}``.

    Never raises for a mismatch (the caller decides); raises BadInput when ``path`` is not a
    bundle at all or the archive is unsafe or unreadable. ``key`` (a trusted public key or its
    PEM file, read first): the bundle must be signed with it (else a ``signature.json`` problem);
    without it a signature present is checked against the key it names and reported.
    """
    from .archive import extract, is_archive, single_root

    if key is not None:
        from .signing import as_public_key

        key = as_public_key(key)  # a bad key file fails before an archive is unpacked
    p = Path(path)
    if not p.exists():
        raise BadInput(f"bundle not found: {p}", hint="give a bundle folder or its .tar.gz")
    if is_archive(p):
        with temp_dir("verify") as td:
            root = single_root(extract(p, Path(td) / "x"))
            res = _verify_folder(root, key)
    elif p.is_dir():
        res = _verify_folder(p, key)
    else:
        raise BadInput(f"{p} is neither a bundle folder nor a .tar.gz archive", hint="give a bundle folder or its .tar.gz")
    m = res.pop("manifest")
    return {"bundle": str(p), "ok": not res["problems"], "name": m.get("name"), "kind": m.get("kind"),
            "target": (m.get("target") or {}).get("name"), "precision": m.get("precision"), **res}


def verify_or_raise(path: str | os.PathLike, key=None) -> dict[str, Any]:
    res = verify(path, key)
    if not res["ok"]:
        raise failure(res)
    return res


def failure(res: dict[str, Any]) -> BadInput:
    """The one-line error for a failed verification: a signature problem (the --key verdict) is
    named on its own with its fix; otherwise every problem, counted."""
    probs = res["problems"]
    sig = [p for p in probs if p["path"] == SIGNATURE]
    if sig and len(probs) == 1:
        from .signing import hint, message

        return BadInput(message(res["bundle"], sig[0]), hint=hint(sig[0]))
    return BadInput(problem_line(res), hint="the bundle is corrupted or was modified; rebuild it or copy it again")


def problem_line(res: dict[str, Any], limit: int = 5) -> str:
    probs = res["problems"]
    shown = "; ".join(f"{p['path']}: {p['problem']}" for p in probs[:limit])
    more = f" (+{len(probs) - limit} more)" if len(probs) > limit else ""
    return f"bundle {res['bundle']} failed verification, {len(probs)} problem(s): {shown}{more}"


__all__ = ["make_bundle", "verify", "verify_or_raise", "failure", "provenance", "read_manifest", "archive_path", "FORMAT_VERSION"]
