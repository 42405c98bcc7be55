"""`edgetune build` on a tiny config: end to end, skip on re-run, budgets, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetune.bundle import verify
from edgetune.cli import main

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "data" / "smarthome_train.jsonl"

CONFIG = """
name = "tiny"
output = "out"

[model]
base = "{base}"

[data]
train = "train.jsonl"

[finetune]
method = "lora"
max_steps = {steps}
batch_size = 2
max_seq_len = 256
save_steps = 1
eval_fraction = 0.0

{targets}

[validate]
data = "eval.txt"
prompts = "prompts.txt"
eval_tokens = 128
window = 32
max_tokens = 4
prompt_tokens = 16
repeats = {repeats}
warmup = 0
"""

CPU = '[[targets]]\nname = "cpu-x86"\nprecision = "fp32"\n'
TIGHT = '[[targets]]\nname = "tight.toml"\nprecision = "fp32"\narchive = false\n'


def write_config(root: Path, base: Path, *, steps: int = 2, targets: str = CPU, repeats: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:16]))
    (root / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. Turn on the kitchen lights. " * 30)
    (root / "prompts.txt").write_text("Turn on the lights\nWhat is the weather\n")
    (root / "tight.toml").write_text('extends = "cpu-x86"\nname = "tight"\n[budgets]\nmax_size_mb = 0.001\n')
    cfg = root / "build.toml"
    cfg.write_text(CONFIG.format(base=base, steps=steps, targets=targets, repeats=repeats))
    return cfg


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(scope="module")
def first_build(module_tmp, tiny_llama):
    root = module_tmp("build")
    cfg = write_config(root, tiny_llama)
    # a cache of its own: the shared one ($EDGETUNE_CACHE/stages) keeps this fine-tune from an earlier test run, and the
    # first build would reuse it instead of running it (a second `make test` on one checkout failed here)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_CACHE", str(module_tmp("cache")))
        with pytest.raises(SystemExit) as exc:
            main(["build", str(cfg), "--json", "--quiet"])
    assert exc.value.code == 0
    return root, cfg, json.loads((root / "out" / "build-summary.json").read_text())


def test_build_produces_verified_bundle_and_summary(first_build):
    root, _, res = first_build
    assert res["passed"] and [t["target"] for t in res["targets"]] == ["cpu-x86"]
    ran = [s["stage"] for s in res["stages"] if s["status"] == "ran"]
    assert ran == ["materialize", "finetune", "merge", "export", "validate", "bundle"]
    row = res["targets"][0]
    assert row["result"] == "pass" and row["size_mb"] > 0 and "tok/s" in row["latency"]
    assert re.fullmatch(r"ppl [+-]\d+\.\d\d% ±\d+\.\d\d", row["accuracy"]), row["accuracy"]  # with its standard error
    bundle = root / "out" / "cpu-x86"
    assert verify(bundle)["ok"] and verify(root / "out" / "cpu-x86.tar.gz")["ok"]
    m = json.loads((bundle / "manifest.json").read_text())
    prov = m["provenance"]["summary"]
    assert {"base_model", "dataset", "adapter"} <= set(prov)
    assert not any(p.name.startswith(".") for p in (root / "out").iterdir() if p.name != ".work")


def test_second_run_skips_every_stage(first_build, capsys):
    root, cfg, first = first_build
    arc = (root / "out" / "cpu-x86.tar.gz").read_bytes()
    t0 = time.perf_counter()
    code, out, err = run_cli(["build", str(cfg)], capsys)
    took = time.perf_counter() - t0
    assert code == 0
    assert "0 stage(s) ran, 5 skipped" in out and "cpu-x86" in out and "pass" in out
    for stage in ("finetune", "merge", "export.cpu-x86", "validate.cpu-x86", "bundle.cpu-x86"):
        assert f"[{stage}] up to date, skipped" in err
    assert (root / "out" / "cpu-x86.tar.gz").read_bytes() == arc
    print(f"second build: {took:.2f}s")


def test_changed_option_reruns_only_downstream_stages(first_build, tiny_llama, capsys):
    root, cfg, _ = first_build
    write_config(root, tiny_llama, repeats=2)
    try:
        code, out, err = run_cli(["build", str(cfg), "--json"], capsys)
        assert code == 0
        status = {s["stage"]: s["status"] for s in json.loads(out)["stages"]}
        assert status == {"materialize": "ran", "finetune": "skipped", "merge": "skipped", "export": "skipped",
                          "validate": "ran", "bundle": "ran"}
        # each stage that runs again says why: the option that changed, or the input it made
        assert "[validate.cpu-x86] runs again: option repeats changed" in err, err
        assert "[bundle.cpu-x86] runs again: input report changed" in err, err
    finally:
        write_config(root, tiny_llama)


def test_changed_stage_code_reruns_that_stage(first_build, capsys, monkeypatch):
    """An output made by other code is not up to date: edgetune's version stays "0.1.0" on a git install while its
    code changes (a build kept a stale export after the exporter changed). Here only the bundle stage's code
    "changed": the bundle is made again, nothing upstream."""
    from edgetune import artifacts
    from edgetune.artifacts import code_identity
    from edgetune.stage_code import stage_kind

    root, cfg, _ = first_build
    assert run_cli(["build", str(cfg), "--quiet"], capsys)[0] == 0  # settled: whatever an earlier test changed is made again
    monkeypatch.setattr(artifacts, "code_identity",
                        lambda stage: "edited" if stage_kind(stage) == "bundle" else code_identity(stage))
    code, out, err = run_cli(["build", str(cfg), "--json"], capsys)
    assert code == 0
    status = {s["stage"]: s["status"] for s in json.loads(out)["stages"]}
    assert status == {"materialize": "ran", "finetune": "skipped", "merge": "skipped", "export": "skipped",
                      "validate": "skipped", "bundle": "ran"}
    assert "[bundle.cpu-x86] runs again: its code changed (edgetune's modules for this stage, or a library's version)" in err
    monkeypatch.undo()  # the real code again: the bundle made by the "edited" code is not up to date either
    code, out, _ = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code == 0 and {s["stage"]: s["status"] for s in json.loads(out)["stages"]}["bundle"] == "ran"


def test_missed_budget_exits_1_and_keeps_bundle_out_of_the_deploy_path(first_build, tiny_llama, capsys):
    root, cfg, _ = first_build
    write_config(root, tiny_llama, targets=CPU + TIGHT)
    try:
        code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
        assert code == 1 and "tight" in err and "missed their budgets" in err
        res = json.loads(out)
        rows = {r["target"]: r for r in res["targets"]}
        assert rows["cpu-x86"]["result"] == "pass" and rows["tight"]["result"].startswith("FAIL") and "size_mb" in rows["tight"]["result"]
        assert not (root / "out" / "tight").exists()
        rejected = root / "out" / "rejected" / "tight"
        assert verify(rejected)["ok"]
        assert json.loads((rejected / "manifest.json").read_text())["figures"]["passed"] is False
        assert (root / "out" / ".work" / "validate-tight" / "report.md").is_file()
    finally:
        write_config(root, tiny_llama)


def test_bad_config_is_exit_2_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "b.toml"
    cfg.write_text('name = "x"\n[model]\nbase = "smollm2"\n[[targets]]\nname = "cpu-x86"\nprecison = "int4"\n')
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "targets.0.precison" in err
    cfg.write_text('name = "x"\n[model]\nbase = "smollm2"\n[finetune]\nmethod = "lora"\n[[targets]]\nname = "cpu-x86"\n')
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "data.train" in err
    cfg.write_text('name = "x"\n[model]\nbase = "smollm2"\n[[targets]]\nname = "no-such-target"\n')
    code, _, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "no-such-target" in err


def test_target_int4_overrides_are_checked_before_any_work_and_reach_the_export(first_build, tiny_llama, tiny_bert, tmp_path, capsys):
    root, cfg, _ = first_build
    bad = [('int4 = { lm_heads = "int8" }\n', "targets.0.int4.lm_heads (did you mean 'lm_head'?)"),
           ('int4 = { lm_head = "int3" }\n', "targets[0].int4: int4 lm_head 'int3' is not supported"),
           ('int4 = { block_size = 48 }\n', "targets[0].int4: int4 block size 48"),
           ('int4 = { int8_block_size = 48 }\n', "targets[0].int4: 8-bit block size 48"),
           ('int4 = { algorithm = "awq2" }\n', "targets[0].int4: unknown int4 algorithm 'awq2'")]
    for line, words in bad:
        c = write_config(tmp_path / "bad", tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n' + line)
        code, _, err = run_cli(["build", str(c), "--quiet"], capsys)
        assert code == 2 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "bad" / "out").exists()  # refused before any stage
    c = write_config(tmp_path / "fp", tiny_llama, targets=CPU + 'int4 = { lm_head = "int8" }\n')
    code, _, err = run_cli(["build", str(c), "--quiet"], capsys)
    assert code == 2 and "targets[0].int4 is set but the target exports at fp32" in err
    # a gguf target keeps the GGUF's blocks: its int4 table may only pick the kernels' accuracy_level
    c = write_config(tmp_path / "gg", tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "gguf"\n'
                     'int4 = { accuracy_level = 4, lm_head = "int8" }\n')
    code, _, err = run_cli(["build", str(c), "--quiet"], capsys)
    assert code == 2 and "targets[0].int4 sets lm_head, but a gguf target keeps the GGUF's own quantization" in err, err
    assert not (tmp_path / "gg" / "out").exists()
    c = write_config(tmp_path / "gg8", tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "gguf"\n'
                     'int4 = { int8_block_size = 128 }\n')
    code, _, err = run_cli(["build", str(c), "--quiet"], capsys)
    assert code == 2 and "targets[0].int4 sets int8_block_size, but a gguf target" in err, err
    c = write_config(tmp_path / "enc", tiny_bert, targets='[[targets]]\nname = "cpu-x86"\nint4 = { lm_head = "int8" }\n')
    code, _, err = run_cli(["build", str(c), "--quiet"], capsys)
    assert code == 2 and "targets[0].int4 applies to decoder LLMs" in err
    assert not (tmp_path / "enc" / "out" / ".work" / "adapter").exists()  # no fine-tune ran
    # it reaches the graph: lm_head int8 + accuracy_level 4 on the tiny model's int4 export
    write_config(root, tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "int4"\narchive = false\n'
                 'int4 = { lm_head = "int8", accuracy_level = 4, int8_block_size = 64 }\n')
    try:
        code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
        assert code in (0, 1), err
        status = {s["stage"]: s["status"] for s in json.loads(out)["stages"]}
        assert status["finetune"] == "skipped" and status["export"] == "ran"
        rec = json.loads((root / "out" / ".work" / "export-cpu-x86" / "edgetune.json").read_text())
        r = rec["results"]
        assert r["int4"]["lm_head"] == "int8" and r["int4"]["accuracy_level"] == 4 and r["lm_head"]["kind"] == "int8"
        assert r["lm_head"]["block_size"] == 64 and {n["block_size"] for n in r["matmulnbits"] if n["bits"] == 4} == {32}
        assert {n["accuracy_level"] for n in r["matmulnbits"]} == {4}
    finally:
        write_config(root, tiny_llama)


def _count_profile_reads(monkeypatch) -> dict:
    """Profile files read, by name: each top-level read of edgetune.targets (an extends parent is not counted)."""
    import edgetune.targets as T

    reads: dict[str, int] = {}
    read_raw = T._read_raw

    def counting(path, seen=()):
        if not seen:
            reads[Path(path).stem] = reads.get(Path(path).stem, 0) + 1
        return read_raw(path, seen)

    monkeypatch.setattr(T, "_read_raw", counting)
    return reads


def test_a_build_reads_each_target_profile_once(tiny_llama, tmp_path, monkeypatch):
    """The build resolves each [[targets]] entry once and hands the Target down to export, validate and bundle
    (it was read 6 times per target: the checks, the loop, export, the export core, validate, bundle)."""
    from edgetune.build import build, load_config

    targets = ('[[targets]]\nname = "cpu-x86"\nprecision = "fp32"\n'
               '[[targets]]\nname = "board.toml"\nprecision = "int4"\narchive = false\nint4 = { lm_head = "int8" }\n')
    cfg = write_config(tmp_path / "once", tiny_llama, targets=targets)
    (tmp_path / "once" / "board.toml").write_text('extends = "cpu-x86"\nname = "board"\n')
    cfg.write_text(cfg.read_text().replace('method = "lora"', 'method = "none"'))
    reads = _count_profile_reads(monkeypatch)
    import edgetune.plan as plan

    checks = []
    monkeypatch.setattr(plan, "int4_options", lambda t, int4, f=plan.int4_options: checks.append(int4) or f(t, int4))
    res = build(cfg)
    assert res["passed"] and [r["target"] for r in res["targets"]] == ["cpu-x86", "board"]
    assert {s["stage"] for s in res["stages"] if s["status"] == "ran"} >= {"export", "validate", "bundle"}
    assert reads == {"cpu-x86": 1, "board": 1}
    assert checks == [{"lm_head": "int8"}]  # the int4 overrides: checked once (by the build), not again by the export
    rec = json.loads((tmp_path / "once" / "out" / ".work" / "export-board" / "edgetune.json").read_text())
    assert rec["results"]["int4"]["lm_head"] == "int8"  # the plan checked once by the build reached the export
    # a quant-aware config checks its targets while it is parsed: the build reuses those Targets
    reads.clear()
    qa = write_config(tmp_path / "qa", tiny_llama, targets='[[targets]]\nname = "cpu-x86"\nprecision = "int4"\n')
    qa.write_text(qa.read_text().replace("[finetune]\n", '[finetune]\nquant_aware = "int4"\n'))
    parsed, root = load_config(qa)
    assert parsed.profile(parsed.targets[0], root).name == "cpu-x86" and reads == {"cpu-x86": 1}


@pytest.mark.slow  # two tiny builds in fresh processes: ~50 s on 2 cores
def test_sigkill_mid_stage_then_rerun_finishes(tmp_path, tiny_llama):
    cfg = write_config(tmp_path / "k", tiny_llama, steps=4)
    cmd = [sys.executable, "-m", "edgetune", "build", str(cfg), "--json"]
    # a stage cache of its own: the shared one keeps this tiny fine-tune from an earlier test run, and the build would
    # reuse it instead of training (nothing to kill mid-stage; a second `make test` on one checkout failed here)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGETUNE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    try:
        for line in proc.stderr:  # kill right after the first training step (a checkpoint exists)
            seen.append(line)
            if "[finetune] step 2/" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    out = tmp_path / "k" / "out"
    assert not (out / "cpu-x86").exists() and not (out / "cpu-x86.tar.gz").exists()
    assert not (out / ".work" / "adapter").exists()  # the unfinished stage left nothing that looks complete
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    assert res["passed"] and verify(out / "cpu-x86")["ok"]
    assert "resum" in done.stderr.lower(), done.stderr[-3000:]
    assert not [p for p in out.rglob(".*tmp-*")]
    shutil.rmtree(tmp_path / "k")


def test_a_target_whose_profile_says_auto_ships_the_search_winner(tmp_path, tiny_llama, capsys):
    """A target with no precision whose profile says recipe = "auto": the build's export stage is the recipe search
    (the profile's candidate list), and the summary names the candidate that ships."""
    root = tmp_path / "b"
    cfg = write_config(root, tiny_llama, targets='[[targets]]\nname = "auto.toml"\narchive = false\n')
    # a random tiny model is no judge of int4: loose quality budgets, so the choice is the search's speed rule
    (root / "auto.toml").write_text('extends = "cpu-x86"\nname = "auto"\n[quantization]\nrecipe = "auto"\n'
                                    'recipe_candidates = ["rtn-head8", "int8"]\n[budgets]\nmax_perplexity_increase_pct = 1000\n'
                                    'max_kl_divergence = 100\nmin_top1_agreement = 0\nmin_generation_agreement = 0\n'
                                    'max_time_to_first_token_ms = 60000\nmin_decode_tokens_per_s = 0.1\n')
    code, out, err = run_cli(["build", str(cfg), "--json", "--quiet"], capsys)
    assert code == 0, err
    row = json.loads(out)["targets"][0]
    search = row["recipe_search"]
    assert [r["recipe"] for r in search["table"]][0] == "rtn-head8" and "int8" in [r["recipe"] for r in search["table"]]
    assert row["recipe"].startswith(f"auto: {search['chosen']} (") and search["chosen"] in [r["recipe"] for r in search["table"] if r["passed"]]
    shipped = json.loads((root / "out" / "auto" / "manifest.json").read_text())["precision"]
    assert shipped == ("int8" if search["chosen"] == "int8" else "int4")
    code, out, _ = run_cli(["build", str(cfg)], capsys)  # the console table names it too
    assert code == 0 and "recipe" in out and f"auto: {search['chosen']}" in out


def test_finetune_eval_data_is_read_next_to_the_config_and_by_content(tmp_path, tiny_llama, capsys, monkeypatch):
    """[finetune] eval_data is a path relative to the config (like data.train, not to the working folder), and its
    content is an input of the fine-tune: the same file with other lines trains again, the same lines do not."""
    root = tmp_path / "e"
    cfg = write_config(root, tiny_llama, steps=1)
    cfg.write_text(cfg.read_text().replace("[finetune]\n", '[finetune]\neval_data = "held.jsonl"\n'))
    lines = TRAIN.read_text().splitlines(keepends=True)
    (root / "held.jsonl").write_text("".join(lines[16:20]))
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # not the config's folder: a path taken from the working folder is not found
    code, out, err = run_cli(["build", str(cfg), "--json"], capsys)
    assert code == 0, err
    record = json.loads((root / "out" / ".work" / "adapter" / "edgetune.json").read_text())
    assert "eval_data" in record["inputs"], record["inputs"]
    (root / "held.jsonl").write_text("".join(lines[20:24]))  # same path, other requests
    code, out, err = run_cli(["build", str(cfg), "--json"], capsys)
    assert code == 0, err
    assert "[finetune] runs again: input eval_data changed" in err, err
    assert {s["stage"]: s["status"] for s in json.loads(out)["stages"]}["finetune"] == "ran"
    (root / "held.jsonl").write_text("not json\n")  # a malformed line: named before any work
    code, out, err = run_cli(["build", str(cfg)], capsys)
    assert code == 2 and "held.jsonl:1: not valid JSON" in err, err
    assert "materialize" not in err, err


def test_why_a_stage_runs_again():
    from edgetune.build.runner import why_again

    made = {"inputs": {"model": "a", "data": "b"}, "option_values": {"lr": 1, "epochs": 2}, "code": "c1"}
    state = {"output": "sig", "made_from": made}
    assert why_again(state, made, "other") == "its output was changed or removed"
    assert why_again(state, made, None) == "its output is gone"
    now = {**made, "inputs": {"model": "a", "data": "B", "teacher": "t"},
           "option_values": {"lr": 3, "epochs": 2, "seed": 1}, "code": "c2"}
    assert why_again(state, now, "sig") == ("inputs data, teacher changed; options lr, seed changed; "
                                            "its code changed (edgetune's modules for this stage, or a library's version)")
    assert why_again({"output": "sig"}, made, "sig") == "made by an earlier edgetune that did not record what from"


def test_the_stage_cache_keeps_the_most_recently_used_entries(tmp_path):
    from edgetune import artifacts
    from edgetune.build.runner import prune_stage_cache

    folder = tmp_path / "stages"
    made = []
    for i in range(5):
        entry = folder / f"entry{i}"
        entry.mkdir(parents=True)
        artifacts.write_json(entry / artifacts.RECORD_NAME, {"stage": "finetune", "fingerprint": str(i)})
        os.utime(entry, (1000 + i, 1000 + i))
        made.append(entry)
    foreign = folder / "mine"  # not edgetune's: never removed
    foreign.mkdir()
    os.utime(foreign, (1, 1))
    os.utime(made[0], (2000, 2000))  # the oldest entry was reused last
    fresh = folder / "fresh"  # made or reused within the week: kept, whatever the count
    fresh.mkdir()
    artifacts.write_json(fresh / artifacts.RECORD_NAME, {"stage": "finetune", "fingerprint": "f"})
    gone = prune_stage_cache(folder, keep=2)  # kept: the two most recent (fresh, entry0)
    assert sorted(p.name for p in gone) == ["entry1", "entry2", "entry3", "entry4"]
    assert sorted(p.name for p in folder.iterdir()) == ["entry0", "fresh", "mine"]
    assert [p.name for p in prune_stage_cache(folder, keep=0)] == ["entry0"]  # the week-old rule alone keeps fresh
    assert sorted(p.name for p in folder.iterdir()) == ["fresh", "mine"]
    assert prune_stage_cache(folder, keep=0) == [] and prune_stage_cache(tmp_path / "absent") == []
