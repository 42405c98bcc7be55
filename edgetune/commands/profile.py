"""`edgetune profile`: per-operator timing, EP assignment and CPU fallbacks."""

from __future__ import annotations

import click

from .. import console
from ..cli import common_options


def _human(r: dict) -> str:
    lines = [f"{r['model']} on {r['target']} ({', '.join(r['session_providers'])}): {r['total_ms']:.1f} ms in kernels, workload {r['workload']}", ""]
    lines.append(console.table([{"provider": k, "nodes": v["nodes"], "ms": f"{v['total_us'] / 1000:.2f}"} for k, v in r["by_provider"].items()]))
    lines += ["", "costliest operator types:"]
    lines.append(console.table([{"op_type": o["op_type"], "ms": f"{o['total_us'] / 1000:.2f}", "%": f"{o['pct']:.1f}", "nodes": o["nodes"],
                                 "calls": o["calls"], "providers": ",".join(o["providers"])} for o in r["top_op_types"]]))
    lines += ["", "costliest nodes:"]
    lines.append(console.table([{"node": n["node"][:60], "op_type": n["op_type"], "ms": f"{n['total_us'] / 1000:.2f}", "%": f"{n['pct']:.1f}",
                                 "provider": n["provider"]} for n in r["top_nodes"]]))
    if r["fallback_nodes"]:
        lines += ["", f"CPU FALLBACK: {r['fallback_nodes']} nodes did not run on {r['requested_providers'][0]}:"]
        lines += [f"  {n['node']} ({n['op_type']}) on {n['provider']}" for n in r["fallbacks"]]
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path())
@click.option("--target", "-t", help="Target profile (providers and session options) [a bundle: the target.toml it carries].")
@click.option("--top", default=15, type=click.IntRange(1), show_default=True, help="Rows in the top-N tables.")
@click.option("--repeats", default=3, type=click.IntRange(1), show_default=True, help="Profiled runs.")
@click.option("--prompt-tokens", default=64, type=click.IntRange(1), show_default=True, help="Decoder prefill length.")
@click.option("--decode-steps", default=8, type=click.IntRange(0), show_default=True, help="Decoder single-token steps after the prefill.")
@click.option("--sequence-length", default=128, type=click.IntRange(1), show_default=True, help="Encoder input length.")
@click.option("--trace", type=click.Path(), help="Also save onnxruntime's raw profile JSON (chrome://tracing) here.")
@common_options
def profile(model, target, top, repeats, prompt_tokens, decode_steps, sequence_length, trace):
    """Profile MODEL with onnxruntime's profiler on TARGET's execution provider."""
    from contextlib import ExitStack

    from ..profiling import profile as run
    from .bundle_input import bundle_defaults, open_bundle

    with ExitStack() as stack:
        given, (model, _) = model, open_bundle(model, stack)
        target, _ = bundle_defaults(model, target, None, False, "profile")
        result = run(model, target=target, top=top, repeats=repeats, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
                     sequence_length=sequence_length, trace_out=trace)
    console.emit({**result, "model": str(given)}, _human)
