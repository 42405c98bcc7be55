"""Fine-tuning stage: LoRA / QLoRA / DoRA / LoHa / LoKr / IA3 adapters with peft + Trainer.

``finetune(model, data, out, *, options) -> Path`` writes an adapter folder (safetensors,
adapter_config.json, tokenizer, finetune_config.json, loss_curve.json/png,
eval_metrics.json, edgetune.json). Torch and transformers are imported lazily.
"""

from .options import METHODS, TASKS, FinetuneOptions
from .train import finetune, work_dir

__all__ = ["finetune", "FinetuneOptions", "METHODS", "TASKS", "work_dir"]
