"""`edgetune validate`: accuracy vs a reference, tokenizer parity, latency, budgets."""

from __future__ import annotations

import click

from .. import console
from ..cli import common_options, force_option
from ..errors import CheckFailed
from ..validate import MINIMUM


def _human(r: dict) -> str:
    lines = []
    acc = r.get("accuracy") or {}
    keys = ["perplexity", "reference_perplexity", "perplexity_increase_pct", "kl_divergence", "top1_agreement",
            "generation_agreement", "accuracy", "reference_accuracy", "accuracy_drop", "f1",
            "reference_task_accuracy", "task_accuracy", "task_accuracy_drop", "task_exact_match", "task_valid_format", "task_token_f1"]
    for k in keys:
        if acc.get(k) is not None:
            lines.append(f"{k:28s} {acc[k]:.4g}")
    lat = r.get("latency") or {}
    for k in ("time_to_first_token_ms", "decode_tokens_per_s", "latency_ms"):
        if lat.get(k):
            s = lat[k]
            lines.append(f"{k:28s} p50 {s['p50']:.4g}  p90 {s['p90']:.4g}  p99 {s['p99']:.4g}  (n={s['n']}, std {s['std']:.3g})")
    for k in ("load_time_s", "peak_memory_mb", "size_mb", "throughput_per_s"):
        if lat.get(k) is not None:
            lines.append(f"{k:28s} {lat[k]:.4g}")
    dev = r.get("device") or {}
    if dev and not dev.get("available", True):
        lines.append(f"{'latency':28s} not measured ({dev['execution_provider']} provider absent; accuracy on {dev['accuracy_on']})")
    task = r.get("task") or {}
    fails = task.get("failing_examples") or []
    if fails:
        lines += ["", f"first failing examples ({task['metric']}):"]
        for f in fails[:3]:
            lines.append(f"  #{f['index']} {f['prompt'][:50]!r}\n     gold {str(f['gold'])[:60]!r}\n     ref  {str(f.get('reference', '-'))[:60]!r}\n     model {str(f['model'])[:60]!r}")
    rows = [{"check": c["name"], "value": f"{c['value']:.4g}" if isinstance(c["value"], float) else c["value"],
             "limit": f"{c['op']} {c['limit']}", "result": "pass" if c["passed"] else "FAIL"} for c in r.get("checks", [])]
    if rows:
        lines += ["", console.table(rows)]
    for c in r.get("checks", []):
        if (not c["passed"] or c.get("within_noise")) and c.get("detail"):
            lines.append(f"{c['name']}: {c['detail']}")
    lines.append(f"\nreport: {r.get('report_dir')}/report.md  ->  {'PASSED' if r.get('passed') else 'FAILED: ' + ', '.join(r.get('failed', []))}")
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path())
@click.option("--target", "-t", help="Target profile name or .toml path (budgets, execution provider, session options) "
              "[a bundle: the target.toml it carries].")
@click.option("--reference", "-r", type=click.Path(), help="fp32 reference: HF folder (host, torch), fp32 ONNX export, or a stored "
              "reference pack [a bundle given no --reference, --data or --prompts: the pack it carries].")
@click.option("--data", "-d", type=click.Path(), help="Evaluation data: text/JSONL for LLMs, labelled examples for encoders.")
@click.option("--prompts", type=click.Path(), help="Prompts for greedy generation agreement (.txt lines or JSONL prompt/messages).")
@click.option("--out", "-o", type=click.Path(), help="Report folder (default: <model>.validation next to the model).")
@click.option("--max-tokens", type=click.IntRange(MINIMUM["max_tokens"]), help="New tokens per prompt and in the latency run [32].")
@click.option("--prompt-tokens", type=click.IntRange(MINIMUM["prompt_tokens"]), help="Prompt length of the latency run [128].")
@click.option("--eval-tokens", type=click.IntRange(MINIMUM["eval_tokens"]), help="Tokens of the data scored for perplexity [2048].")
@click.option("--window", type=click.IntRange(MINIMUM["window"]), help="Perplexity window / context in tokens [512, capped at the model's context].")
@click.option("--stride", type=click.IntRange(MINIMUM["stride"]), help="Sliding-window stride [window/2].")
@click.option("--method", type=click.Choice(["sliding", "chunked"]), help="Perplexity windows: sliding, or chunked like llama.cpp's llama-perplexity.")
@click.option("--topk", type=click.IntRange(MINIMUM["topk"]), help="Reference top-k kept for KL [64].")
@click.option("--repeats", type=click.IntRange(MINIMUM["repeats"]), help="Timed repetitions [5].")
@click.option("--warmup", type=click.IntRange(MINIMUM["warmup"]), help="Untimed warm-up runs [1].")
@click.option("--batch", type=click.IntRange(MINIMUM["batch"]), help="Encoder batch size in the latency run [1].")
@click.option("--no-latency", is_flag=True, help="Skip the latency/memory run.")
@click.option("--task-examples", type=click.IntRange(MINIMUM["task_examples"]), help="Use only the first N examples with gold answers [all].")
@click.option("--failing-examples", type=click.IntRange(MINIMUM["failing_examples"]), help="Failing task examples listed in the report [5].")
@click.option("--cross-build", "cross", is_flag=True,
              help="When the target's execution provider is absent: validate accuracy on the CPU provider (same graph), latency not measured.")
@force_option
@common_options
def validate(model, target, reference, data, prompts, out, no_latency, cross, **opts):
    """Validate MODEL (export or bundle) on this machine against TARGET's budgets.

    Exit 1 when a check or budget fails (the report is written first).
    """
    from contextlib import ExitStack

    from ..validate import validate as run
    from .bundle_input import bundle_defaults, open_bundle

    with ExitStack() as stack:
        given, (model, default_out) = model, open_bundle(model, stack)
        target, reference = bundle_defaults(model, target, reference, data is None and prompts is None, "validate")
        if reference is None and data is None and prompts is None:
            console.warn("no --reference, --data or --prompts: accuracy is not checked, only size, memory and speed "
                         "(give -r REFERENCE, e.g. a reference pack; a bundle that carries one uses it)")
        try:
            result = run(model, target=target, reference=reference, data=data, prompts=prompts, out=out or default_out,
                         latency=not no_latency, require_device=not cross, shown_as=str(given), **opts)
        except CheckFailed as exc:
            if isinstance(exc.result, dict):
                console.emit(exc.result, _human)
            raise
    console.emit(result, _human)
