"""edgetune vs llama.cpp on the same fine-tuned model (the `peers` section of `make bench`).

The question a user asks: "I fine-tuned a model; ship it with edgetune, or convert it to GGUF and
run llama.cpp?" Both tool chains start from the same folders:

* the demo's fine-tune: `edgetune build examples/smollm2-lora-cpu.toml` (its stages are cached;
  whatever that config trains is what is compared): `.work/merged` (base + LoRA, fp32) and
  `.work/adapter`;
* the base SmolLM2 (full run only): the fp32 HF folder edgetune materializes from the shipped GGUF.

llama.cpp side: its own `convert_hf_to_gguf.py --outtype f32` (from the llama-cpp-python sdist
`make peers` keeps in the peer venv), then `llama_cpp.llama_model_quantize` to Q8_0 / Q4_K_M / Q4_0,
cached by the content hash of the input folder. edgetune side: `edgetune.export.export` recipes
(fp32, int4 RTN with int4/int8 head, accuracy_level 4, every other int4 algorithm in a full run)
and CLI recipes that land in parallel (`--precision gguf`, `--float-adapter`, `--recipe auto`),
each a row with status `missing` (this edgetune does not offer it yet), `refused`, `failed`,
`skipped` or `ok`: never a crash.

Every row gets the same measurements from the same token ids (HF tokenizer ids; llama.cpp is fed
ids, not text): perplexity by llama-perplexity's chunked method (chunks of 512, second half
scored) on each evaluation text of texts.py (the judge texts nothing in the project tuned on:
Python documentation prose and licence texts; and the tinyshakespeare tail the recipes were chosen
on, labelled "seen"), its increase, KL and top-1 vs the PyTorch fp32 model of the same folder, per
text; task exact match on examples/data/smarthome_eval.jsonl (greedy, prompt ids from
the HF chat template, JSON compared as values: key order ignored); decode tok/s and TTFT at 1 and
2 threads in interleaved rounds (fresh process per measurement, peak RSS its own); file size;
and each row's ratio to llama.cpp Q4_K_M of the same model (ΔPPL per text), and whether it meets issue 33's
goal (``GOAL``) on every judge text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import texts as T
from .common import ROOT, TARGET, child_env, key
from .exports import SLOW_CALIBRATED, calibrated_algorithms, export_spec, export_variant, exporter_fingerprint
from .inputs import calibration_file
from .variants import int4_variant, variants
from .weights_read import read_mb

DEMO_CONFIG = ROOT / "examples" / "smollm2-lora-cpu.toml"
# the same task, data and LoRA settings trained quant-aware (finetune quant_aware = "int4"): its merged
# model is exported at plain int4 RTN and compared with the demo's float fine-tune like every other row
QAT_CONFIG = ROOT / "examples" / "smollm2-qat-int4-cpu.toml"
# the same, trained (and exported) with the output head at int8: the int4 head's rounding is the largest single loss
QAT_H8_CONFIG = ROOT / "examples" / "smollm2-qat-int4-h8-cpu.toml"
# the same on the grid of blocks of 64 (int8 head, accuracy_level 4): the kernel's faster path, trained through
QAT_H8_B64_CONFIG = ROOT / "examples" / "smollm2-qat-int4-h8-b64-cpu.toml"
TASK_DATA = ROOT / "examples" / "data" / "smarthome_eval.jsonl"
WORKER = "benchmarks.peer_worker"  # run as `python -m benchmarks.peer_worker` (child_env puts the repository root on PYTHONPATH)
LLAMA_TYPES = ("F32", "Q8_0", "Q4_K_M", "Q4_0")
BAR = "Q4_K_M"  # the row every other row is compared with
CHUNK = 512  # llama-perplexity -c
# issue 33's goal for a row, vs llama.cpp Q4_K_M of the same model in the same run: ΔPPL no worse on every judge text,
# task exact match within 1 point of the fp32 fine-tune, size at most 1.15x, decode at least 1.5x at 1 and 2 threads
GOAL = {"exact_match_pt": 1.0, "size": 1.15, "decode": 1.5, "threads": ("1", "2")}

Log = Callable[[str], None]


def settings(quick: bool, a: Any) -> dict:
    return {
        "quick": quick,
        "target": TARGET,
        "chunk": CHUNK,
        "eval_tokens": getattr(a, "peer_eval_tokens", None) or (2048 if quick else 8192),
        "topk": 64,
        "task_limit": None,
        "prompt_tokens": 128,
        "new_tokens": getattr(a, "new_tokens", None) or (64 if quick else 128),
        "warmup_tokens": 16,
        "rounds": getattr(a, "repeats", None) or (2 if quick else 3),
        "threads": [1, 2] if (os.cpu_count() or 1) >= 2 else [1],
        "groups": ["finetune"] if quick else ["finetune", "base"],
        "export_timeout_s": max(getattr(a, "export_timeout", 600) or 600, 600),
        "auto_timeout_s": 900 if quick else 1800,
    }


# ---------------------------------------------------------------- small helpers

def sha_folder(folder: Path) -> str:
    """Content hash of a model folder (weights, config, tokenizer): the cache key of everything made from it."""
    from edgetune.artifacts import hash_path

    return hash_path(folder)[:12]


def size_mb(path: Path) -> float:
    p = Path(path)
    if p.is_file():
        return round(p.stat().st_size / 2**20, 2)
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".onnx_adapter", ".gguf", ".bin")) / 2**20, 2)


def tail(text: str, n: int = 1) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:400] if lines else "no output"


def json_equal(got: str, want: str) -> bool:
    """Task exact match: both parse as JSON and are equal as values (key order ignored), else equal text."""
    try:
        return json.loads(got.strip()) == json.loads(want.strip())
    except (ValueError, TypeError):
        return got.strip() == want.strip()


def task_metric() -> tuple[Callable[[str, str], bool], str]:
    """The task comparison: edgetune.device.metrics' when it has one, else the bench's own json_equal."""
    try:
        from edgetune.device import metrics as M

        fn = getattr(M, "exact_match", None)  # exact_match(gold, answer): the task gate's JSON-aware comparison
        if callable(fn):
            return (lambda got, want, fn=fn: bool(fn(want, got))), "edgetune.device.metrics.exact_match"
    except ImportError:
        pass
    return json_equal, "benchmarks/peers.py json_equal (no task metric in edgetune.device.metrics yet)"


class Peer:
    """The llama.cpp peer built by `make peers`: its python and the unpacked sdist (converter, gguf-py)."""

    def __init__(self, venv: Path | None):
        self.venv = Path(venv).resolve() if venv else None
        self.python = self.venv / "bin" / "python" if self.venv else None
        srcs = sorted((self.venv / "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")) if self.venv else []
        self.converter = srcs[-1] if srcs else None
        self.convert_site = self.venv / "convert-site" if self.venv else None
        self.version = None
        self.system_info = None
        self.build_s = None
        self.problem = None
        if self.venv is None:
            self.problem = "no peer venv given (make bench passes --peers-venv $(PEERS_VENV))"
        elif not (self.python and self.python.is_file()):
            self.problem = f"{self.venv} has no python: run `make peers PEERS_VENV={self.venv}` (~17 min on 2 cores, once)"
        else:
            p = subprocess.run([str(self.python), "-c", "import llama_cpp; print(llama_cpp.__version__); "
                                "print(llama_cpp.llama_print_system_info().decode())"], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                self.problem = f"llama_cpp does not import in {self.venv}: {tail(p.stderr)} (run `make peers`)"
            else:
                self.version, _, info = p.stdout.strip().partition("\n")
                self.system_info = info.strip() or None  # the instructions llama.cpp was compiled for (AVX2 = 1 | AVX512 = 1 ...)
            if self.converter is None:
                self.problem = self.problem or f"{self.venv}/src has no unpacked llama-cpp-python sdist (convert_hf_to_gguf.py): run `make peers`"
        try:
            self.build_s = int((self.venv / "build-seconds").read_text().strip()) if self.venv else None
        except (OSError, ValueError):
            pass

    @property
    def ok(self) -> bool:
        return self.problem is None


def worker(peer: Peer, job_kind: str, eng: str, model: str | Path, *args: str, timeout: float = 1800) -> dict:
    """One peer_worker.py job in its own process (the peer venv's python for llama.cpp); its JSON line."""
    py = str(peer.python) if eng == "llama" else sys.executable
    cmd = [py, "-m", WORKER, job_kind, eng, str(model), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    if p.returncode != 0:
        why = tail(p.stderr)
        if eng == "llama" and p.returncode == -signal.SIGSEGV:
            why += ("; llama.cpp crashed: a peer built with ggml's AMX kernels does on batched prompts (llama.cpp #20824): "
                    "rebuild it with `make peers` (it compiles AMX out on such a CPU)")
        raise RuntimeError(f"{job_kind} worker exit {p.returncode}: {why}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the models

def shown(path: str) -> str:
    """A path as the report prints it: relative to the repository when inside it (no machine's absolute path)."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else path


def demo_models(log: Log, config: Path = DEMO_CONFIG, work_dir: str | None = None) -> dict:
    """Run the demo build (cached stages) and return its merged model and adapter folders.

    ``work_dir``: an existing build's ``.work`` folder (``merged`` + ``adapter``) to compare instead."""
    from edgetune.build import load_config

    if work_dir:
        work = Path(work_dir).resolve()
        merged, adapter = work / "merged", work / "adapter"
        if not (merged / "config.json").is_file() or not adapter.is_dir():
            raise RuntimeError(f"--finetune-work {work}: no merged/ + adapter/ there (give a build's .work folder)")
        log(f"fine-tune from {work} (no build run)")
        return {"config": None, "work": str(work), "merged": str(merged), "adapter": str(adapter), "build_exit": None}
    cfg, base_dir = load_config(config)
    work = Path(os.path.normpath(base_dir / cfg.output)) / ".work"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edgetune", "build", str(config), "--quiet"], capture_output=True, text=True,
                       timeout=4 * 3600, env=child_env())
    merged, adapter = work / "merged", work / "adapter"
    info = {"config": shown(str(config)), "build_exit": p.returncode,
            "build_s": round(time.perf_counter() - t0, 1), "merged": str(merged), "adapter": str(adapter),
            "finetune": cfg.finetune.model_dump()}
    if p.returncode not in (0, 1) or not (merged / "config.json").is_file():
        raise RuntimeError(f"`edgetune build {config.name}` gave no merged model (exit {p.returncode}): {tail(p.stderr)}")
    if p.returncode == 1:  # a target missed its budgets: the fine-tune and merge are still what we compare
        info["build_note"] = f"the demo build's own target missed a budget (exit 1): {tail(p.stderr)}"
    log(f"demo fine-tune: {merged} (build exit {p.returncode}, {info['build_s']:.0f} s)")
    return info


# ---------------------------------------------------------------- llama.cpp artifacts

def gguf_files(peer: Peer, model_dir: Path, group: str, root: Path, types: list[str], log: Log) -> dict[str, dict]:
    """llama.cpp's own path: convert_hf_to_gguf.py --outtype f32, then llama_model_quantize per type (cached)."""
    out: dict[str, dict] = {}
    if not peer.ok:
        return {t: {"status": "missing", "error": f"llama.cpp peer not available: {peer.problem}"} for t in types}
    folder = root / "gguf" / f"{group}-{key({'model': sha_folder(model_dir), 'llama_cpp_python': peer.version})}"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "F32.gguf"
    if not f32.is_file():
        tmp = folder / "F32.gguf.tmp"
        t0 = time.perf_counter()
        # the project venv's python has the converter's torch + transformers; gguf-py comes from the
        # sdist (the converter puts it on sys.path), sentencepiece from the peer's convert-site
        p = subprocess.run([sys.executable, str(peer.converter), str(model_dir), "--outtype", "f32", "--outfile", str(tmp)],
                           capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(peer.convert_site)})
        if p.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            err = f"convert_hf_to_gguf.py failed (exit {p.returncode}): {tail(p.stderr, 2)}"
            return {t: {"status": "failed", "error": err} for t in types}
        tmp.replace(f32)
        log(f"{group}: convert_hf_to_gguf.py --outtype f32 in {time.perf_counter() - t0:.0f} s")
    for t in types:
        path = folder / f"{t}.gguf"
        if t != "F32" and not path.is_file():
            tmp = folder / f"{t}.gguf.tmp"
            try:
                r = worker(peer, "quantize", "llama", f32, "--out", str(tmp), "--ftype", t, "--threads", str(os.cpu_count() or 1), timeout=1800)
                tmp.replace(path)
                log(f"{group}: llama_model_quantize {t} in {r['seconds']:.0f} s ({r['size_mb']:.1f} MB)")
            except Exception as exc:  # noqa: BLE001 - a row, not a crash
                tmp.unlink(missing_ok=True)
                out[t] = {"status": "failed", "error": str(exc)}
                continue
        out[t] = {"status": "ok", "path": str(path), "size_mb": size_mb(path)}
    return out


# ---------------------------------------------------------------- edgetune artifacts

def export_cli() -> dict:
    """What `edgetune export` offers, asked of edgetune itself (its click options, the quantization table's precisions)."""
    from edgetune import quant
    from edgetune.commands.export import export

    return {"options": {o for p in export.params for o in p.opts}, "precisions": tuple(quant.EXPORT_PRECISIONS)}


def build_target_fields() -> set[str]:
    try:
        from edgetune.build import TargetCfg

        return set(TargetCfg.model_fields)
    except Exception:  # noqa: BLE001
        return set()


def cli_export(args: list[str], model: Path | str, model_key: str, slug: str, root: Path, timeout: float, log: Log,
               fresh: bool) -> dict:
    """`edgetune export MODEL -t cpu-x86 -o OUT ARGS...` in a subprocess, cached by (args, model content, exporter code)."""
    folder = root / "exports" / f"{slug}-{key({'args': args, 'model': model_key, 'exporter': exporter_fingerprint()})}"
    if not fresh and (folder / "edgetune.json").is_file():
        return {"status": "ok", "folder": str(folder), "cached": True}
    shutil.rmtree(folder, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "edgetune", "export", str(model), "-t", TARGET, "-o", str(folder), "--quiet", *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        shutil.rmtree(folder, ignore_errors=True)
        return {"status": "timed out", "error": f"export took longer than {timeout:.0f} s"}
    (logs / f"export-{slug}.log").write_text(p.stdout + p.stderr)
    dt = round(time.perf_counter() - t0, 1)
    if p.returncode == 0 and (folder / "edgetune.json").is_file():
        log(f"export {slug}: {dt:.0f} s")
        return {"status": "ok", "folder": str(folder), "cached": False, "export_s": dt}
    shutil.rmtree(folder, ignore_errors=True)
    status = {1: "refused", 2: "refused", 3: "refused"}.get(p.returncode, "failed")
    return {"status": status, "error": f"exit {p.returncode}: {tail(p.stderr, 2)}", "export_s": dt}


def api_export(v: dict, model_dir: Path, model_key: str, root: Path, s: dict, fresh: bool) -> dict:
    """One `edgetune.export.export` variant through the bench's cached export worker (benchmarks.exports)."""
    rs = {"export_timeout_s": s["export_timeout_s"]}
    v = dict(v)
    if (v.get("int4") or {}).get("algorithm") in calibrated_algorithms():
        cal = calibration_file(root)
        if cal is not None:
            v["calibration"] = cal
    folder, info = export_variant(v, model_dir, root, rs, fresh, model_key=model_key)
    if folder is None:
        return {"status": info["status"], "error": info.get("error"), "export_s": info.get("export_s")}
    return {"status": "ok", "folder": str(folder), **{k: info[k] for k in ("cached", "export_s") if k in info}}


def edgetune_rows(group: str, s: dict, slow_algorithms: bool) -> list[dict]:
    """The edgetune recipes of one group (what to export and how), in table order."""
    quick = s["quick"]
    rows: list[dict] = []

    def api(rid, label, v, **kw):
        rows.append({"id": rid, "label": label, "toolchain": "edgetune", "engine": "ort", "kind": "api", "variant": v, **kw})

    def cli(rid, label, args, model, needs, owner, **kw):
        rows.append({"id": rid, "label": label, "toolchain": "edgetune", "engine": "ort", "kind": "cli", "args": args, "model": model,
                     "needs": needs, "owner": owner, **kw})

    if group == "finetune":
        api("et-fp32", "edgetune fp32", {"label": "fp32", "slug": "fp32", "precision": "fp32"})
        api("et-rtn", "edgetune int4 RTN b32, int4 head", int4_variant(lm_head="int4"))
        api("et-rtn-h8", "edgetune int4 RTN b32, int8 head", int4_variant(lm_head="int8"))
        api("et-rtn-h8-acc4", "edgetune int4 RTN b32, int8 head, accuracy_level 4", int4_variant(lm_head="int8", accuracy_level=4))
        # activation-aware scales folded into the checkpoint, then RTN: same graph and kernels as the RTN rows
        if quick:  # the full run makes et-awq with every other algorithm below
            api("et-awq", "edgetune int4 awq b32, int4 head", int4_variant(algorithm="awq", lm_head="int4"))
        api("et-awq-h8", "edgetune int4 awq b32, int8 head", int4_variant(algorithm="awq", lm_head="int8"))
        api("et-awq-h8-acc4", "edgetune int4 awq b32, int8 head, accuracy_level 4",
            int4_variant(algorithm="awq", lm_head="int8", accuracy_level=4))
        # importance-weighted search on RTN's graph (uint4 zero points, prepacked): the fast kernel's faithful candidate;
        # the int8 head's table is also the tied embedding's (no int4 copy)
        api("et-imatrix-h8-acc4", "edgetune int4 imatrix b32 asym, int8 head, accuracy_level 4",
            int4_variant(algorithm="imatrix", symmetric=False, lm_head="int8", accuracy_level=4))
        # imatrix / imatrix-gptq (GPTQ error feedback) with some MatMuls at 8 bits: measured (a fraction), or by rule,
        # v_proj (3 of 9 heads' values, GQA) and down_proj in every layer (the two Q4_K_M widens)
        for rid, label, alg, mixed in (
                ("et-imatrix-h8-acc4-m10", "same + 10 % of the MatMuls at 8 bits (the most sensitive, measured)", "imatrix", "0.1"),
                ("et-imatrix-h8-acc4-vd8", "same, v_proj and down_proj at 8 bits in every layer (a rule, as Q4_K_M)", "imatrix",
                 "v_proj,down_proj"),
                ("et-imatrix-gptq-h8-acc4-vd8", "same rule over GPTQ error feedback (imatrix-gptq)", "imatrix-gptq", "v_proj,down_proj"),
                ("et-imatrix-gptq-h8-acc4-v8", "imatrix-gptq, v_proj at 8 bits only", "imatrix-gptq", "v_proj")):
            cli(rid, label, ["--precision", "int4", "--int4-algorithm", alg, "--int4-asymmetric", "--int4-lm-head", "int8",
                             "--int4-accuracy-level", "4", "--mixed-8bit", mixed, "--calibration", "{calibration}"], "{merged}",
                [("option", "--mixed-8bit")], "imatrix")
        # the same graph with its sibling MatMulNBits packed (gate+up, q+k): bit-exact, one kernel call per group; and with
        # the head at 4 bits through the same GPTQ (the int8 head is ~30 % of the bytes a SmolLM2 decode step reads; the
        # untied embedding then gets its own int4 table)
        for rid, label, head in (("et-imatrix-gptq-h8-acc4-vd8-pack", "imatrix-gptq + v/down 8-bit, siblings packed (--pack-siblings)", "int8"),
                                 ("et-imatrix-gptq-h4-acc4-vd8-pack", "same, int4 head (GPTQ'd like the blocks)", "int4")):
            cli(rid, label, ["--precision", "int4", "--int4-algorithm", "imatrix-gptq", "--int4-asymmetric", "--int4-lm-head", head,
                             "--int4-accuracy-level", "4", "--mixed-8bit", "v_proj,down_proj", "--pack-siblings", "--calibration",
                             "{calibration}"],
                "{merged}", [("option", "--mixed-8bit"), ("option", "--pack-siblings")], "imatrix")
        # the same two rows with their 8-bit nodes (head, v/down) in blocks of 128 (the tied head: 64, the widest dividing
        # 576): the CPU's 8-bit kernel runs wide blocks faster, the 4-bit body is unchanged (--int8-block-size)
        cli("et-rtn-h8-acc4-w128", "edgetune int4 RTN b32, int8 head in blocks of 64, accuracy_level 4",
            ["--precision", "int4", "--int4-lm-head", "int8", "--int4-accuracy-level", "4", "--int8-block-size", "128"], "{merged}",
            [("option", "--int8-block-size")], "int8 blocks")
        cli("et-imatrix-gptq-h8-acc4-vd8-pack-w128", "imatrix-gptq + v/down 8-bit, packed, 8-bit nodes in blocks of 128 (head 64)",
            ["--precision", "int4", "--int4-algorithm", "imatrix-gptq", "--int4-asymmetric", "--int4-lm-head", "int8",
             "--int4-accuracy-level", "4", "--mixed-8bit", "v_proj,down_proj", "--pack-siblings", "--int8-block-size", "128",
             "--calibration", "{calibration}"],
            "{merged}", [("option", "--int8-block-size")], "int8 blocks")
        # the same with the 8-bit nodes' activation outliers folded into their weights (--smooth-8bit: down_proj's into up_proj,
        # the head's into the final norm): at level 4 the kernel rounds their inputs to int8 in blocks of 128 / 64 too, and
        # one outlier channel sets a block's step (docs/llm.md)
        cli("et-imatrix-gptq-h8-acc4-vd8-pack-w128-smooth", "same, the 8-bit nodes' inputs smoothed (--smooth-8bit)",
            ["--precision", "int4", "--int4-algorithm", "imatrix-gptq", "--int4-asymmetric", "--int4-lm-head", "int8",
             "--int4-accuracy-level", "4", "--mixed-8bit", "v_proj,down_proj", "--pack-siblings", "--int8-block-size", "128",
             "--smooth-8bit", "--calibration", "{calibration}"],
            "{merged}", [("option", "--smooth-8bit")], "int8 blocks")
        # wider blocks: fewer fp32 scales to read and fewer per-block steps in the kernel (576 in blocks of 128 pads the
        # last one); the same GPTQ'd search, int8 head, every body MatMul at 4 bits
        for blk in (64, 128):
            cli(f"et-imatrix-gptq-h8-acc4-b{blk}-pack", f"imatrix-gptq b{blk}, int8 head, siblings packed",
                ["--precision", "int4", "--int4-algorithm", "imatrix-gptq", "--int4-asymmetric", "--int4-lm-head", "int8",
                 "--int4-accuracy-level", "4", "--int4-block-size", str(blk), "--pack-siblings", "--calibration", "{calibration}"],
                "{merged}", [("option", "--pack-siblings")], "imatrix")
        if not quick:
            # asymmetric by construction (hqq): its row is the asymmetric export, a symmetric one is refused
            from edgetune.quant import algorithms

            asymmetric = algorithms(asymmetric_only=True)
            for algo in variants({"quick": False, "full_grid": False, "slow_algorithms": slow_algorithms}):
                a = (algo.get("int4") or {}).get("algorithm")
                if algo["precision"] != "int4" or a in (None, "rtn") or algo["int4"] != int4_variant(algorithm=a)["int4"]:
                    continue
                if a in asymmetric:
                    algo = int4_variant(algorithm=a, symmetric=False)
                api(f"et-{a}", f"edgetune int4 {a} b32, int4 head", algo, slow=a in SLOW_CALIBRATED)
        # recipes landing in parallel (CLI, so an edgetune without them is a 'missing' row)
        cli("et-gguf-fa", "edgetune gguf base + float LoRA adapter, accuracy_level 0", ["--precision", "gguf", "--float-adapter", "{adapter}"],
            "{base_gguf}", [("precision", "gguf"), ("option", "--float-adapter")], "gguf + lora")
        # the demo's default (examples/smollm2-lora-cpu.toml): the same graph, its 4-bit kernels on int8 activations
        cli("et-gguf-fa-acc4", "edgetune gguf base + float LoRA adapter, accuracy_level 4 (the demo's default)",
            ["--precision", "gguf", "--float-adapter", "{adapter}", "--int4-accuracy-level", "4"], "{base_gguf}",
            [("precision", "gguf"), ("option", "--float-adapter")], "gguf + lora")
        cli("et-gguf-fa-acc4-side8", "same, the fused side weights (LoRA A/B, block offsets) at 8 bits (--side-int8)",
            ["--precision", "gguf", "--float-adapter", "{adapter}", "--int4-accuracy-level", "4", "--side-int8"], "{base_gguf}",
            [("precision", "gguf"), ("option", "--side-int8")], "gguf + lora")
        cli("et-rtn-fa", "edgetune int4 RTN base + float LoRA adapter", ["--precision", "int4", "--float-adapter", "{adapter}"], "{base}",
            [("option", "--float-adapter")], "lora")
        # a different fine-tune (trained through the int4 grid), so a CLI row on its own merged model; scored
        # against the demo's float fine-tune (the reference of this group), as a user comparing the two would
        cli("et-qat", "edgetune QAT LoRA (finetune --quant-aware int4) -> int4 RTN b32, int4 head", ["--precision", "int4"],
            "{qat_merged}", [], "qat")
        cli("et-qat-acc4", "same, accuracy_level 4", ["--precision", "int4", "--int4-accuracy-level", "4"], "{qat_merged}", [], "qat")
        h8 = ["--precision", "int4", "--int4-lm-head", "int8"]
        cli("et-qat-h8", "edgetune QAT LoRA, int8 head (quant_aware_lm_head int8) -> int4 RTN b32, int8 head", h8,
            "{qat_h8_merged}", [], "qat-h8")
        cli("et-qat-h8-acc4", "same, accuracy_level 4", h8 + ["--int4-accuracy-level", "4"], "{qat_h8_merged}", [], "qat-h8")
        cli("et-qat-h8-b64-acc4", "edgetune QAT LoRA on blocks of 64, int8 head -> int4 RTN b64, int8 head, accuracy_level 4",
            h8 + ["--int4-block-size", "64", "--int4-accuracy-level", "4", "--pack-siblings"], "{qat_h8_b64_merged}",
            [("option", "--pack-siblings")], "qat-h8-b64")
        cli("et-auto", "edgetune --recipe auto", ["--recipe", "auto", "--calibration", "{calibration}"], "{merged}",
            [("option", "--recipe")], "recipes", timeout="auto_timeout_s")
    else:
        api("et-rtn-h8", "edgetune int4 RTN b32, int8 head", int4_variant(lm_head="int8"))
        cli("et-gguf", "edgetune gguf (exact GGUF transcode)", ["--precision", "gguf"], "{base_gguf}", [("precision", "gguf")], "gguf")
    return rows


def check_available(row: dict, cli: dict, fields: set[str]) -> str | None:
    """Why this edgetune cannot make the row yet (None: it can); ``cli`` as :func:`export_cli` returns it."""
    for kind, what in row.get("needs", []):
        if kind == "option" and what not in cli["options"]:
            alt = ""
            if what == "--float-adapter" and "adapter" in fields:
                alt = " (the build config has a target field `adapter`; the bench uses the export option)"
            return f"`edgetune export` has no {what} yet (engineer {row['owner']}){alt}"
        if kind == "precision" and what not in cli["precisions"]:
            return f"`edgetune export --precision` has no '{what}' yet (engineer {row['owner']})"
    return None


# ---------------------------------------------------------------- reference, task

def reference(model_dir: Path, text: str, s: dict, root: Path, group: str, fresh: bool, log: Log, name: str = "") -> tuple[Path, dict]:
    """PyTorch fp32 of the folder on one text, llama-perplexity chunks: the pack (edgetune.validate.reference) and the worker job file."""
    import numpy as np

    from edgetune import console
    from edgetune.device import metrics as M
    from edgetune.validate.reference import build_decoder_reference, is_pack, load_pack, text_sha

    k = key({"model": sha_folder(model_dir), "text": text_sha(text), "chunk": s["chunk"], "eval_tokens": s["eval_tokens"], "topk": s["topk"]})
    pack_dir = root / "reference" / f"peers-{group}-{k}"
    if fresh or not is_pack(pack_dir):
        console.configure(quiet=True)
        t0 = time.perf_counter()
        pack = build_decoder_reference(model_dir, text, window=s["chunk"], stride=None, method="chunked", topk=s["topk"],
                                       max_new_tokens=1, prompts=["Hi"], eval_tokens=s["eval_tokens"])
        shutil.rmtree(pack_dir, ignore_errors=True)
        pack.save(pack_dir)
        log(f"{group}: fp32 reference (PyTorch, chunked {s['chunk']}) on {name or 'the text'}: PPL {pack.meta['perplexity']:.3f} "
            f"in {time.perf_counter() - t0:.0f} s")
    pack = load_pack(pack_dir)
    ids = pack.arrays["ids"]
    ws = M.windows(len(ids), pack.meta["window"], pack.meta.get("stride"), pack.meta["method"])
    job = pack_dir / "peer_job.npz"
    np.savez(job, ids=ids, windows=np.asarray(ws, dtype=np.int64), top_ids=pack.arrays["top_ids"], top_logp=pack.arrays["top_logp"],
             nll=pack.arrays["nll"])
    return job, {"perplexity": pack.meta["perplexity"], "tokens": int(len(ids)), "tokens_scored": int(len(pack.arrays["nll"])),
                 "computed_with": pack.meta.get("computed_with"), "pack": str(pack_dir)}


def task_job(tok, model_dir: Path, root: Path, group: str, limit: int | None) -> tuple[Path, list[str], list[int]]:
    """Prompt ids (HF chat template, generation prompt), expected answers, EOS ids: the same for every engine."""
    rows = [json.loads(ln) for ln in TASK_DATA.read_text(encoding="utf-8").splitlines() if ln.strip()][:limit]
    prompts, want = [], []
    for r in rows:
        msgs = r["messages"]
        prompts.append([int(t) for t in tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)])
        want.append(msgs[-1]["content"])
    gc = json.loads((model_dir / "generation_config.json").read_text()) if (model_dir / "generation_config.json").is_file() else {}
    eos = gc.get("eos_token_id", tok.eos_token_id)
    eos = sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None} | ({tok.eos_token_id} - {None}))
    max_new = max(len(tok(w)["input_ids"]) for w in want) + 16
    job = root / "reference" / f"peers-task-{group}.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"prompts": prompts, "max_new_tokens": max_new, "eos": eos}))
    return job, want, eos


