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
