"""Tiny tokenizers and models built locally for tests (no network, a few seconds on CPU).

Two tokenizer conventions, as in the paper's model pool:
- `sentencepiece_style`: BPE with a Metaspace pre-tokenizer (word-boundary marker "▁"), Llama-like.
- `byte_level`: GPT-2 style byte-level BPE (marker "Ġ").
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and the early bird catches the worm",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "two plus three equals five; seven times six equals forty two",
    "hello world, hello fusion, hello merging of language models",
] * 20

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def sentencepiece_style(vocab_size: int = 200, texts=TRAIN_TEXT) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(texts)) - {" "})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def byte_level(vocab_size: int = 300, texts=TRAIN_TEXT) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def tiny_model(model_type: str, tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random tiny causal LM of `model_type` ("llama", "gpt2", "gpt_neox", "mpt", "gemma3_text": one
    sliding-window layer with a 4-token window, then one full-attention layer) sized to `tokenizer`."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if model_type == "llama":
        cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    elif model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    elif model_type == "gpt_neox":
        cfg = AutoConfig.for_model("gpt_neox", hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=512, **common)
    elif model_type == "mpt":
        cfg = AutoConfig.for_model("mpt", d_model=hidden, n_layers=layers, n_heads=4, max_seq_len=512, **common)
    elif model_type == "gemma3_text":
        cfg = AutoConfig.for_model("gemma3_text", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                   max_position_embeddings=512, **common)
    else:
        raise ValueError(f"unknown model_type {model_type!r}")
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def save_pair(model, tokenizer, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
