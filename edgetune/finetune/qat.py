"""Quantization-aware fine-tuning: train the LoRA through the int4 grid the export will use.

``edgetune finetune --quant-aware int4`` trains the adapter while every targeted linear computes
with ``fake_quant(W + scaling * B @ A)`` instead of ``W x + scaling * B A x``: the merged weight,
rounded exactly as ``edgetune export --precision int4`` (the builder's RTN, onnxruntime's
``quantize_matmul_4bits``) will round it, with a straight-through gradient. The frozen tensors
that the export quantizes too are rounded once, in place, before training: the token embedding
(int4 GatherBlockQuantized), the output head (``lm_head``: int4, int8 or fp32) and any linear the
adapter does not target. So merge -> int4 export reproduces the model the adapter was trained as
(measured by the merge gate, ``results.gate.vs_fake_quant``), instead of rounding the trained
delta away.

The grid (checked against onnxruntime in ``tests/test_qat.py``): per block of ``block_size``
consecutive input features of one output row, ``scale = v / -2^(bits-1)`` with ``v`` the
block's value of largest magnitude (sign kept), ``q = clip(round(w / scale) + 2^(bits-1), 0,
2^bits - 1)``, ``w' = (q - 2^(bits-1)) * scale``. torchao's QAT (``IntxFakeQuantizeConfig``)
uses ``scale = max|w| / 7.5`` with the same 16 levels, a different grid: training on it would
not reproduce MatMulNBits' weights, hence this module.

Only what the export supports is accepted: LoRA (not DoRA/QLoRA/LoHa/...), symmetric int4, a
block size that is a power of two >= 16, no DeepSpeed (sharded weights are not fake-quantized).
LoRA dropout does not apply under QAT (the adapter acts through the merged weight).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import BadInput
from ..quant import LM_HEADS, QAT_SCHEMES, QATSpec, embedding_block_size

def spec_from_options(opts) -> QATSpec | None:
    """The QAT grid of FinetuneOptions (None without --quant-aware); raises BadInput on a bad choice."""
    if not opts.quant_aware:
        if opts.quant_aware_distill:
            raise BadInput("--quant-aware-distill needs --quant-aware", hint="add --quant-aware int4, or drop --quant-aware-distill")
        if opts.quant_aware_teacher:
            raise BadInput("--quant-aware-teacher needs --quant-aware", hint="add --quant-aware int4, or drop --quant-aware-teacher")
        return None
    if opts.quant_aware not in QAT_SCHEMES:
        raise BadInput(f"unknown --quant-aware scheme '{opts.quant_aware}'", hint=f"use {', '.join(QAT_SCHEMES)} (the export's int4 RTN grid)")
    if opts.method != "lora":
        raise BadInput(f"--quant-aware needs --method lora (got {opts.method})",
                       hint="QLoRA/DoRA/LoHa/LoKr/IA3 do not act through one merged weight the int4 export rounds")
    b = opts.quant_aware_block_size
    if b < 16 or b & (b - 1):
        raise BadInput(f"--quant-aware-block-size must be a power of two >= 16 (got {b})", hint="use the target's int4 block_size, e.g. 32")
    if opts.quant_aware_lm_head not in LM_HEADS:
        raise BadInput(f"--quant-aware-lm-head '{opts.quant_aware_lm_head}' is not one of {', '.join(LM_HEADS)}",
                       hint="use the export's --int4-lm-head")
    if opts.quant_aware_distill_samples < 1:
        raise BadInput(f"--quant-aware-distill-samples must be >= 1 (got {opts.quant_aware_distill_samples})", hint="use e.g. 48")
    if opts.quant_aware_distill < 0:
        raise BadInput(f"--quant-aware-distill must be >= 0 (got {opts.quant_aware_distill})", hint="use e.g. 1.0, or 0 to turn it off")
    if opts.quant_aware_teacher and not opts.quant_aware_distill:
        raise BadInput("--quant-aware-teacher is the distillation's teacher, but --quant-aware-distill is 0 (off)",
                       hint="add --quant-aware-distill 2.0, or drop --quant-aware-teacher")
    if opts.deepspeed:
        raise BadInput("--quant-aware cannot be combined with --deepspeed yet (sharded weights are not fake-quantized)",
                       hint="train quant-aware in one process, or drop --quant-aware")
    return QATSpec(block_size=b, lm_head=opts.quant_aware_lm_head)


# ---------------------------------------------------------------------------- the grid

def fake_quant(w, bits: int = 4, block_size: int = 32):
    """``w`` [out, in] rounded onto MatMulNBits' symmetric RTN grid (blocks along ``in``), same dtype."""
    import torch

    n, k = w.shape
    pad = (-k) % block_size
    x = w.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = x.reshape(n, -1, block_size)
    idx = blocks.abs().argmax(-1, keepdim=True)
    mid = float(1 << (bits - 1))
    scale = blocks.gather(-1, idx) / -mid
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(blocks / safe) + mid, 0, 2 * mid - 1)
    out = ((q - mid) * scale).reshape(n, -1)[:, :k]
    return out.to(w.dtype)


