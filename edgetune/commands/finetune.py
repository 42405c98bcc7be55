"""`edgetune finetune MODEL DATA -o OUT`: train a LoRA/QLoRA/DoRA/... adapter."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import console, quant
from ..cli import common_options, force_option
from ..finetune.options import DEEPSPEED_PRESETS, METHODS, SCHEDULES, TASKS, FinetuneOptions


def _summary(r: dict) -> str:
    lines = [f"adapter: {r['out']}  ({r['method']}, {r['task']}, {r['global_step']} steps, {r['trainable_parameters']:,} trainable parameters)"]
    if r.get("first_loss") is not None:
        lines.append(f"training loss: {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    if r.get("base_eval_loss") is not None:
        lines.append(f"eval loss: base {r['base_eval_loss']:.4f} -> fine-tuned {r['eval_loss']:.4f}")
    elif r.get("eval_accuracy") is not None:
        lines.append(f"eval accuracy: {r['eval_accuracy']:.4f} (eval loss {r['eval_loss']:.4f})")
    if r.get("quant_aware"):
        lines.append(f"quant-aware: trained through {r['quant_aware']['grid']} ({r['quant_aware']['lora_linears']} LoRA linears)")
    lines.append(f"throughput: {r['tokens_per_second']:,.0f} tokens/s")
    return "\n".join(lines)


@click.command()
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output adapter folder (written atomically at the end).")
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True, help="PEFT method (qlora = LoRA on a 4-bit bitsandbytes base).")
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True, help="auto: from the data format (text+label -> seq-cls, tokens+tags -> token-cls, "
                   "SQuAD question+context+answers -> qa, source+target -> translation, else causal-lm).")
@click.option("--rank", "-r", type=click.IntRange(1), default=8, show_default=True)
@click.option("--alpha", type=click.IntRange(1), default=16, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names, or all-linear.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-4, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", show_default=True)
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Per-device micro batch.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(8), default=256, show_default=True)
@click.option("--doc-stride", type=click.IntRange(0), default=128, show_default=True,
              help="qa: tokens shared by consecutive windows of a context longer than --max-seq-len.")
@click.option("--source-prefix", default="", show_default=False,
              help='translation: text put before every source (T5: "translate English to German: "); stored with the adapter, '
                   "so merge, export, validate and run apply the same prefix.")
@click.option("--packing/--no-packing", default=False, show_default=True, help="Concatenate samples into full max-seq-len blocks.")
@click.option("--loss-on-answer-only/--loss-on-all", default=True, show_default=True, help="Learn only assistant turns / completions.")
@click.option("--eval-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--eval-data", type=click.Path(dir_okay=False), default=None, help="Separate eval file (instead of a split).")
@click.option("--save-steps", type=click.IntRange(1), default=50, show_default=True, help="Checkpoint every N steps into OUT.work/ (for --resume).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="auto: fp32 on CPU, bf16 on GPU.")
@click.option("--optim", default="auto", show_default=True, help="Trainer optimizer; auto: adamw_torch on CPU, paged_adamw_8bit on GPU.")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True, help="QLoRA 4-bit type.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="QLoRA double quantization.")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="QLoRA compute dtype.")
@click.option("--quant-aware", type=click.Choice(quant.QAT_SCHEMES), default=None,
              help="Train the LoRA through the int4 export's own grid (fake-quantized merged weight, straight-through): "
                   "merge -> export --precision int4 then computes what was trained.")
@click.option("--quant-aware-block-size", type=click.IntRange(1), default=32, show_default=True, help="The export's int4 block size.")
@click.option("--quant-aware-lm-head", type=click.Choice(quant.LM_HEADS), default="int4", show_default=True,
              help="The export's --int4-lm-head.")
@click.option("--quant-aware-distill", type=click.FloatRange(0), default=0.0, show_default=True,
              help="With --quant-aware: weight of a self-distillation term (KL to the float base on text the base writes "
                   "itself), so the adapter also repairs the int4 damage outside the task. 0 = off.")
@click.option("--quant-aware-distill-samples", type=click.IntRange(1), default=48, show_default=True,
              help="Sequences the teacher writes for the distillation term.")
@click.option("--quant-aware-distill-seq-len", type=click.IntRange(16), default=128, show_default=True,
              help="Tokens per distillation sequence (capped at --max-seq-len); the corpus's cost scales with samples x length.")
@click.option("--quant-aware-teacher", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --quant-aware-distill: the float model (HF folder, the base's tokenizer) that writes the corpus and "
                   "whose distributions the student learns, e.g. the merged float fine-tune. Default: the base itself.")
@click.option("--deepspeed", default=None, help=f"ZeRO preset ({', '.join(DEEPSPEED_PRESETS)}) or a DeepSpeed JSON config.")
@click.option("--num-processes", type=click.IntRange(1), default=1, show_default=True, help="Processes (GPUs) on this machine; > 1 needs --deepspeed.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N records.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="JSON file of options (keys as in finetune_config.json); command-line flags you set win.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run from its last checkpoint in OUT.work/.")
@force_option
@common_options
def finetune(model: str, data: Path, out: Path, config_file: Path | None, resume: bool, **kw) -> None:
    """Fine-tune MODEL (alias, HF folder or .gguf) on DATA into an adapter folder."""
    from ..errors import BadInput
    from ..finetune import finetune as run

    ctx = click.get_current_context()
    values: dict = {}
    if config_file:
        try:
            values.update(json.loads(config_file.read_text()).get("options", json.loads(config_file.read_text())))
        except json.JSONDecodeError as exc:
            raise BadInput(f"{config_file} is not valid JSON ({exc.msg})", hint="fix the file") from None
    for key, value in kw.items():
        if config_file is None or ctx.get_parameter_source(key) != click.core.ParameterSource.DEFAULT:
            values[key] = value
    opts = FinetuneOptions.from_dict(values)
    path = run(model, data, out, options=opts, resume=resume)
    record = json.loads((path / "edgetune.json").read_text())
    result = {"out": str(path), **record["results"]}
    console.emit(result, _summary)
