"""`edgetune export MODEL --target T --out DIR`."""

from __future__ import annotations

import click

from .. import artifacts, console, quant
from ..cli import common_options, force_option


class MixedSpec(click.ParamType):
    """``--mixed-8bit``: a fraction in (0, 1] -> {"fraction": f}; projection names -> {"modules": [...]} (checked later)."""

    name = "FRACTION|MODULES"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        text = str(value).strip()
        try:
            f = float(text)
        except ValueError:
            mods = [m.strip() for m in text.split(",") if m.strip()]
            if not mods or not all(m.replace("_", "").isalnum() for m in mods):
                self.fail(f"'{value}' is neither a fraction nor a comma-separated list of projections (e.g. v_proj,down_proj)", param, ctx)
            return {"modules": mods}
        if not 0 < f <= 1:
            self.fail(f"fraction {f} is not in (0, 1]", param, ctx)
        return {"fraction": f}


@click.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="Target profile name or .toml path.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--precision", type=click.Choice(quant.EXPORT_PRECISIONS),
              help="Default: gguf for a GGUF input that is not fine-tuned (its own weights, exact), else the profile's.")
@click.option("--int4-algorithm", type=click.Choice(tuple(quant.INT4_ALGORITHMS)),
              help="Override the profile's int4 algorithm: rtn/k_quant (builder), awq (activation-aware scales + RTN), hqq/gptq (onnxruntime quantizer), "
                   "inc-rtn/inc-gptq (neural-compressor); inc-awq/inc-autoround are refused (see docs/llm.md).")
@click.option("--int4-block-size", type=click.Choice([str(b) for b in quant.BLOCK_SIZES]), help="Override the int4 block size.")
@click.option("--int4-accuracy-level", type=click.IntRange(min(quant.ACCURACY_LEVELS), max(quant.ACCURACY_LEVELS)), help="MatMulNBits accuracy_level (4 = int8 activations).")
@click.option("--int4-symmetric/--int4-asymmetric", default=None, help="Symmetric (int4) or asymmetric (uint4 + zero points).")
@click.option("--int4-lm-head", type=click.Choice(quant.LM_HEADS),
              help="Output head (lm_head) of an int4 export: int4, int8 (MatMulNBits bits=8) or fp32.")
@click.option("--int8-block-size", type=click.Choice([str(b) for b in quant.BLOCK_SIZES]),
              help="Block of the 8-bit MatMulNBits nodes (int8 head, --mixed-8bit layers, precision int8); default: the int4 "
                   "block. Wider runs faster on the CPU (docs/llm.md).")
