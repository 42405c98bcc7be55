"""`edgetune merge BASE ADAPTER --out DIR`."""

from __future__ import annotations

import click

from .. import artifacts, console
from ..cli import common_options, force_option


@click.command()
@click.argument("base")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(), help="Folder for the merged HF model (safetensors).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="The merged weights' dtype; auto: the base's own (bf16 stays bf16, fp32 stays fp32).")
@click.option("--gate-data", type=click.Path(exists=True, dir_okay=False), help="Held-out texts for the merge gate (default: built-in prompts).")
@click.option("--max-abs-diff", type=click.FloatRange(0), default=1e-3, show_default=True, help="Gate: max |logit difference| vs base + adapter.")
@click.option("--max-kl", type=click.FloatRange(0), default=1e-4, show_default=True, help="Gate: max KL(base + adapter || merged) per token.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=0.99, show_default=True, help="Gate: min top-1 agreement.")
@click.option("--qlora/--no-qlora", default=None,
              help="The adapter was trained on a 4-bit base: also measure the merged model vs that 4-bit base + adapter "
                   "(default: read from the finetune record).")
@click.option("--vs-4bit-max-kl", type=click.FloatRange(0), default=None, help="QLoRA: fail if KL(4-bit base + adapter || merged) is above this.")
@click.option("--vs-4bit-min-top1", type=click.FloatRange(0, 1), default=None, help="QLoRA: fail if top-1 agreement with the 4-bit base + adapter is below this.")
@force_option
@common_options
def merge(base, adapter, out, dtype, gate_data, max_abs_diff, max_kl, min_top1, qlora, vs_4bit_max_kl, vs_4bit_min_top1) -> None:
    """Merge a PEFT ADAPTER (LoRA/DoRA, causal LM or SEQ_CLS/TOKEN_CLS) into BASE and gate the result."""
    from ..merge import merge as run_merge

    artifacts.check_replaceable(out, inputs=(base, adapter, gate_data))

    path = run_merge(base, adapter, out, dtype=dtype, gate_data=gate_data, max_abs_diff=max_abs_diff, max_kl=max_kl, min_top1=min_top1,
                     qlora=qlora, max_kl_vs_4bit=vs_4bit_max_kl, min_top1_vs_4bit=vs_4bit_min_top1)
    rec = artifacts.read_record(path)
    result = {"out": str(path), **rec["results"]}

    def line(r) -> str:
        g = r["gate"]
        text = f"merged -> {r['out']}  gate: max|dlogit|={g['max_abs_diff']:.2e} KL={g['kl']:.2e} top-1={g['top1_agreement']:.3f}"
        v = g.get("vs_trained_4bit")
        if v and "kl" in v:
            text += (f"\n  vs the {v['quant_type']} 4-bit base + adapter (trained): max|dlogit|={v['max_abs_diff']:.2e} "
                     f"mean={v['mean_abs_diff']:.2e} KL={v['kl']:.2e} top-1={v['top1_agreement']:.3f}")
        elif v:
            text += f"\n  vs the 4-bit base + adapter: skipped ({v.get('skipped')})"
        return text

    console.emit(result, line)