def _ste(w, bits: int, block_size: int):
    """Fake quant with a straight-through gradient (identity in the backward pass)."""
    import torch

    with torch.no_grad():
        delta = fake_quant(w, bits, block_size) - w
    return w + delta


def _lora_weight(module):
    """W + sum of active adapters' scaling * B @ A for a peft LoRA Linear (what merge_and_unload writes)."""
    w = module.base_layer.weight
    if module.disable_adapters:
        return w
    for name in module.active_adapters:
        if name in module.lora_A:
            w = w + (module.lora_B[name].weight @ module.lora_A[name].weight) * module.scaling[name]
    return w


def _qat_forward(module, spec: QATSpec):
    import torch

    def forward(x, *args, **kwargs):
        w = _ste(_lora_weight(module), spec.bits, spec.block_size)
        return torch.nn.functional.linear(x.to(w.dtype), w, module.base_layer.bias)

    return forward


def apply(model, spec: QATSpec) -> dict[str, Any]:
    """Make a peft LoRA causal-LM model compute through ``spec``'s grid (in place); a summary for the record."""
    import torch

    lora_linears = []
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            if not isinstance(mod.base_layer, torch.nn.Linear) or getattr(mod, "fan_in_fan_out", False):
                raise BadInput(f"--quant-aware supports LoRA on nn.Linear only; {name} is {type(mod.base_layer).__name__}",
                               hint="drop --quant-aware for this model")
            if any(getattr(mod, "use_dora", {}).get(a, False) for a in mod.lora_A):
                raise BadInput("--quant-aware does not support DoRA", hint="use --method lora")
            lora_linears.append((name, mod))
    if not lora_linears:
        raise BadInput("--quant-aware found no LoRA linear layer to train through the int4 grid", hint="check --target-modules")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = _round_frozen(base, spec)
    for _, mod in lora_linears:
        mod.forward = _qat_forward(mod, spec)
    return {**spec.to_dict(), "grid": spec.describe(), "lora_linears": len(lora_linears), "frozen_quantized": frozen,
            "lora_dropout": "not applied (the adapter acts through the merged, fake-quantized weight)"}


def quantize_model_weights(model, spec: QATSpec) -> list[str]:
    """Round a plain (merged) causal LM's weights in place as the int4 export does (the merge gate's model)."""
    return _round_frozen(model, spec)


def _round_frozen(base, spec: QATSpec) -> list[str]:
    """Round, in place, every weight the int4 export quantizes except the LoRA-wrapped linears'.

    The output head as ``spec.lm_head`` says (a tied head is untied first when it is not int4, as
    the export unties it), the token embedding at int4 (GatherBlockQuantized; its block divides the
    hidden size), every other decoder-layer nn.Linear at ``spec.bits``. Returns what was rounded.
    """
    import torch


    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    done: list[str] = []
    with torch.no_grad():
        if head is not None and head.weight is embed.weight and spec.lm_head != "int4":
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        if head is not None and spec.lm_head != "fp32":
            bits = 4 if spec.lm_head == "int4" else 8
            head.weight.data = fake_quant(head.weight.data, bits, spec.block_size)
            done.append(f"lm_head int{bits}")
        if head is not None and embed.weight is head.weight:
            done.append("embedding: tied to the int4 lm_head")
        else:
            eb = embedding_block_size(embed.weight.shape[1], spec.block_size)
            if eb is not None:
                embed.weight.data = fake_quant(embed.weight.data, 4, eb)
                done.append(f"embedding int4 block {eb}")
        plain = 0
        for name, mod in base.named_modules():
            # peft's wrapped base layers and its lora_A/lora_B are not rounded here (the forward does it)
            if (type(mod) is torch.nn.Linear and mod is not head and ".layers." in f".{name}"
                    and "lora_" not in name and not name.endswith("base_layer")):
                mod.weight.data = fake_quant(mod.weight.data, spec.bits, spec.block_size)
                plain += 1
        if plain:
            done.append(f"{plain} decoder linear(s) int{spec.bits}")
    return done