@click.option("--smooth-8bit/--no-smooth-8bit", default=None,
              help="int4 at accuracy_level 4: fold the activation outliers of the 8-bit nodes' inputs into their weights "
                   "(down_proj at 8 bits by --mixed-8bit: into up_proj; the int8 head: into the final norm; exact in float), "
                   "so the kernel's int8 activation blocks round finely; calibrated (docs/llm.md).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True), help="LoRA adapter folder kept separate (repeatable): written as <name>.onnx_adapter, chosen at run time.")
@click.option("--float-adapter", type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter folder baked into the graph as float side branches over the (quantized) base: "
                   "the trained delta is never rounded (plain LoRA only; DoRA: merge first).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="Calibration texts (.jsonl/.csv/.tsv/.txt): encoder int8-static, decoder int4 awq/gptq/inc-gptq.")
@click.option("--task", help="Encoder task (sequence-classification, token-classification, question-answering, feature-extraction; "
                             "default: from the model's head). Marian/T5 models are exported for translation (fp32 or int8).")
@click.option("--recipe", type=click.Choice(quant.RECIPES), metavar="profile|auto|NAME",
              help="Decoders: 'auto' searches the candidate recipes against the target's budgets and keeps the fastest that "
                   "passes; a candidate's NAME exports that recipe (precision, int4 options, 8-bit layers, packing: e.g. "
                   "imatrix-gptq-head8-vdown8-smooth, the fast faithful one; docs/llm.md); default: the profile's [quantization].recipe.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), help="--recipe auto: text/JSONL to validate candidates on.")
@click.option("--recipe-candidates", help="--recipe auto: comma-separated candidate names, tried in this order (default: the "
                                          "profile's recipe_candidates, else all; docs/llm.md).")
@click.option("--recipe-time-budget", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="--recipe auto: start no candidate after this many seconds of search; the rest are rows 'not tried' "
                   "(default: the profile's recipe_time_budget_s, else no limit).")
@click.option("--mixed-8bit", type=MixedSpec(),
              help="int4 rtn/k_quant/imatrix: a fraction (0.1: that share of the decoder MatMuls, the most sensitive on the "
                   "calibration texts) or projections kept at 8 bits in every layer (v_proj,down_proj; as llama.cpp's Q4_K_M).")
@click.option("--allow-slow-kernel", is_flag=True, help="Ship MatMulNBits nodes that miss the CPU's prepacked kernels (e.g. hqq's float zero points).")
@click.option("--no-fuse", "no_fuse", is_flag=True,
              help="precision gguf / --float-adapter over it: keep every block-sum correction and LoRA branch as separate nodes (unfused).")
@click.option("--side-int8", "side_int8", is_flag=True,
              help="precision gguf / --float-adapter over it: store the fused side weights (LoRA A/B, block offsets; fp32) as "
                   "8-bit MatMulNBits at accuracy_level 4: 4x fewer of their bytes per token, not exact (docs/llm.md).")
@click.option("--pack-siblings", "pack_siblings", is_flag=True,
              help="int4/int8 for a CPU target: pack the MatMulNBits that read one input (gate+up; q+k with --mixed-8bit v_proj) "
                   "into one node + Split. Bit-exact; faster at 2+ threads (docs/llm.md).")
@click.option("--gguf-8bit", "gguf_8bit", type=click.Choice(quant.GGUF_8BIT),
              help="precision gguf: the GGUF's 5-/6-/8-bit linears as a 4-bit node + a 2-/4-bit low-bits node (planes, default: "
                   "fp32 activations, smaller) or one 8-bit node at accuracy_level 4 (int8: int8 activations, fastest). docs/llm.md.")
@force_option
@common_options
def export(model, target, out, precision, int4_algorithm, int4_block_size, int4_accuracy_level, int4_symmetric,
           int4_lm_head, int8_block_size, smooth_8bit, adapters, float_adapter, calibration, task, recipe, eval_data, recipe_candidates,
           recipe_time_budget, mixed_8bit,
           allow_slow_kernel, no_fuse, side_int8, pack_siblings, gguf_8bit) -> None:
    """Export MODEL (alias, GGUF or HF folder) to ONNX for target T."""
    from ..recipes import export_with_recipe as run_export

    # before the model is converted or loaded; an output that holds an input is never replaced
    artifacts.check_replaceable(out, inputs=(model, float_adapter, calibration, eval_data, *adapters))

    int4 = {"algorithm": int4_algorithm, "block_size": int(int4_block_size) if int4_block_size else None,
            "accuracy_level": int4_accuracy_level, "symmetric": int4_symmetric,
            "lm_head": int4_lm_head, "int8_block_size": int(int8_block_size) if int8_block_size else None,
            "smooth_8bit": smooth_8bit}
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
    if recipe:
        opts["recipe"] = recipe
    if eval_data:
        opts["data"] = eval_data
    if recipe_candidates:
        opts["candidates"] = [c.strip() for c in recipe_candidates.split(",") if c.strip()]
    if recipe_time_budget:
        opts["time_budget_s"] = recipe_time_budget
    if mixed_8bit:
        opts["mixed"] = mixed_8bit
    if allow_slow_kernel:
        opts["allow_slow_kernel"] = True
    if no_fuse and side_int8:
        from ..errors import BadInput

        raise BadInput("--side-int8 stores the fused side weights: it needs the fusion --no-fuse turns off", hint="drop one of them")
    if no_fuse:
        opts["fuse"] = False
    if side_int8:
        opts["fuse"] = "int8"
    if gguf_8bit:
        opts["gguf_8bit"] = gguf_8bit
    if pack_siblings:
        opts["pack"] = True
    path = run_export(model, out, target=target, precision=precision, **opts)
    rec = artifacts.read_record(path)
    result = {"out": str(path), **rec.get("results", {})}
    console.emit(result, lambda r: f"{r.get('kind')} {r.get('precision')} -> {r['out']} ({r.get('size_mb')} MB)"
                 + (f"\n{r['precision_note']}" if r.get("precision_note") else ""))