def torch_task(model_dir: Path, job: Path, root: Path, group: str, fresh: bool, cached_only: bool = False) -> dict | None:
    """Greedy answers of the PyTorch fp32 model (the reference row's task accuracy), cached.
    ``cached_only`` (--quick): None unless a previous run left them (eager PyTorch is the slowest engine)."""
    spec = json.loads(job.read_text())
    cache = root / "reference" / f"peers-task-torch-{group}-{key({'model': sha_folder(model_dir), 'job': spec})}.json"
    if not fresh and cache.is_file():
        return json.loads(cache.read_text())
    if cached_only:
        return None
    import torch

    from edgetune.model_input import load_causal_lm

    model = load_causal_lm(model_dir).eval()
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in spec["prompts"]:
            x = torch.tensor([p], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=spec["max_new_tokens"], do_sample=False,
                               pad_token_id=spec["eos"][0], eos_token_id=spec["eos"])
            new = [int(t) for t in y[0, len(p):]]
            outs.append(new[: next((i for i, t in enumerate(new) if t in spec["eos"]), len(new))])
    res = {"outputs": outs, "task_s": round(time.perf_counter() - t0, 1)}
    cache.write_text(json.dumps(res))
    return res


def score_task(outputs: list[list[int]], want: list[str], tok, same: Callable[[str, str], bool]) -> dict:
    got = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    hits = [same(g, w) for g, w in zip(got, want)]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "hits": sum(hits), "examples": [{"got": g, "want": w} for g, w in list(zip(got, want))[:3]]}


