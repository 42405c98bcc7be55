"""The fine-tuning run: model + data -> adapter folder, through transformers' Trainer.

Layout while running (stable, so ``--resume`` finds it after a kill -9)::

    <out>.work/spec.json            what to run (model, data, options)
    <out>.work/checkpoints/checkpoint-N   Trainer checkpoints every save_steps
    <out>.work/final/               adapter + train_result.json, written by rank 0

The output folder ``<out>`` appears atomically (artifacts.stage_output) only at the end,
and the work folder is removed then.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import artifacts, console
from ..data import Dataset, load_dataset, split
from ..errors import BadInput, CheckFailed, EdgetuneError, require
from ..model_input import materialize
from .options import FinetuneOptions

STAGE = "finetune"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


# ---------------------------------------------------------------------------- helpers

def work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


# fine-tuning task -> (the data format it trains on, what that format is called in messages)
TASK_DATA = {"seq-cls": ("classification", "text+label"), "token-cls": ("tokens", "tokens+tags"),
             "qa": ("qa", "SQuAD question+context+answers"), "translation": ("translation", "source+target")}
# the attention projections LoRA adapts on an encoder-decoder (self- and cross-attention): T5 and Marian names
SEQ2SEQ_ATTENTION = {"t5": ["q", "k", "v", "o"], "mt5": ["q", "k", "v", "o"], "marian": ["q_proj", "k_proj", "v_proj", "out_proj"]}


def resolve_task(task: str, ds: Dataset, kind: str) -> str:
    by_format = {fmt: t for t, (fmt, _) in TASK_DATA.items()}.get(ds.format, "causal-lm")
    if task == "auto":
        task = by_format
    if kind == "seq2seq" and task != "translation":
        raise BadInput(f"task {task} does not apply to an encoder-decoder (translation) model",
                       hint='give {"source": ..., "target": ...} records and --task translation (or auto)')
    if task == "translation" and kind != "seq2seq":
        raise BadInput(f"translation fine-tuning needs an encoder-decoder model (Marian, T5 family); this one is a {kind}",
                       hint="use a MarianMTModel or T5ForConditionalGeneration folder, or chat records for a decoder")
    if task == "causal-lm" and kind != "decoder":
        raise BadInput("causal-lm fine-tuning needs a decoder model; this one is an encoder",
                       hint="use text+label data (seq-cls), tokens+tags (token-cls) or SQuAD question/context/answers (qa)")
    if task in TASK_DATA and ds.format != TASK_DATA[task][0]:
        raise BadInput(f"task {task} needs {TASK_DATA[task][1]} records, {ds.path} has '{ds.format}' records", hint="fix the data or --task")
    if task == "causal-lm" and ds.format in {fmt for fmt, _ in TASK_DATA.values()}:
        raise BadInput(f"causal-lm needs text, prompt/completion or messages data, {ds.path} has '{ds.format}'", hint="fix the data or --task")
    return task


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in ``folder`` carries a chat template (read from its files; nothing is loaded)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def check_model_and_data(task: str, ds: Dataset, info) -> str:
    """The fine-tuning task for this model and data, or exit 2 before any work: the data must fit the
    task, a decoder is fine-tuned as a causal LM (its classification head does not export), and chat
    data needs a chat template. ``edgetune build`` calls it too, before its first stage."""
    task = resolve_task(task, ds, info.kind)
    if task == "translation":  # the export and the device need tokenizer.json: refuse now, not after training
        from ..model_input import check_seq2seq_tokenizer

        check_seq2seq_tokenizer(Path(info.path), info.config)
    if task in TASK_DATA and info.kind == "decoder":
        head = "question-answering (span)" if task == "qa" else "classification"
        raise BadInput(f"{task} fine-tuning of a decoder ({info.model_type}) is not supported: its {head} head "
                       "does not export to onnxruntime-genai",
                       hint="write each example as chat messages with the label as the assistant's answer "
                            "(or prompt/completion) and fine-tune it as causal-lm; the bundle then answers with the label")
    if task == "causal-lm" and ds.format == "messages" and not has_chat_template(Path(info.path)):
        raise BadInput(f"{info.path} has no chat template, so the chat ('messages') records of {ds.path} cannot be rendered",
                       hint="use prompt/completion or text records for a base model, or a chat (instruct) model")
    return task


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    cks = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _precision(opts: FinetuneOptions) -> str:
    if opts.precision != "auto":
        return opts.precision
    if _on_gpu():
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _optim(opts: FinetuneOptions) -> str:
    if opts.optim != "auto":
        return opts.optim
    if _on_gpu() and not opts.deepspeed:
        return "paged_adamw_8bit"
    return "adamw_torch"


def _linear_names(model, exclude: tuple[str, ...]) -> list[str]:
    import torch

    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(part in exclude for part in name.split(".")):
            names.add(name.split(".")[-1])
    return sorted(names)


def check_target_modules(opts: FinetuneOptions, model) -> None:
    """--target-modules must name modules of this model: BadInput (exit 2) listing its linear layers.

    Checked before peft builds the adapter (peft would raise NoMatchingPeftModuleError deep inside).
    A name matches like peft's: the last component(s) of a module's dotted name.
    """
    targets = opts.target_modules
    if opts.method == "ia3" and targets == "all-linear":
        return
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import difflib

        linear = _linear_names(model, ())
        close = sorted({m for t in missing for m in difflib.get_close_matches(t, linear, n=1)})
        mean = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BadInput(f"--target-modules {', '.join(missing)} not found in {model.config.model_type} model{mean}",
                       hint=f"its linear modules are: {', '.join(linear)}; or use all-linear")


def peft_config(opts: FinetuneOptions, task: str, model):
    peft = require("peft", purpose="fine-tuning adapters")
    task_type = {"causal-lm": peft.TaskType.CAUSAL_LM, "seq-cls": peft.TaskType.SEQ_CLS, "token-cls": peft.TaskType.TOKEN_CLS,
                 "qa": peft.TaskType.QUESTION_ANS, "translation": peft.TaskType.SEQ_2_SEQ_LM}[task]
    targets: Any = opts.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    heads = ("classifier", "score", "lm_head", "qa_outputs")
    modules_to_save = None
    if task == "translation":  # LoRA on the attention projections (self and cross); the LM head is the base's
        if targets == "all-linear":
            targets = SEQ2SEQ_ATTENTION.get(model.config.model_type, targets)
    elif task != "causal-lm":
        # the task head is new (random) on a base model: trained in full and saved with the adapter
        modules_to_save = [next((h for h in ("classifier", "qa_outputs") if hasattr(model, h)), "score")]
        if targets == "all-linear":
            targets = _linear_names(model, heads)
    if opts.method in ("lora", "qlora", "dora"):
        return peft.LoraConfig(
            r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
            use_dora=opts.method == "dora", task_type=task_type, modules_to_save=modules_to_save,
        )
    if opts.method == "loha":
        return peft.LoHaConfig(r=opts.rank, alpha=opts.alpha, module_dropout=opts.dropout, target_modules=targets, task_type=task_type, modules_to_save=modules_to_save)
    if opts.method == "lokr":
        return peft.LoKrConfig(r=opts.rank, alpha=opts.alpha, module_dropout=opts.dropout, target_modules=targets, task_type=task_type, modules_to_save=modules_to_save)
    if opts.method == "ia3":
        # IA3 scales activations; peft's per-architecture defaults pick k/v/down projections
        kw = {} if targets == "all-linear" else {"target_modules": targets, "feedforward_modules": []}
        return peft.IA3Config(task_type=task_type, modules_to_save=modules_to_save, **kw)
    raise BadInput(f"unknown method '{opts.method}'", hint="see edgetune finetune --help")


def load_model(path: Path, task: str, opts: FinetuneOptions, label_names: list[str]):
    transformers = require("transformers")
    torch = require("torch")
    from .memory import keeps_stored_weights

    if not _on_gpu() and keeps_stored_weights(path, task, opts):
        from ..model_input import load_causal_lm

        return load_causal_lm(path, training=True)  # the stored bf16/fp16 weights, computed in fp32 one module at a time
    prec = _precision(opts)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if opts.method == "qlora":
        require("bitsandbytes", purpose="QLoRA 4-bit base weights")
        cdt = opts.compute_dtype
        if cdt == "auto":
            cdt = "bfloat16" if prec == "bf16" else "float16" if prec == "fp16" else "float32"
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=opts.quant_type, bnb_4bit_use_double_quant=opts.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cdt),
        )
        if not _on_gpu():
            kwargs["device_map"] = {"": "cpu"}
    if task == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    elif task == "qa":
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(path), **kwargs)
    elif task == "translation":
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), **kwargs)
    else:
        cls = transformers.AutoModelForSequenceClassification if task == "seq-cls" else transformers.AutoModelForTokenClassification
        model = cls.from_pretrained(
            str(path), num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True, **kwargs,
        )
    if opts.method == "qlora":
        peft = require("peft")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    return model


# ---------------------------------------------------------------------------- progress

def _progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Step, loss, tokens/s and ETA on stderr (rank 0 only) through edgetune.console."""

        def __init__(self):
            self.t0 = None
            self.step0 = 0
            self.tok0 = 0
            self.last = (None, 0)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.step0 = state.global_step
            self.tok0 = state.num_input_tokens_seen
            self.last = (self.t0, self.tok0)
            if state.is_world_process_zero and state.global_step:
                console.log(f"[finetune] resumed at step {state.global_step}/{state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "loss" not in logs or self.t0 is None:
                return
            now = time.perf_counter()
            done = state.global_step - self.step0
            elapsed = now - self.t0
            t_last, tok_last = self.last
            dt = max(now - t_last, 1e-9)
            tps = (state.num_input_tokens_seen - tok_last) / dt
            self.last = (now, state.num_input_tokens_seen)
            eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
            console.log(
                f"[finetune] step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                f"lr {logs.get('learning_rate', 0):.2e}  {tps:,.0f} tok/s  ETA {eta:,.0f}s"
            )

    return Progress()


# ---------------------------------------------------------------------------- the run

def run_training(spec: dict[str, Any]) -> None:
    """Train in the work folder described by ``spec`` (one process, or one rank of many)."""
    import warnings

    warnings.filterwarnings("ignore", message="mtime may not be reliable")
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    transformers = require("transformers", purpose="fine-tuning")
    require("torch")  # installed, or one line naming the extra (exit 3), before any data is read
    opts = FinetuneOptions.from_dict(spec["options"])
    wd = Path(spec["workdir"])
    model_path = Path(spec["model_path"])
    ds = load_dataset(spec["data"], limit=opts.limit)
    if spec.get("eval_data"):
        train_ds, eval_ds = ds, load_dataset(spec["eval_data"])
    else:
        train_ds, eval_ds = split(ds, opts.eval_fraction, seed=opts.seed)
    task = spec["task"]
    transformers.set_seed(opts.seed)

    tok = transformers.AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    label_names: list[str] = []
    from . import features as F

    if task == "causal-lm":
        train_f = F.causal_features(tok, train_ds, max_seq_len=opts.max_seq_len, loss_on_answer_only=opts.loss_on_answer_only, packing=opts.packing)
        eval_f = F.causal_features(tok, eval_ds, max_seq_len=opts.max_seq_len, loss_on_answer_only=opts.loss_on_answer_only, packing=False) if len(eval_ds) else []
    elif task == "qa":
        train_f = F.qa_features(tok, train_ds, max_seq_len=opts.max_seq_len, doc_stride=opts.doc_stride)
        eval_f = F.qa_features(tok, eval_ds, max_seq_len=opts.max_seq_len, doc_stride=opts.doc_stride) if len(eval_ds) else []
    elif task == "translation":
        train_f = F.seq2seq_features(tok, train_ds, max_seq_len=opts.max_seq_len, prefix=opts.source_prefix)
        eval_f = F.seq2seq_features(tok, eval_ds, max_seq_len=opts.max_seq_len, prefix=opts.source_prefix) if len(eval_ds) else []
    else:
        label_names = train_ds.labels
        if len(label_names) < 2:
            raise BadInput(f"{train_ds.path}: the training split has {len(label_names)} distinct label(s)", hint="a classifier needs at least two labels")
        l2i = {n: i for i, n in enumerate(label_names)}
        make = F.classification_features if task == "seq-cls" else F.token_features
        train_f = make(tok, train_ds, l2i, max_seq_len=opts.max_seq_len)
        eval_f = make(tok, eval_ds, l2i, max_seq_len=opts.max_seq_len) if len(eval_ds) else []

    peft = require("peft")
    model = load_model(model_path, task, opts, label_names)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    check_target_modules(opts, model)
    model = peft.get_peft_model(model, peft_config(opts, task, model))
    trainable, total = model.get_nb_trainable_parameters()
    from . import qat

    qat_spec = qat.spec_from_options(opts)
    qat_info = distiller = None
    if qat_spec is not None:
        if opts.quant_aware_distill:  # the float base writes and scores its corpus before the grid is applied
            who = "the float base" if not opts.quant_aware_teacher else f"the teacher {opts.quant_aware_teacher}"
            with console.step(f"quant-aware: distillation corpus from {who}"):
                distiller = qat.Distiller(model, tok, weight=opts.quant_aware_distill, batch_size=opts.batch_size,
                                          seq_len=min(opts.max_seq_len, opts.quant_aware_distill_seq_len), seed=opts.seed,
                                          samples=opts.quant_aware_distill_samples, base_path=model_path,
                                          teacher_path=opts.quant_aware_teacher)
        qat_info = qat.apply(model, qat_spec)
        if distiller is not None:
            qat_info["distill"] = distiller.info

    prec = _precision(opts)
    ds_config = None
    if opts.deepspeed:
        from .deepspeed import resolve_config

        ds_config = resolve_config(opts.deepspeed)
    args = transformers.TrainingArguments(
        output_dir=str(wd / "checkpoints"),
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        lr_scheduler_type=opts.schedule,
        # transformers 5 dropped warmup_ratio: a warmup_steps below 1 is the ratio (1.0 would mean one step)
        warmup_steps=min(opts.warmup_ratio, 1 - 1e-9),
        weight_decay=opts.weight_decay,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1,
        gradient_checkpointing=opts.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
        seed=opts.seed,
        data_seed=opts.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        optim=_optim(opts),
        use_cpu=not _on_gpu(),
        deepspeed=ds_config,
        ddp_backend=None if _on_gpu() else ("gloo" if os.environ.get("WORLD_SIZE") else None),
        **({"label_names": ["start_positions", "end_positions"]} if task == "qa" else {}),
        **opts.extra,
    )

    def accuracy(p):
        import numpy as np

        preds = np.argmax(p.predictions, axis=-1)
        labels = p.label_ids
        mask = labels != F.IGNORE
        return {"accuracy": float((preds[mask] == labels[mask]).mean())}

    metric_fn = accuracy if task in ("seq-cls", "token-cls") else None

    class _Trainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if distiller is None or not model.training:
                return out
            extra = distiller.weight * distiller.loss(model)
            return (out[0] + extra, *out[1:]) if return_outputs else out + extra

        def create_optimizer(self):
            # LoRA has no trainable bias/norm, so the Trainer's "no weight decay" group is empty;
            # DeepSpeed drops empty groups and the LR scheduler then no longer matches. Drop it here.
            opt = super().create_optimizer()
            opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
            return opt

    trainer = _Trainer(
        model=model, args=args, train_dataset=train_f, eval_dataset=eval_f or None,
        data_collator=F.Collator(tok.pad_token_id), compute_metrics=metric_fn,
        callbacks=[_progress_callback()],
    )
    # logs go through our progress callback on stderr; the Printer would write dicts to stdout
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    resume_from = latest_checkpoint(wd / "checkpoints") if spec.get("resume") else None
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.perf_counter() - t0

    final = wd / "final"
    if trainer.is_world_process_zero():
        shutil.rmtree(final, ignore_errors=True)
    trainer.save_model(str(final))  # collective under ZeRO-3: gathers the sharded adapter

    metrics: dict[str, Any] = {}
    if eval_f:
        ft = trainer.evaluate()
        metrics["eval_loss"] = ft.get("eval_loss")
        if "eval_accuracy" in ft:
            metrics["eval_accuracy"] = ft["eval_accuracy"]
        if task == "causal-lm":
            with trainer.model.disable_adapter() if hasattr(trainer.model, "disable_adapter") else trainer.accelerator.unwrap_model(trainer.model).disable_adapter():
                base = trainer.evaluate()
            metrics["base_eval_loss"] = base.get("eval_loss")
    if trainer.is_world_process_zero():
        tok.save_pretrained(str(final))
        history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        result = {
            "task": task,
            "label_names": label_names,
            "train_records": len(train_ds),
            "eval_records": len(eval_ds),
            "train_samples": len(train_f),
            "train_tokens": F.count_tokens(train_f),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "global_step": trainer.state.global_step,
            "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else 0,
            "train_loss": out.training_loss,
            "train_seconds_this_session": round(train_s, 2),
            "tokens_per_second": round(out.metrics.get("train_tokens_per_second", 0) or (trainer.state.num_input_tokens_seen / train_s if train_s else 0), 1),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "precision": prec,
            "optim": args.optim if isinstance(args.optim, str) else str(args.optim),
            "deepspeed_config": ds_config,
            "quant_aware": qat_info,
            "loss_curve": [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"), "epoch": h.get("epoch")} for h in history],
            **metrics,
        }
        artifacts.write_json(final / "train_result.json", result)


def _check_adapter(folder: Path) -> dict[str, Any]:
    """Every saved adapter tensor must be non-empty and finite (ZeRO-3 can save empty shards)."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckFailed(f"training finished but no adapter was saved in {folder}", hint="rerun; this is a bug if it repeats")
    n_tensors = n_params = 0
    with safe_open(str(path), framework="np") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.size == 0:
                raise CheckFailed(f"saved adapter tensor {key} is empty (sharded weights were not gathered)", hint="use stage3_gather_16bit_weights_on_model_save in the DeepSpeed config")
            n_tensors += 1
            n_params += int(t.size)
    return {"adapter_tensors": n_tensors, "adapter_parameters": n_params, "adapter_bytes": path.stat().st_size}


def _plot(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finetune(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, options: FinetuneOptions | None = None, resume: bool = False) -> Path:
    """Fine-tune ``model`` on ``data`` into the adapter folder ``out`` (see docs/finetune.md).

    ``out`` (and its work folder ``<out>.work``) is locked for the whole run: a second run into
    the same folder fails fast (exit 2) instead of mixing checkpoints.
    """
    opts = (options or FinetuneOptions()).check()
    out = Path(out)
    artifacts.check_replaceable(out, inputs=(model, data))
    with artifacts.output_lock(out):
        return _finetune(model, data, out, opts, resume)


def _finetune(model, data, out: Path, opts: FinetuneOptions, resume: bool) -> Path:
    # the data first: a missing or malformed file is found before a GGUF import of half a minute or more
    ds = load_dataset(data, limit=opts.limit)
    if opts.eval_data:
        load_dataset(opts.eval_data)  # fail early, line-exact
    info = materialize(model)
    task = check_model_and_data(opts.task, ds, info)
    from .memory import check_fits

    check_fits(Path(info.path), info.config, opts, task=task)  # before any weight is loaded: exit 2 with the figures
    if task == "qa" and opts.doc_stride >= opts.max_seq_len:
        raise BadInput(f"--doc-stride {opts.doc_stride} must be below --max-seq-len {opts.max_seq_len} (windows share that many tokens)",
                       hint="use e.g. --doc-stride 128 with --max-seq-len 384")
    if opts.source_prefix and task != "translation":
        raise BadInput(f"--source-prefix is for translation fine-tunes (this is a {task} fine-tune)", hint="drop --source-prefix")
    if opts.quant_aware and task != "causal-lm":
        raise BadInput(f"--quant-aware is for decoder LLMs exported at int4 (this is a {task} fine-tune)", hint="drop --quant-aware")
    wd = work_dir(out)
    spec_path = wd / "spec.json"
    spec = {"model_path": str(info.path), "data": str(Path(data).resolve()), "eval_data": opts.eval_data, "task": task, "options": opts.to_dict(), "workdir": str(wd.resolve())}
    if resume:
        if not spec_path.is_file():
            raise BadInput(f"nothing to resume: {wd} does not exist", hint="run without --resume to start")
        old = json.loads(spec_path.read_text())
        if {k: v for k, v in old.items() if k != "resume"} != spec:
            raise BadInput(f"--resume with different model, data or options than the interrupted run in {wd}", hint="use the same arguments, or drop --resume to start over")
    elif wd.exists():
        if not spec_path.is_file():
            raise BadInput(f"{wd} exists and is not an edgetune work folder (no spec.json); refusing to delete it",
                           hint="move it away or choose another --out")
        console.log(f"[finetune] starting over: removing the previous work folder {wd}")
        shutil.rmtree(wd)
    created = not wd.exists()
    wd.mkdir(parents=True, exist_ok=True)
    spec["resume"] = resume
    artifacts.write_json(spec_path, spec)

    inputs = {"model": info.path, "data": Path(data)}
    if opts.eval_data:
        inputs["eval_data"] = Path(opts.eval_data)
    if opts.quant_aware and opts.quant_aware_distill:
        from .qat import distill_prompts

        inputs["distill_prompts"] = distill_prompts()
    try:
        _train_and_write(wd, spec, spec_path, out, inputs, opts, task, info, model, data)
    except (BadInput, OSError):
        # a problem found before the first checkpoint (bad --target-modules, a full disk): leave nothing behind
        if created and latest_checkpoint(wd / "checkpoints") is None:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    shutil.rmtree(wd, ignore_errors=True)
    return out


def _train_and_write(wd: Path, spec: dict, spec_path: Path, out: Path, inputs: dict, opts: FinetuneOptions, task: str, info, model, data) -> None:
    with console.step(f"finetune {opts.method} {task}"):
        if opts.num_processes > 1:
            from .deepspeed import launch

            launch(spec_path, opts.num_processes)
        else:
            if opts.deepspeed:
                require("deepspeed", extra="deepspeed", purpose="--deepspeed")
                _single_process_dist_env()
            run_training(spec)
        final = wd / "final"
        result_file = final / "train_result.json"
        if not result_file.is_file():
            raise EdgetuneError(f"training ended without a result in {final}", hint="rerun with --resume; report it if it repeats")
        result = json.loads(result_file.read_text())
        result.update(_check_adapter(final))
        with artifacts.stage_output(out, STAGE, inputs=inputs, options={"task": task, **opts.to_dict()}) as run:
            for p in final.iterdir():
                # training_args.bin is a pickle and README.md an empty model card: not shipped
                if p.is_file() and p.name not in ("train_result.json", "training_args.bin", "README.md"):
                    shutil.copy2(p, run.dir / p.name)
            curve = result.pop("loss_curve")
            artifacts.write_json(run.dir / "loss_curve.json", curve)
            _plot(curve, run.dir / "loss_curve.png", f"{opts.method} on {Path(data).name} ({info.model_type})")
            artifacts.write_json(run.dir / "finetune_config.json", {"model": str(model), "model_path": str(info.path), "data": str(data), "task": task, "options": opts.to_dict(), "deepspeed_config": result.pop("deepspeed_config")})
            if curve:
                k = max(1, len(curve) // 10)
                result["first_loss"] = sum(p["loss"] for p in curve[:k]) / k
                result["last_loss"] = sum(p["loss"] for p in curve[-k:]) / k
            metrics = {k: result[k] for k in ("eval_loss", "base_eval_loss", "eval_accuracy") if result.get(k) is not None}
            artifacts.write_json(run.dir / "eval_metrics.json", metrics)
            run.results.update({"method": opts.method, "model_type": info.model_type, **result})


def _single_process_dist_env() -> None:
    """DeepSpeed needs a process group even for one process."""
    from .deepspeed import _free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
