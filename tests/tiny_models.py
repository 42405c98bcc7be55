"""Tiny random models built from configs in the test session: no download, seconds to build.

Each builder writes a complete Hugging Face folder (config, safetensors weights, tokenizer
with chat template) that every stage accepts like a real model.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Edge devices run small language models with int4 weights.",
    "Turn on the kitchen lights and set the thermostat to 21 degrees.",
    "Hello world! Numbers 0123456789 and punctuation: ,.;:!?()[]{}",
    "héllo wörld, naïve café, 你好, emoji 🙂 and tabs\tand newlines\n",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(out: Path, vocab_size: int = 512):
    """A ByteLevel BPE tokenizer (GPT-2 style, like SmolLM2/Qwen) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_wordpiece_tokenizer(out: Path, vocab_size: int = 512):
    """A BERT-style WordPiece tokenizer with [CLS]/[SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    fast = BertTokenizerFast(tokenizer_object=tok, vocab_file=str(out / "vocab.txt"))
    fast.save_pretrained(out)
    return fast


def _decoder_common(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def bf16_copy(src: Path, out: Path) -> Path:
    """``src`` (an HF causal LM folder) saved again in bf16, as the hub ships checkpoints, with its tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(out))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**_decoder_common(tok), tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_phi3(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Phi3Config(**_decoder_common(tok), tie_word_embeddings=False, rope_scaling=None, sliding_window=None)
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_bert(out: Path, num_labels: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    tok = build_wordpiece_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        num_labels=num_labels,
        id2label={i: f"LABEL_{i}" for i in range(num_labels)},
        label2id={f"LABEL_{i}": i for i in range(num_labels)},
    )
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


NER_TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def build_tiny_bert_ner(out: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT token classifier (BIO tags NER_TAGS) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    out.mkdir(parents=True, exist_ok=True)
    tok = build_wordpiece_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, num_labels=len(NER_TAGS), id2label=dict(enumerate(NER_TAGS)),
                     label2id={t: i for i, t in enumerate(NER_TAGS)})
    BertForTokenClassification(cfg).eval().save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_bert_qa(out: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT with an extractive question-answering (span) head and a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    out.mkdir(parents=True, exist_ok=True)
    tok = build_wordpiece_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256)
    BertForQuestionAnswering(cfg).eval().save_pretrained(out, safe_serialization=True)
    return out


QA_CONTEXTS = [
    "What is the capital of France? Paris is the capital of France.",
    "Turn on the kitchen lights and set the thermostat to 21 degrees.",
    "Edge devices run small language models with int4 weights.",
    "The quick brown fox jumps over the lazy dog.",
]
QA_PAIRS = [  # (context index, question, answer)
    (0, "What is the capital of France?", "Paris"),
    (1, "What should be set to 21 degrees?", "the thermostat"),
    (1, "Which lights?", "kitchen"),
    (2, "What weights do edge devices run?", "int4"),
    (2, "What runs small language models?", "Edge devices"),
    (3, "What jumps over the lazy dog?", "The quick brown fox"),
    (3, "What does the fox jump over?", "the lazy dog"),
]


def squad_records(long_context_repeats: int = 0) -> list[dict]:
    """SQuAD records over the tokenizer's corpus; ``long_context_repeats`` > 0 adds records whose context
    repeats the corpus that many times before the answer's sentence (longer than one window)."""
    recs = []
    for ci, q, a in QA_PAIRS:
        ctx = QA_CONTEXTS[ci]
        recs.append({"question": q, "context": ctx, "answers": {"text": [a], "answer_start": [ctx.index(a)]}})
    if long_context_repeats:
        filler = " ".join(QA_CONTEXTS[2:4]) + " "
        for ci, q, a in QA_PAIRS[:2]:
            ctx = filler * long_context_repeats + QA_CONTEXTS[ci]
            recs.append({"question": q, "context": ctx, "answers": {"text": [a], "answer_start": [ctx.rindex(a)]}})
    return recs


# ---------------------------------------------------------------- translation (sequence-to-sequence)

MT_PAIRS = [  # (English, German): a toy parallel corpus; the tests check the pipeline, not translation quality
    ("The house is small.", "Das Haus ist klein."),
    ("The dog sleeps in the garden.", "Der Hund schläft im Garten."),
    ("I drink water every morning.", "Ich trinke jeden Morgen Wasser."),
    ("The train is late today.", "Der Zug ist heute spät."),
    ("Turn on the kitchen lights.", "Schalte das Licht in der Küche ein."),
    ("Where is the station?", "Wo ist der Bahnhof?"),
    ("We read a book together.", "Wir lesen zusammen ein Buch."),
    ("The weather is nice and warm.", "Das Wetter ist schön und warm."),
    ("My sister lives in Berlin.", "Meine Schwester wohnt in Berlin."),
    ("Thank you for the coffee.", "Danke für den Kaffee."),
]
T5_PREFIX = "translate English to German: "


def build_unigram_tokenizer(out: Path, vocab_size: int = 400):
    """A SentencePiece-style Unigram tokenizer (Metaspace, like T5/Marian) trained on both sides of MT_PAIRS.

    Specials follow T5: <pad> 0, </s> 1, <unk> 2; every encoded text ends with </s>.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    texts = [s for pair in MT_PAIRS for s in pair] + [T5_PREFIX + s for s, _ in MT_PAIRS] + CORPUS
    tok.train_from_iterator(texts * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def build_tiny_t5(out: Path, seed: int = 0) -> Path:
    """A 2+2-layer random T5 (d_model 128 = 2 heads of 64, relative position buckets) with a Unigram tokenizer.

    The layout of T5ForConditionalGeneration (t5-small, flan-t5, mT5 load the same class)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = build_unigram_tokenizer(out)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=128, d_kv=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                   initializer_factor=2.0,  # the default 1.0 gives a random model that only ever says <pad>; 3.0 is chaotic (fp32 merge rounding grows to 2e-2)
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="relu",
                   architectures=["T5ForConditionalGeneration"])
    model = T5ForConditionalGeneration(cfg).eval()
    model.generation_config.max_length = 64
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_marian(out: Path, seed: int = 0, tokenizer_json: bool = True) -> Path:
    """A 2+2-layer random Marian (d_model 128 = 2 heads of 64, sinusoidal positions, shared vocabulary).

    ``tokenizer_json=False`` leaves only SentencePiece-style placeholders (source.spm, target.spm,
    vocab.json), the layout of most opus-mt releases, which the device cannot read.
    """
    import json

    import torch
    from transformers import MarianConfig, MarianMTModel

    out.mkdir(parents=True, exist_ok=True)
    tok = build_unigram_tokenizer(out)
    vocab = len(tok)
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=vocab, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
                       scale_embedding=True, share_encoder_decoder_embeddings=True, architectures=["MarianMTModel"],
                       init_std=0.15)  # the default 0.02 gives a model that repeats one token; 0.3 is chaotic (merge rounding > 1e-3)
    model = MarianMTModel(cfg).eval()
    model.generation_config.max_length = 64
    model.generation_config.num_beams = 1
    model.generation_config.bad_words_ids = None
    model.save_pretrained(out, safe_serialization=True)
    if not tokenizer_json:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / f).unlink(missing_ok=True)
        (out / "source.spm").write_bytes(b"\x00")
        (out / "target.spm").write_bytes(b"\x00")
        (out / "vocab.json").write_text(json.dumps({t: i for t, i in tok.get_vocab().items()}))
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer"}))
    return out


def translation_records() -> list[dict]:
    return [{"source": s, "target": t} for s, t in MT_PAIRS]
