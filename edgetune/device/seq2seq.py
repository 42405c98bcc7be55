"""Translation on the device: greedy decoding over the encoder and decoder-with-past ONNX graphs.

Device code: onnxruntime, numpy and tokenizers only. A translation export (or a bundle's ``model/``)
holds ``encoder.onnx``, ``decoder.onnx``, ``tokenizer.json`` (source side; ``target_tokenizer.json``
too when the target vocabulary is tokenized differently) and ``seq2seq.json``, the facts the host
export recorded so the device applies them identically:

``task``              ``"translation"``
``prefix``            text put before every source (T5: ``"translate English to German: "``; Marian: ``""``)
``decoder_start_token_id``, ``eos_token_id``, ``pad_token_id``
``suppress_token_ids`` tokens greedy decoding never picks (Marian's ``bad_words_ids``: the pad token)
``max_source_tokens`` the source is cut there (the model's positions; T5 has none, 512 then)
``max_new_tokens``    default cap of generated tokens
``layers``            decoder layers (how many past/present pairs the decoder graph has)

One sentence at a time: the encoder runs once (it also returns the cross-attention keys/values), then
each decoder step feeds the last token and the self-attention cache of the previous step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput
from .files import load_tokenizer, read_json
from .session import create_session, resolve_target

CONFIG = "seq2seq.json"
GRAPHS = ("encoder.onnx", "decoder.onnx")


@dataclass
class Translator:
    folder: Path
    encoder: Any
    decoder: Any
    tokenizer: Any
    target_tokenizer: Any
    config: dict[str, Any]
    target: Any = None
    load_time_s: float = 0.0
    input_names: list[str] = field(default_factory=list)

    @property
    def start_id(self) -> int:
        return int(self.config["decoder_start_token_id"])

    @property
    def eos_id(self) -> int:
        return int(self.config["eos_token_id"])

    def source_ids(self, text: str) -> list[int]:
        """Token ids of a source text as the model reads it (prefix, end-of-sequence token, cut at the model's length)."""
        ids = self.tokenizer.encode(self.config.get("prefix", "") + text).ids
        cap = int(self.config["max_source_tokens"])
        if len(ids) > cap:
            ids = ids[: cap - 1] + [self.eos_id]
        return ids

    def greedy_ids(self, ids: list[int], *, max_new_tokens: int | None = None, keep_logits: bool = False):
        """Greedy decoding of one tokenized source: the generated ids (eos included if reached, start excluded);
        with ``keep_logits`` also each step's logits row."""
        n = int(self.config["layers"])
        cap = int(self.config["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
        src = np.asarray([ids], np.int64)
        mask = np.ones_like(src)
        enc_out = self.encoder.run(None, {"input_ids": src, "attention_mask": mask})
        cross = enc_out[1:]
        heads, head_dim = cross[0].shape[1], cross[0].shape[3]
        past = [np.zeros((1, heads, 0, head_dim), np.float32) for _ in range(2 * n)]
        suppress = [int(s) for s in self.config.get("suppress_token_ids") or []]
        token, out, rows = self.start_id, [], []
        for _ in range(cap):
            feeds = {"input_ids": np.asarray([[token]], np.int64), "encoder_attention_mask": mask}
            for i in range(n):
                feeds[f"past_key_values.{i}.decoder.key"], feeds[f"past_key_values.{i}.decoder.value"] = past[2 * i], past[2 * i + 1]
                feeds[f"past_key_values.{i}.encoder.key"], feeds[f"past_key_values.{i}.encoder.value"] = cross[2 * i], cross[2 * i + 1]
            res = self.decoder.run(None, feeds)
            logits = res[0][0, -1].astype(np.float32)
            if keep_logits:
                rows.append(logits.copy())
            if suppress:
                logits[suppress] = -np.inf
            token = int(np.argmax(logits))
            out.append(token)
            past = res[1:]
            if token == self.eos_id:
                break
        return (out, rows) if keep_logits else out

    def detokenize(self, ids: list[int]) -> str:
        return self.target_tokenizer.decode([i for i in ids if i not in (self.eos_id, int(self.config["pad_token_id"]))],
                                            skip_special_tokens=True).strip()

    def translate(self, texts: list[str], *, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
        """[{"translation", "ids", "source_tokens", "truncated"}] per text."""
        rows = []
        for text in texts:
            ids = self.source_ids(text)
            got = self.greedy_ids(ids, max_new_tokens=max_new_tokens)
            rows.append({"translation": self.detokenize(got), "ids": got, "source_tokens": len(ids),
                         "truncated": bool(got) and got[-1] != self.eos_id})
        return rows


def find_model_folder(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / CONFIG).is_file():
            return cand
    raise BadInput(f"{p} is not a translation export (no {CONFIG})", hint="give an `edgetune export` output of a Marian/T5 model or its bundle")


def is_translation(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() or (p / "model" / CONFIG).is_file()


def load(folder: str | Path, target: Any = None) -> Translator:
    """Both sessions (the target's providers and options) and the tokenizers; bad files are exit 2 naming them."""
    folder = find_model_folder(folder)
    t = resolve_target(target)
    cfg = read_json(folder / CONFIG, kind="translation config")
    missing = [k for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "max_source_tokens", "max_new_tokens", "layers")
               if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if missing or not isinstance(cfg.get("prefix", ""), str):
        raise BadInput(f"{folder / CONFIG}: missing or invalid {', '.join(missing) or 'prefix'}",
                       hint="the file is damaged or was modified; re-export the model (or copy the bundle again)")
    for name in (*GRAPHS, "tokenizer.json"):
        if not (folder / name).is_file():
            raise BadInput(f"{folder} has no {name}", hint="re-export the model with edgetune export")
    t0 = time.perf_counter()
    tok = load_tokenizer(folder / "tokenizer.json")
    tgt = load_tokenizer(folder / "target_tokenizer.json") if (folder / "target_tokenizer.json").is_file() else tok
    tok.no_padding()
    tok.no_truncation()
    enc = create_session(folder / "encoder.onnx", t)
    dec = create_session(folder / "decoder.onnx", t)
    return Translator(folder=folder, encoder=enc, decoder=dec, tokenizer=tok, target_tokenizer=tgt, config=cfg, target=t,
                      load_time_s=time.perf_counter() - t0, input_names=[i.name for i in dec.get_inputs()])