# ---------------------------------------------------------------------------- keeping the base model


def distill_prompts():
    """The prompts the distillation corpus continues: the project's generic calibration set. A data file, not
    code: the fine-tune's fingerprint names it as an input (build and record), so an edgetune whose set changed
    trains again instead of reusing a fine-tune distilled on the old one."""
    from ..resources import data_dir

    return data_dir("calibration") / "llm-general.jsonl"


class Distiller:
    """Data-free self-distillation for quant-aware LoRA (``--quant-aware-distill WEIGHT``).

    The teacher is the float base (``teacher_path`` None) or another float model of the same tokenizer
    (``--quant-aware-teacher``; a build passes the float fine-tune's merge, so the int4 student learns
    to be the fine-tune, not the base).

    Training through the int4 grid on the task alone teaches the adapter the task, not how to undo the
    int4 damage everywhere else (the demo: task kept, generic perplexity +29 %). Like LLM-QAT, the
    model writes its own generic corpus: before training, the float base continues the prompts of the
    project's generic calibration set (sampled, seeded), and its token distributions on that text are
    kept (fp16 log-probs). Each training step then adds ``weight * KL(float base || student)`` on a
    batch of that text to the task loss, the student computing through the grid. Nothing is read
    from outside the project; the corpus is recorded (sample count, tokens, SHA-256 of the texts).
    """

    def __init__(self, model, tok, *, weight: float, batch_size: int, seq_len: int, seed: int, samples: int = 48,
                 base_path: str | os.PathLike | None = None, teacher_path: str | os.PathLike | None = None):
        import contextlib
        import hashlib
        import time

        import torch

        from ..data import load_dataset, texts

        self.weight = weight
        self.batch_size = batch_size
        source = distill_prompts()
        texts_ = [t for t in texts(load_dataset(source)) if t.strip()]
        prompts = [texts_[i % len(texts_)] for i in range(samples)]  # a prompt used again gets another sampled continuation
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        pad = tok.pad_token_id
        teacher = None
        if teacher_path is not None:  # another float model (the float fine-tune's merge): loaded beside the student
            from transformers import AutoModelForCausalLM

            try:
                teacher = AutoModelForCausalLM.from_pretrained(str(teacher_path), dtype=torch.float32).eval()
            except (OSError, ValueError) as exc:
                raise BadInput(f"--quant-aware-teacher {teacher_path}: not a causal LM folder ({exc})",
                               hint="give the merged float fine-tune (edgetune merge BASE ADAPTER -o DIR)") from None
            student_vocab = model.get_base_model().config.vocab_size if hasattr(model, "get_base_model") else model.config.vocab_size
            if teacher.config.vocab_size != student_vocab:
                raise BadInput(f"--quant-aware-teacher {teacher_path}: vocabulary {teacher.config.vocab_size}, the base's is {student_vocab}",
                               hint="the teacher must share the base's tokenizer: use a fine-tune of the same base")
        # the corpus depends on the model that writes it: the teacher's content is its cache key
        key_path = teacher_path if teacher_path is not None else base_path
        cache = _CorpusCache(key_path, prompts=prompts, seed=seed, seq_len=seq_len) if key_path is not None else None
        cached = cache.read() if cache is not None else None
        seqs = cached or []
        net = teacher if teacher is not None else model
        t0 = time.perf_counter()
        with torch.no_grad(), (contextlib.nullcontext() if teacher is not None else model.disable_adapter()):  # model: the PeftModel, before apply()
            model.eval()
            batch, head = _CorpusCache.SAMPLING["generate_batch"], _CorpusCache.SAMPLING["prompt_tokens"]
            for i in range(0, len(prompts) if cached is None else 0, batch):
                chunk = [tok(p, add_special_tokens=False)["input_ids"][:head] for p in prompts[i:i + batch]]
                width = max(len(c) for c in chunk)
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
                out = net.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=_CorpusCache.SAMPLING["top_k"],
                                   max_new_tokens=seq_len - width, pad_token_id=pad, eos_token_id=None)
                for row, m in zip(out, mask):
                    seqs.append(row[int((m == 0).sum()):].tolist())
            corpus_cache = "off" if cache is None else "hit" if cached is not None else cache.write(seqs)
            t1 = time.perf_counter()
            self.ids = torch.tensor([s[:seq_len] + [pad] * (seq_len - len(s[:seq_len])) for s in seqs])
            self.mask = torch.tensor([[1] * min(len(s), seq_len) + [0] * (seq_len - min(len(s), seq_len)) for s in seqs])
            self.teacher = torch.cat([torch.log_softmax(net(input_ids=self.ids[i:i + 4], attention_mask=self.mask[i:i + 4]).logits.float(), -1).half()
                                      for i in range(0, len(self.ids), 4)])
            model.train()
        t2 = time.perf_counter()
        del teacher, net
        self.order = torch.randperm(len(self.ids), generator=gen)
        self.pos = 0
        text_hash = hashlib.sha256("\n".join(tok.decode(s) for s in self.ids.tolist()).encode()).hexdigest()
        who = "the float base" if teacher_path is None else f"the teacher {os.path.basename(os.path.normpath(teacher_path))}"
        self.info = {"weight": weight, "teacher": "base" if teacher_path is None else str(teacher_path),
                     "source": f"generated by {who} from the prompts of {source.name} (top-k {_CorpusCache.SAMPLING['top_k']} sampling, seed {seed})",
                     "samples": len(self.ids), "seq_len": seq_len, "tokens": int(self.mask.sum()), "sha256": text_hash, "cache": corpus_cache,
                     "seconds": {"corpus": round(t1 - t0, 2), "teacher_logprobs": round(t2 - t1, 2)}}

    def loss(self, model):
        """KL(teacher || model) on the next batch of the generated corpus (mean over its tokens)."""
        import torch

        if self.pos + self.batch_size > len(self.order):
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        device = next(model.parameters()).device
        ids, mask = self.ids[idx].to(device), self.mask[idx].to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        t = self.teacher[idx].to(device).float()
        kl = (t.exp() * (t - logp)).sum(-1)
        return (kl * mask).sum() / mask.sum()


