"""Tokenizers of the micro world, trained with the `tokenizers` library on each source's own training mix.

Two conventions, as in the paper's model pool:
- ``"sentencepiece"``: BPE behind a Metaspace pre-tokenizer (word-boundary marker "▁"), Llama-like.
  Specials ``<unk> <s> </s> <pad>``; eos ``</s>``, pad ``<pad>``.
- ``"byte_level"``: GPT-2 style byte-level BPE (marker "Ġ"). Specials ``<|endoftext|> <|pad|>``;
  bos = eos = ``<|endoftext|>``, pad ``<|pad|>``.
Both seed their alphabet with every character of `corpus.ALPHABET`, so no micro-world text maps to ``<unk>``.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import ALPHABET

TOKENIZER_KINDS = ("sentencepiece", "byte_level")


def train_tokenizer(kind: str, vocab_size: int, texts: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a `kind` tokenizer with exactly `vocab_size` entries (specials included) on `texts`.

    `model_max_length` is the context length in tokens the model is trained with.
    """
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        special = ["<unk>", "<s>", "</s>", "<pad>"]
        alphabet = sorted(set(ALPHABET) - {" "} | {"▁"})
        names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    elif kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        special = ["<|endoftext|>", "<|pad|>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        names = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    if vocab_size <= len(special) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges in a {kind!r} tokenizer "
                         f"({len(special)} specials + {len(alphabet)} alphabet); use a larger vocab_size")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"{kind!r} tokenizer trained to {tok.get_vocab_size()} entries, not {vocab_size}: "
                           "the training texts are too small for that many merges; lower vocab_size")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **names)