# ---------------------------------------------------------------- speed, interleaved

def interleaved_speed(peer: Peer, rows: list[dict], s: dict, job: Path, log: Log) -> None:
    """Each round runs every (row, threads) once, in a fresh process, so load changes hit all rows alike."""
    todo = [(r, t) for r in rows if r.get("status") == "ok" for t in s["threads"]]
    runs: dict[tuple[str, int], list[dict]] = {(r["id"], t): [] for r, t in todo}
    errors: dict[tuple[str, int], str] = {}
    for rnd in range(s["rounds"]):
        t0 = time.perf_counter()
        for r, t in todo:
            k = (r["id"], t)
            if k in errors:
                continue
            try:
                runs[k].append(worker(peer, "speed", r["engine"], r["artifact"], "--job", str(job), "--threads", str(t), timeout=900))
            except Exception as exc:  # noqa: BLE001
                errors[k] = str(exc)
        log(f"speed round {rnd + 1}/{s['rounds']}: {len(todo)} runs in {time.perf_counter() - t0:.0f} s (load {os.getloadavg()[0]:.1f})")
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["speed"] = {}
        for t in s["threads"]:
            k = (r["id"], t)
            rs = runs.get(k) or []
            if k in errors or not rs:
                r["speed"][str(t)] = {"error": errors.get(k, "no run")}
                continue
            dec = [x for z in rs for x in z["decode_tok_s_samples"]]
            ttft = [x for z in rs for x in z["ttft_ms_samples"]]
            r["speed"][str(t)] = {"decode_tok_s": round(statistics.median(dec), 2), "ttft_ms": round(statistics.median(ttft), 1),
                                  "decode_tok_s_samples": dec, "ttft_ms_samples": ttft, "peak_rss_mb": max(z["peak_rss_mb"] for z in rs),
                                  # round i of every row ran under the same load: ratios pair them (see ratios)
                                  "decode_tok_s_rounds": [round(statistics.median(z["decode_tok_s_samples"]), 2) for z in rs],
                                  "load_s": round(statistics.median(z["load_s"] for z in rs), 3), "rounds": len(rs),
                                  "generated_ids": rs[-1].get("generated_ids")}


