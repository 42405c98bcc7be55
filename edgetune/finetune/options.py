"""Fine-tuning options: one dataclass, checked before any model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput

METHODS = ("lora", "qlora", "dora", "loha", "lokr", "ia3")
TASKS = ("auto", "causal-lm", "seq-cls", "token-cls", "qa", "translation")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
DEEPSPEED_PRESETS = ("zero2", "zero3", "offload")


@dataclass
class FinetuneOptions:
    """Everything that shapes a fine-tuning run (recorded verbatim in the output)."""

    method: str = "lora"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    lr: float = 2e-4
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    max_seq_len: int = 256
    doc_stride: int = 128  # qa: tokens shared by consecutive windows of a context longer than max_seq_len
    source_prefix: str = ""  # translation: text put before every source (T5: "translate English to German: "); export and run reuse it
    packing: bool = False
    loss_on_answer_only: bool = True
    eval_fraction: float = 0.1
    eval_data: str | None = None  # a separate eval file instead of a split
    save_steps: int = 50
    save_total_limit: int = 2
    task: str = "auto"
    # QLoRA
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    # quantization-aware LoRA (edgetune/finetune/qat.py): train through the int4 export's own grid
    quant_aware: str | None = None  # None | int4
    quant_aware_block_size: int = 32  # the export's [quantization.int4].block_size
    quant_aware_lm_head: str = "int4"  # the export's lm_head: int4 | int8 | fp32
    quant_aware_distill: float = 0.0  # weight of the self-distillation term (0: off; qat.Distiller)
    quant_aware_distill_samples: int = 48  # sequences the teacher writes for it (its prompts cycled)
    quant_aware_distill_seq_len: int = 128  # tokens per sequence (capped at max_seq_len): the corpus's cost scales with it
    # the float model the student is distilled toward: None = the base (self-distillation), else a float
    # causal-LM folder with the base's tokenizer (a build passes the float fine-tune's merge: "finetune")
    quant_aware_teacher: str | None = None
    # precision and optimizer: "auto" means fp32 + adamw_torch on CPU, bf16 + paged 8-bit AdamW on GPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    optim: str = "auto"
    # scale-out
    deepspeed: str | None = None  # None | zero2 | zero3 | offload | path to a DeepSpeed JSON
    num_processes: int = 1
    limit: int | None = None  # use only the first N records (quick experiments)
    extra: dict[str, Any] = field(default_factory=dict)  # raw TrainingArguments overrides

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadInput(f"unknown fine-tuning option(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(names))}")
        return cls(**data)

    def check(self) -> "FinetuneOptions":
        def bad(what: str, hint: str) -> BadInput:
            return BadInput(what, hint=hint)

        if self.method not in METHODS:
            raise bad(f"unknown method '{self.method}'", f"choose one of: {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise bad(f"unknown task '{self.task}'", f"choose one of: {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            raise bad(f"unknown learning-rate schedule '{self.schedule}'", f"choose one of: {', '.join(SCHEDULES)}")
        if self.rank < 1:
            raise bad(f"rank must be >= 1 (got {self.rank})", "use e.g. --rank 8")
        if not 0 <= self.dropout < 1:
            raise bad(f"dropout must be in [0, 1) (got {self.dropout})", "use e.g. --dropout 0.05")
        if not 0 <= self.warmup_ratio <= 1:
            raise bad(f"warmup ratio must be in [0, 1] (got {self.warmup_ratio})", "use e.g. --warmup-ratio 0.1")
        if self.lr <= 0:
            raise bad(f"learning rate must be > 0 (got {self.lr})", "use e.g. --lr 2e-4")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad(f"max_steps must be >= 1 (got {self.max_steps})", "or leave it unset and use --epochs")
        if self.max_steps is None and self.epochs <= 0:
            raise bad(f"epochs must be > 0 (got {self.epochs})", "use e.g. --epochs 1")
        for name in ("batch_size", "grad_accum", "save_steps", "max_seq_len", "num_processes"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1 (got {getattr(self, name)})", f"fix --{name.replace('_', '-')}")
        if self.alpha < 1 or self.seed < 0 or (self.limit is not None and self.limit < 1):
            raise bad(f"alpha must be >= 1, seed >= 0 and limit >= 1 (got {self.alpha}, {self.seed}, {self.limit})", "fix the option")
        if not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0 or self.quant_aware_distill < 0 or self.quant_aware_distill_samples < 1:
            raise bad("warmup_ratio must be in [0, 1), weight_decay and quant_aware_distill >= 0, quant_aware_distill_samples >= 1 "
                      f"(got {self.warmup_ratio}, {self.weight_decay}, {self.quant_aware_distill}, {self.quant_aware_distill_samples})", "fix the option")
        if self.quant_aware_distill_seq_len < 16:
            raise bad(f"quant_aware_distill_seq_len must be >= 16 (got {self.quant_aware_distill_seq_len})", "use e.g. 64 or 128")
        if self.max_seq_len < 8:
            raise bad(f"max_seq_len {self.max_seq_len} is too short", "use at least 8 tokens")
        if self.doc_stride < 0:
            raise bad(f"doc_stride must be >= 0 (got {self.doc_stride})", "use e.g. --doc-stride 128 with --max-seq-len 384")
        if not 0 <= self.eval_fraction < 1:
            raise bad(f"eval_fraction must be in [0, 1) (got {self.eval_fraction})", "use e.g. 0.1")
        if self.quant_type not in ("nf4", "fp4"):
            raise bad(f"unknown 4-bit quant type '{self.quant_type}'", "choose nf4 or fp4")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise bad(f"unknown precision '{self.precision}'", "choose auto, fp32, bf16 or fp16")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise bad(f"unknown compute dtype '{self.compute_dtype}'", "choose auto, float32, bfloat16 or float16")
        if self.deepspeed is not None and self.deepspeed not in DEEPSPEED_PRESETS and not Path(self.deepspeed).is_file():
            raise bad(f"--deepspeed '{self.deepspeed}' is neither a preset nor a file", f"use {', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed JSON path")
        if self.deepspeed is not None and self.deepspeed not in DEEPSPEED_PRESETS:
            from .deepspeed import resolve_config

            resolve_config(self.deepspeed)  # every key checked before any model is loaded or process launched
        if self.deepspeed and self.method == "qlora":
            raise bad("QLoRA (bitsandbytes 4-bit) cannot be combined with DeepSpeed ZeRO here", "use --method lora with --deepspeed, or QLoRA without it")
        from .qat import spec_from_options

        spec_from_options(self)
        if self.num_processes > 1 and not self.deepspeed:
            raise bad("--num-processes > 1 needs --deepspeed", "add --deepspeed zero2 (or zero3/offload/config.json)")
        return self
