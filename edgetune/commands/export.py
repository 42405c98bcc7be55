"""`edgetune export MODEL --target T --out DIR`."""

from __future__ import annotations

import click

from .. import artifacts, console
from ..cli import common_options


@click.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="Target profile name or .toml path.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "int4",
                                                 "int8-dynamic", "int8-static"]), help="Default: the profile's.")
@click.option("--int4-algorithm", type=click.Choice(["rtn", "k_quant", "hqq", "gptq", "inc-rtn", "inc-gptq", "inc-awq", "inc-autoround"]),
              help="Override the profile's int4 algorithm: rtn/k_quant (builder), hqq/gptq (onnxruntime quantizer), "
                   "inc-rtn/inc-gptq (neural-compressor); inc-awq/inc-autoround are refused (see docs/llm.md).")
@click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128", "256"]), help="Override the int4 block size.")
@click.option("--int4-accuracy-level", type=click.IntRange(0, 4), help="MatMulNBits accuracy_level (4 = int8 activations).")
@click.option("--int4-symmetric/--int4-asymmetric", default=None, help="Symmetric (int4) or asymmetric (uint4 + zero points).")
@click.option("--int4-lm-head", type=click.Choice(["int4", "int8", "fp32"]),
              help="Output head (lm_head) of an int4 export: int4, int8 (MatMulNBits bits=8) or fp32.")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True), help="LoRA adapter folder kept separate (repeatable): written as <name>.onnx_adapter, chosen at run time.")
@click.option("--float-adapter", type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter folder baked into the graph as float side branches over the (quantized) base: "
                   "the trained delta is never rounded (plain LoRA only; DoRA: merge first).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="Calibration texts (.jsonl/.csv/.tsv/.txt): encoder int8-static, decoder int4 gptq/inc-gptq.")
@click.option("--task", help="Encoder task (sequence-classification, token-classification, feature-extraction).")
@common_options
def export(model, target, out, precision, int4_algorithm, int4_block_size, int4_accuracy_level, int4_symmetric,
           int4_lm_head, adapters, float_adapter, calibration, task) -> None:
    """Export MODEL (alias, GGUF or HF folder) to ONNX for target T."""
    from ..export import export as run_export

    int4 = {"algorithm": int4_algorithm, "block_size": int(int4_block_size) if int4_block_size else None,
            "accuracy_level": int4_accuracy_level, "symmetric": int4_symmetric,
            "lm_head": int4_lm_head}
    int4 = {k: v for k, v in int4.items() if v is not None}
    opts = {}
    if int4:
        opts["int4"] = int4
    if adapters:
        opts["adapters"] = adapters
    if float_adapter:
        opts["float_adapter"] = float_adapter
    if calibration:
        opts["calibration"] = calibration
    if task:
        opts["task"] = task
    path = run_export(model, out, target=target, precision=precision, **opts)
    rec = artifacts.read_record(path)
    result = {"out": str(path), **rec.get("results", {})}
    console.emit(result, lambda r: f"{r.get('kind')} {r.get('precision')} -> {r['out']} ({r.get('size_mb')} MB)")