class _CorpusCache:
    """The generated corpus's token ids, kept under ``<cache>/qat-corpus/`` (``$EDGETUNE_CACHE``).

    Writing the corpus is most of a distilled QAT build (SmolLM2, 192 sequences: ~450 s of HF
    ``generate`` on 2 cores), and it depends only on the float base and the sampling settings, not
    on the grid or the task: the int4-head and int8-head examples, or a rerun with another learning
    rate, share it. The key hashes the base folder's content, the prompts, the seed, the lengths,
    the sampling settings and the torch/transformers versions (sampling is not bit-stable across
    them). Stored as JSON token ids (no pickle); a file that does not parse as such is written anew.
    The teacher's log-probs are recomputed (one forward pass, and several GB on disk)."""

    SAMPLING = {"top_k": 50, "prompt_tokens": 8, "generate_batch": 8, "eos": None}

    def __init__(self, base_path, *, prompts: list[str], seed: int, seq_len: int):
        import hashlib
        from importlib import metadata

        from ..artifacts import hash_path
        from ..model_input import cache_root

        key = {"base": hash_path(base_path), "prompts": hashlib.sha256("\0".join(prompts).encode()).hexdigest(),
               "seed": seed, "seq_len": seq_len, **self.SAMPLING,
               "torch": metadata.version("torch"), "transformers": metadata.version("transformers")}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.count = len(prompts)
        self.path = cache_root() / "qat-corpus" / f"{self.key[:32]}.json"

    def read(self) -> list[list[int]] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        seqs = data.get("seqs") if isinstance(data, dict) and data.get("key") == self.key else None
        if not (isinstance(seqs, list) and len(seqs) == self.count
                and all(isinstance(s, list) and s and all(type(t) is int and t >= 0 for t in s) for s in seqs)):
            return None
        return seqs

    def write(self, seqs: list[list[int]]) -> str:
        """Best effort: a cache that cannot be written (read-only, full disk) costs the next run time, nothing else."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": self.key, "seqs": seqs}))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            return f"not written ({e.strerror or e})"
        return "written"