def ratios(rows: list[dict], threads: list[int]) -> None:
    """Each row against llama.cpp Q4_K_M of the same model (same run, same rounds)."""
    bar = next((r for r in rows if r.get("llama_type") == BAR and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("status") != "ok" or bar is None:
            continue
        v: dict[str, Any] = {}
        if r.get("size_mb") and bar.get("size_mb"):
            v["size"] = round(r["size_mb"] / bar["size_mb"], 3)
        if r.get("read_mb") and bar.get("read_mb"):
            v["read"] = round(r["read_mb"] / bar["read_mb"], 3)
        for t in threads:
            a, b = (r.get("speed") or {}).get(str(t), {}), (bar.get("speed") or {}).get(str(t), {})
            if a.get("decode_tok_s") and b.get("decode_tok_s"):
                v[f"decode_{t}t"] = round(a["decode_tok_s"] / b["decode_tok_s"], 3)
                spread = round_ratio_range(a.get("decode_tok_s_rounds"), b.get("decode_tok_s_rounds"))
                if spread:
                    v[f"decode_{t}t_rounds"] = spread
            if a.get("ttft_ms") and b.get("ttft_ms"):
                v[f"ttft_{t}t"] = round(a["ttft_ms"] / b["ttft_ms"], 3)
        dppl, dppl_se = {}, {}
        for name, qa in (r.get("quality_by_text") or {}).items():
            qb = (bar.get("quality_by_text") or {}).get(name) or {}
            if qa.get("perplexity_increase_pct") is not None and qb.get("perplexity_increase_pct") is not None:
                dppl[name] = round(qa["perplexity_increase_pct"] - qb["perplexity_increase_pct"], 3)
                se = paired_se_pt(qa, qb)
                if se is not None:
                    dppl_se[name] = round(se, 3)
        if dppl:
            v["dppl_pt"] = dppl  # per text: this row's ΔPPL minus Q4_K_M's, percentage points
        if dppl_se:
            v["dppl_se_pt"] = dppl_se  # its standard error (paired over the same scoring windows)
        ta, tb = r.get("task") or {}, bar.get("task") or {}
        if ta.get("exact_match") is not None and tb.get("exact_match") is not None:
            v["exact_match_pt"] = round(100 * (ta["exact_match"] - tb["exact_match"]), 1)
        r["vs_q4_k_m"] = v


def round_ratio_range(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    """[lowest, highest] of a row's decode speed over Q4_K_M's **round by round** (round i of both ran back to back,
    under the same load): how far the ratio moves within one run, which the median ratio alone hides (this VM's 2-thread
    ratios moved by 8 % between two runs of the same graph). None with fewer than two paired rounds."""
    pairs = [x / y for x, y in zip(a or [], b or []) if x and y]
    return [round(min(pairs), 3), round(max(pairs), 3)] if len(pairs) >= 2 else None


def paired_se_pt(qa: dict, qb: dict) -> float | None:
    """Standard error of ΔPPL(a) - ΔPPL(b), percentage points, from both rows' per-window NLL differences on the same
    windows (``window_nll_delta``: paired, so what the two share, the text's hard passages, cancels). None when either
    row lacks them or their windows differ."""
    from edgetune.device.metrics import increase_se_pct

    wa, wb = qa.get("window_nll_delta"), qb.get("window_nll_delta")
    if not wa or not wb or len(wa) != len(wb):
        return None
    d = [x - y for x, y in zip(wa, wb)]
    mean = sum(wa) / len(wa) / 2 + sum(wb) / len(wb) / 2  # the delta method's exp() at the pair's mean level
    return increase_se_pct(d, mean)


# ---------------------------------------------------------------- the section

def run(a: Any, root: Path, notes: list[str], log: Log) -> dict:
    from transformers import AutoTokenizer

    from edgetune.model_input import materialize, resolve

    s = settings(a.quick, a)
    where = {"shakespeare": Path(a.peer_text)} if getattr(a, "peer_text", None) else {}
    out: dict[str, Any] = {"settings": s, "groups": {}, "rows": [], "notes": []}
    # the evaluation texts (judge first, then the seen one) and what each is: results and report name them
    evals = T.load(("judge", "seen"), s["eval_tokens"], **where)
    out["texts"] = [{**t.meta(), "eval_tokens": s["eval_tokens"]} for t in evals]
    out["notes"] += [t.note for t in evals if t.note]
    evals = [t for t in evals if t.text is not None]
    if not any(t.role == "judge" for t in evals):
        out["notes"].append("no judge text on this machine: the quality columns are from the seen text only, and no row can meet the goal")
    peer = Peer(getattr(a, "peers_venv", None))
    if peer.ok and getattr(a, "mask_cpu", None):  # an AVX2 run against a llama.cpp compiled for AVX-512 compares nothing
        from .cpumask import peer_refusal

        peer.problem = peer_refusal(peer.system_info)
    out["peer"] = {"venv": str(peer.venv) if peer.venv else None, "llama_cpp_python": peer.version, "problem": peer.problem,
                   "build_seconds": peer.build_s, "converter": str(peer.converter) if peer.converter else None,
                   "system_info": peer.system_info}
    if not peer.ok:
        out["notes"].append(f"llama.cpp rows missing: {peer.problem}")
        log(f"peer: {peer.problem}")
    else:
        log(f"peer: llama-cpp-python {peer.version} in {peer.venv}")
    same, metric_name = task_metric()
    out["task_metric"] = metric_name
    cli, fields = export_cli(), build_target_fields()
    demo = demo_models(log, work_dir=getattr(a, "finetune_work", None))
    out["demo"] = demo
    only = {x.strip() for x in (getattr(a, "peer_rows", None) or "").split(",") if x.strip()}
    owners = {r["owner"] for r in edgetune_rows("finetune", s, False) if r["kind"] == "cli" and (not only or r["id"] in only)}
    qat: dict[str, dict] = {}  # the quant-aware fine-tunes, by the rows' owner
    for owner, flag, default in (("qat", "qat_config", QAT_CONFIG), ("qat-h8", "qat_h8_config", QAT_H8_CONFIG),
                                 ("qat-h8-b64", "qat_h8_b64_config", QAT_H8_B64_CONFIG)):
        if owner not in owners:
            continue
        config = Path(getattr(a, flag, None) or default).resolve()
        if getattr(a, "finetune_work", None):
            qat[owner] = {"error": "no quant-aware fine-tune (--finetune-work given)"}
        elif not config.is_file():
            qat[owner] = {"error": f"{config} not found"}
        else:
            try:
                qat[owner] = demo_models(log, config=config)
            except RuntimeError as exc:  # the QAT rows then say why; the rest of the comparison goes on
                qat[owner] = {"error": str(exc)}
    out["qat"] = qat
    base_gguf = resolve("smollm2")
    base_dir = Path(materialize("smollm2").path)
    models = {"finetune": Path(demo["merged"]), "base": base_dir}
    cal = calibration_file(root)  # the tune text, checked against the judge texts (texts.check_calibration_file)
    # what an export reads when it gets no --calibration: the project's generic sets (calibration/*.jsonl), checked the same way
    for generic in sorted((ROOT / "calibration").glob("*.jsonl")):
        T.check_calibration_file(generic, **where)
    subst = {"{adapter}": demo["adapter"], "{base_gguf}": str(base_gguf), "{base}": str(base_dir), "{merged}": demo["merged"], "{qat_merged}": qat.get("qat", {}).get("merged", ""),
             "{qat_h8_merged}": qat.get("qat-h8", {}).get("merged", ""), "{qat_h8_b64_merged}": qat.get("qat-h8-b64", {}).get("merged", ""),
             "{calibration}": str(cal) if cal else ""}
    s["text_name"] = "; ".join(f"{t.name} ({t.kind}, {t.role})" for t in evals) or "no text"
    all_rows: list[dict] = []
    for group in s["groups"]:
        model_dir = models[group]
        mkey = sha_folder(model_dir)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        g: dict[str, Any] = {"model": str(model_dir), "model_sha": mkey,
                             "label": (("demo fine-tune (merged)" if not demo.get("work") else f"fine-tune (merged) from {shown(demo['work'])}")
                                       if group == "finetune" else "base SmolLM2-135M-Instruct (fp32 from the shipped GGUF)")}
        out["groups"][group] = g
        log(f"== peers: {group} ({model_dir})")
        # references: one fp32 pack (and worker job) per evaluation text
        jobs: dict[str, Path] = {}
        refs: dict[str, dict] = {}
        for t in evals:
            jobs[t.name], refs[t.name] = reference(model_dir, t.text, s, root, group, a.fresh, log, name=t.name)
        g["references"] = refs
        tjob, want, eos = task_job(tok, model_dir, root, group, s["task_limit"])
        # the speed prompt: the seen text's start as before (speed does not depend on which text), else filler
        ptext = next((t.text for t in evals if t.role == "seen"), None) or "The quick brown fox jumps over the lazy dog. " * 30
        prompt_ids = tok(ptext)["input_ids"][: s["prompt_tokens"]]
        sjob = root / "reference" / f"peers-speed-{group}.json"
        sjob.write_text(json.dumps({"prompt_ids": prompt_ids, "new_tokens": s["new_tokens"], "warmup_tokens": s["warmup_tokens"], "repeats": 1}))
        rows: list[dict] = [{"id": "ref", "label": "PyTorch fp32 (reference)", "toolchain": "reference", "engine": "torch", "status": "ok",
                             "size_mb": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20, 2),
                             "quality_by_text": {n: {"perplexity": ref.get("perplexity"), "perplexity_increase_pct": 0.0, "kl_divergence": 0.0,
                                                     "top1_agreement": 1.0, "tokens_scored": ref.get("tokens_scored")} for n, ref in refs.items()},
                             "speed_note": "not speed-measured (the reference)"}]
        try:
            tt = torch_task(model_dir, tjob, root, group, a.fresh, cached_only=s["quick"])
            if tt is None:
                rows[0]["task_note"] = "task not run with PyTorch in --quick (edgetune fp32 is the fp32 figure); a full run caches it"
            else:
                rows[0]["task"] = score_task(tt["outputs"], want, tok, same)
        except Exception as exc:  # noqa: BLE001
            rows[0]["task"] = {"error": f"{type(exc).__name__}: {exc}"}
        # llama.cpp
        types = [t for t in LLAMA_TYPES if not (s["quick"] and t == "F32")]
        ggufs = gguf_files(peer, model_dir, group, root, types, log)
        for t in types:
            info = ggufs.get(t) or {"status": "failed", "error": "not made"}
            rows.append({"id": f"llama-{t.lower()}", "label": f"llama.cpp {t}", "toolchain": "llama.cpp", "engine": "llama", "llama_type": t,
                         "recipe": f"convert_hf_to_gguf.py --outtype f32{'' if t == 'F32' else f' + llama_model_quantize {t}'}",
                         "status": info["status"], "error": info.get("error"), "artifact": info.get("path"), "size_mb": info.get("size_mb"),
                         "read_mb": read_mb(info.get("path"))})
        # edgetune
        for spec in edgetune_rows(group, s, getattr(a, "slow_algorithms", False)):
            if only and spec["id"] not in only:
                continue
            row = {k: spec[k] for k in ("id", "label", "toolchain", "engine")}
            if spec["kind"] == "api":
                v = spec["variant"]
                row["recipe"] = {"precision": v["precision"], "int4": v.get("int4")}
                if spec.get("slow") and not getattr(a, "slow_algorithms", False):
                    _, folder = export_spec(v, model_dir, root, model_key=mkey)
                    if not (folder / "edgetune.json").is_file():
                        row.update(status="skipped", error="slow calibrated algorithm (~10 min export on 2 cores): add --slow-algorithms once, cached afterwards")
                        rows.append(row)
                        continue
                info = api_export(v, model_dir, mkey, root, s, a.fresh)
            else:
                args = [subst.get(x, x) for x in spec["args"]]
                if "" in args:  # e.g. no calibration text here: drop the option and its empty value
                    i = args.index("")
                    args = args[:i - 1] + args[i + 1:]
                model = subst.get(spec["model"], spec["model"])
                if not model:
                    row.update(status="skipped", error=qat.get(spec["owner"], {}).get("error") or "no quant-aware fine-tune")
                    rows.append(row)
                    continue
                row["recipe"] = "edgetune export " + " ".join(["MODEL"] + [x if not x.startswith("/") else Path(x).name for x in args])
                why = check_available(spec, cli, fields)
                if why:
                    row.update(status="missing", error=why)
                    rows.append(row)
                    log(f"{row['label']}: missing: {why}")
                    continue
                mk = mkey if model == str(model_dir) else sha_folder(Path(model)) if Path(model).is_dir() else hashlib.sha256(str(model).encode()).hexdigest()[:12]
                timeout = s[spec.get("timeout", "export_timeout_s")]
                info = cli_export(args, model, key([mk, sha_folder(Path(demo["adapter"])) if "{adapter}" in spec["args"] else None]),
                                  spec["id"], root, timeout, log, a.fresh)
            row["status"] = info["status"]
            row["error"] = info.get("error")
            row["export_s"] = info.get("export_s")
            if info.get("folder"):
                row["artifact"] = info["folder"]
                row["size_mb"] = size_mb(Path(info["folder"]))
                row["read_mb"] = read_mb(info["folder"])
                try:
                    rec = json.loads((Path(info["folder"]) / "edgetune.json").read_text())
                    row["record"] = {k: rec.get("results", {}).get(k) for k in ("size_mb", "matmulnbits", "recipe", "search")
                                     if rec.get("results", {}).get(k) is not None}
                except (OSError, ValueError):
                    pass
            if row["status"] != "ok":
                log(f"{row['label']}: {row['status']}: {row['error']}")
            rows.append(row)
        # quality and task, one process per row
        for r in rows:
            if r.get("status") != "ok" or r["engine"] == "torch":
                continue
            t0 = time.perf_counter()
            if jobs:  # every text in one process (the model loaded once), the same ids as the reference's
                try:
                    res = worker(peer, "score", r["engine"], r["artifact"], *[x for j in jobs.values() for x in ("--job", str(j))],
                                 "--threads", str(os.cpu_count() or 1))
                    r["quality_by_text"] = dict(zip(jobs, res["texts"]))
                except Exception as exc:  # noqa: BLE001
                    r["quality_by_text"] = {n: {"error": str(exc)} for n in jobs}
            try:
                res = worker(peer, "task", r["engine"], r["artifact"], "--job", str(tjob), "--threads", str(os.cpu_count() or 1))
                r["task"] = score_task(res["outputs"], want, tok, same)
                r["task"]["task_s"] = res.get("task_s")
                if res.get("adapter"):
                    r["adapter"] = res["adapter"]
            except Exception as exc:  # noqa: BLE001
                r["task"] = {"error": str(exc)}
            tk = r.get("task") or {}
            qs = [f"{n} PPL {q['perplexity']:.3f} ({q['perplexity_increase_pct']:+.2f}%), KL {q['kl_divergence']:.4f}, top-1 {100 * q['top1_agreement']:.1f}%"
                  if "perplexity" in q else f"{n}: {q.get('error')}" for n, q in (r.get("quality_by_text") or {}).items()]
            log(f"{r['label']}: " + "; ".join(qs + [f"exact match {100 * tk['exact_match']:.1f}%" if "exact_match" in tk else f"task: {tk.get('error')}"])
                + f" ({time.perf_counter() - t0:.0f} s)")
        for r in rows:
            r["group"] = group
        all_rows += rows
    # speed: every group's rows, interleaved in the same rounds
    for group in s["groups"]:
        grows = [r for r in all_rows if r["group"] == group and r["engine"] != "torch"]
        interleaved_speed(peer, grows, s, root / "reference" / f"peers-speed-{group}.json", log)
        ratios([r for r in all_rows if r["group"] == group], s["threads"])
        goals([r for r in all_rows if r["group"] == group], out["texts"])
    out["rows"] = all_rows
    out["summary"] = summary(out)
    return out


def fp32_exact_match(rows: list[dict]) -> tuple[float | None, str]:
    """The fp32 fine-tune's task exact match: the PyTorch reference's, else edgetune fp32's (--quick skips PyTorch's)."""
    for rid, what in (("ref", "PyTorch fp32"), ("et-fp32", "edgetune fp32")):
        r = next((x for x in rows if x.get("id") == rid and x.get("status") == "ok"), None)
        em = ((r or {}).get("task") or {}).get("exact_match")
        if em is not None:
            return em, what
    return None, "no fp32 task figure"


def goals(rows: list[dict], texts: list[dict]) -> None:
    """Issue 33's goal (GOAL) for every measured row of one group, vs llama.cpp Q4_K_M of the same run.

    r["goal"] = {"met": True | False | None (not every figure measured), "misses": [...], "unknown": [...]}:
    ΔPPL <= Q4_K_M's on every judge text (never the seen one), exact match within 1 point of the fp32
    fine-tune, size <= 1.15x Q4_K_M, decode >= 1.5x Q4_K_M at 1 and at 2 threads."""
    bar = next((r for r in rows if r.get("llama_type") == BAR and r.get("status") == "ok"), None)
    judge = [t["name"] for t in texts if t.get("role") == "judge" and t.get("chars")]
    fp32, fp32_what = fp32_exact_match(rows)
    for r in rows:
        if r.get("status") != "ok" or r.get("toolchain") == "reference" or bar is None or r is bar:
            continue
        v = r.get("vs_q4_k_m") or {}
        misses: list[str] = []
        unknown: list[str] = [] if judge else ["no judge text"]
        for n in judge:
            d = (v.get("dppl_pt") or {}).get(n)
            if d is None:
                unknown.append(f"ΔPPL on {n}")
            elif d > 0:
                misses.append(f"ΔPPL on {n} {d:+.2f} pt over Q4_K_M")
        em = (r.get("task") or {}).get("exact_match")
        if em is None or fp32 is None:
            unknown.append("exact match" if fp32 is not None else f"exact match ({fp32_what})")
        elif round(100 * (fp32 - em), 6) > GOAL["exact_match_pt"]:  # rounded: 0.5 - 0.49 is a point, not 1.0000000000000009
            misses.append(f"exact match {100 * (em - fp32):+.1f} pt vs {fp32_what}")
        if v.get("size") is None:
            unknown.append("size")
        elif v["size"] > GOAL["size"]:
            misses.append(f"size {v['size']:.3f}x")  # 3 decimals: a miss never reads as the limit itself
        for t in GOAL["threads"]:
            x = v.get(f"decode_{t}t")
            if x is None:
                unknown.append(f"decode at {t} thread{'s' if t != '1' else ''}")
            elif x < GOAL["decode"]:
                misses.append(f"decode {x:.3f}x at {t} thread{'s' if t != '1' else ''}")
        r["goal"] = {"met": False if misses else (None if unknown else True), "misses": misses, "unknown": unknown,
                     "within_noise": within_noise(v, judge), "judge_texts": judge, "fp32_exact_match_from": fp32_what}


def within_noise(v: dict, judge: list[str]) -> list[str]:
    """The goal's figures this run cannot decide, met or missed: a ΔPPL difference from Q4_K_M smaller than its paired
    standard error, a decode ratio whose round-by-round range straddles the goal's. (On the Xeon of 2026-12-07 one row's
    6-round median read 1.50x and 16 rounds of the same graphs 1.44x; a quarter point of ΔPPL was a quarter of its error.)"""
    out = []
    for n in judge:
        d, se = (v.get("dppl_pt") or {}).get(n), (v.get("dppl_se_pt") or {}).get(n)
        if d is not None and se and abs(d) < se:
            out.append(f"ΔPPL on {n} {d:+.2f} pt, standard error {se:.2f}")
    for t in GOAL["threads"]:
        lo_hi = v.get(f"decode_{t}t_rounds")
        if lo_hi and lo_hi[0] < GOAL["decode"] <= lo_hi[1]:
            out.append(f"decode at {t} thread{'s' if t != '1' else ''} {lo_hi[0]:.2f}-{lo_hi[1]:.2f}x round by round")
    return out


def goal_text(g: dict | None) -> str:
    """One phrase for a row's goal verdict."""
    if not g:
        return "goal not judged"
    noise = g.get("within_noise") or []
    tail = ("; within this run's noise (more --repeats or --peer-eval-tokens would decide): " + "; ".join(noise)) if noise else ""
    if g["met"]:
        return "meets the goal on every judge text" + tail
    if g["met"] is False:
        return "misses the goal: " + "; ".join(g["misses"]) + tail
    return "goal undecided, not measured: " + ", ".join(g["unknown"])


def summary(p: dict) -> list[str]:
    """Where edgetune is ahead of and behind llama.cpp Q4_K_M, in numbers per text, and each row against the goal (finetune group)."""
    rows = [r for r in p.get("rows", []) if r.get("group") == "finetune"]
    bar = next((r for r in rows if r.get("llama_type") == BAR and r.get("status") == "ok"), None)
    if bar is None:
        return ["llama.cpp Q4_K_M was not measured: no comparison."]
    texts = [t for t in p.get("texts", []) if t.get("chars")]
    lines = []
    bt = bar.get("task") or {}
    bs = {t: (bar.get("speed") or {}).get(t, {}).get("decode_tok_s") for t in ("1", "2")}
    bq = ", ".join(f"{t['name']} ({t['role']}) {((bar.get('quality_by_text') or {}).get(t['name']) or {}).get('perplexity_increase_pct', float('nan')):+.2f}%"
                   for t in texts)
    lines.append(f"llama.cpp Q4_K_M: {bar.get('size_mb', 0):.1f} MB, ΔPPL {bq or 'not measured'}, "
                 f"exact match {100 * bt.get('exact_match', float('nan')):.1f}%, decode {bs['1']} / {bs['2']} tok/s (1 / 2 threads).")
    for r in rows:
        if r.get("toolchain") != "edgetune" or r.get("status") != "ok":
            continue
        v = r.get("vs_q4_k_m") or {}
        parts = []
        dp = v.get("dppl_pt") or {}
        if dp:
            parts.append("ΔPPL " + ", ".join(f"{n} {dp[n]:+.2f} pt" for n in [t["name"] for t in texts] if n in dp))
        if "exact_match_pt" in v:
            parts.append(f"exact match {v['exact_match_pt']:+.1f} pt")
        if "size" in v:
            parts.append(f"size {v['size']:.2f}x")
        for t in ("1", "2"):
            if f"decode_{t}t" in v:
                rng = v.get(f"decode_{t}t_rounds")
                within = f" (rounds {rng[0]:.2f}-{rng[1]:.2f}x)" if rng else ""
                parts.append(f"decode {v[f'decode_{t}t']:.2f}x{within} at {t} thread{'s' if t != '1' else ''}")
        lines.append(f"{r['label']} vs Q4_K_M: " + ", ".join(parts) + f"; {goal_text(r.get('goal'))}.")
    judged = [r for r in rows if r.get("goal")]
    met = [r["label"] for r in judged if r["goal"]["met"]]
    judge = ", ".join(t["name"] for t in texts if t["role"] == "judge") or "none on this machine"
    lines.append(f"Goal (issue 33): ΔPPL <= Q4_K_M's on every judge text ({judge}), exact match within {GOAL['exact_match_pt']:g} point "
                 f"of the fp32 fine-tune, size <= {GOAL['size']:g}x and decode >= {GOAL['decode']:g}x Q4_K_M at 1 and 2 threads: "
                 + (f"met by {', '.join(met)}." if met else f"met by no row ({len(judged)} judged)."))
    return lines
