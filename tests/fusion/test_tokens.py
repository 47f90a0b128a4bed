"""Tokenizer conventions on the two tiny tokenizers (sentencepiece-style "▁" and byte-level "Ġ")."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fusion.tokens import (
    TokenizedText,
    _unicode_to_byte,
    detect_word_boundary,
    is_byte_level,
    normalized_vocab,
    raw_vocab,
    reference_vocab,
    require_fast_tokenizer,
    token_text,
    tokenize_document,
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A word-level tokenizer with a whitespace pre-tokenizer: no marker, not byte-level."""
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "[EOS]": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def test_detect_word_boundary_from_behaviour(sp_tokenizer, bpe_tokenizer, plain_tokenizer):
    # all three report the same class under transformers 5; only behaviour tells them apart
    assert type(sp_tokenizer).__name__ == type(bpe_tokenizer).__name__
    assert detect_word_boundary(sp_tokenizer) == "▁"
    assert detect_word_boundary(bpe_tokenizer) == "Ġ"
    assert detect_word_boundary(plain_tokenizer) == ""


def test_is_byte_level(sp_tokenizer, bpe_tokenizer, plain_tokenizer):
    assert is_byte_level(bpe_tokenizer) is True
    assert is_byte_level(sp_tokenizer) is False
    assert is_byte_level(plain_tokenizer) is False


def test_bytes_to_unicode_table_is_gpt2s():
    table = _unicode_to_byte()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["ĉ"] == 0x09 and table["Ā"] == 0x00
    assert table["a"] == ord("a") and table["Ã"] == 0xC3 and table["©"] == 0xA9


@pytest.mark.parametrize("token, marker, byte_level, expected", [
    ("▁the", "▁", False, " the"),
    ("▁▁", "▁", False, "  "),
    ("the", "▁", False, "the"),
    ("<0x0A>", "▁", False, "\n"),
    ("<0x41>", "▁", False, "A"),
    ("<0xC3>", "▁", False, "\udcc3"),        # a lone lead byte is not text: one escape code point per byte
    ("<0xA9>", "▁", False, "\udca9"),
    ("Ġthe", "Ġ", True, " the"),
    ("ĊĠĠĠ", "Ġ", True, "\n   "),
    ("Ã©", "Ġ", True, "é"),
    ("æĹ¥", "Ġ", True, "日"),
    ("Ã", "Ġ", True, "\udcc3"),              # first byte of "é" alone: the same text as "<0xC3>"
    ("ĠÎ", "Ġ", True, " \udcce"),            # space + first byte of "Ω" (0xCE 0xA9)
    ("©", "Ġ", True, "\udca9"),              # its second byte; not the character "©" (0xC2 0xA9)
    ("æĹ", "Ġ", True, "\udce6\udc97"),       # two of the three bytes of "日"
    ("<|endoftext|>", "Ġ", True, "<|endoftext|>"),
    ("##ing", "", False, "##ing"),
])
def test_token_text(token, marker, byte_level, expected):
    assert token_text(token, marker, byte_level) == expected


def test_byte_tokens_never_collapse_into_one_text():
    """All 128 bytes >= 0x80 as byte-level tokens: 128 distinct texts, each equal to its byte-fallback twin."""
    table = {byte: char for char, byte in _unicode_to_byte().items()}
    byte_level_texts = [token_text(table[b], "Ġ", True) for b in range(0x80, 0x100)]
    fallback_texts = [token_text(f"<0x{b:02X}>", "▁", False) for b in range(0x80, 0x100)]
    assert len(set(byte_level_texts)) == 128 and byte_level_texts == fallback_texts
    assert "\ufffd" not in "".join(byte_level_texts)
    # a whole character stays that character: "Î©" (0xCE 0xA9) is "Ω", distinct from its byte tokens
    assert token_text("Î©", "Ġ", True) == "Ω" and token_text("Î", "Ġ", True) + token_text("©", "Ġ", True) != "Ω"


def test_raw_and_reference_vocab(sp_tokenizer, bpe_tokenizer):
    raw = raw_vocab(bpe_tokenizer)
    assert len(raw) == len(bpe_tokenizer)
    assert raw == bpe_tokenizer.convert_ids_to_tokens(list(range(len(bpe_tokenizer))))
    newline, b = bpe_tokenizer.convert_tokens_to_ids("Ċ"), bpe_tokenizer.convert_tokens_to_ids("Ġb")
    # only the marker changes: "Ġb" -> "▁b"; "Ċ" stays the byte-alphabet character, specials stay as they are
    ref = reference_vocab(bpe_tokenizer, "▁")
    assert (ref[b], ref[newline], ref[0]) == ("▁b", "Ċ", "<|endoftext|>")
    assert reference_vocab(bpe_tokenizer, "Ġ") == raw  # same marker on both sides: nothing to replace
    sp_ref = reference_vocab(sp_tokenizer, "Ġ")
    assert sp_ref[sp_tokenizer.convert_tokens_to_ids("▁the")] == "Ġthe" and sp_ref[:3] == ["<unk>", "<s>", "</s>"]


def test_normalized_vocab(sp_tokenizer, bpe_tokenizer):
    sp_vocab = normalized_vocab(sp_tokenizer)
    bpe_vocab = normalized_vocab(bpe_tokenizer)
    assert len(sp_vocab) == len(sp_tokenizer) and len(bpe_vocab) == len(bpe_tokenizer)
    assert sp_vocab[sp_tokenizer.convert_tokens_to_ids("▁the")] == " the"
    assert bpe_vocab[bpe_tokenizer.convert_tokens_to_ids("Ġb")] == " b"
    assert bpe_vocab[bpe_tokenizer.convert_tokens_to_ids("Ċ")] == "\n"
    assert sp_vocab[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert bpe_vocab[:2] == ["<|endoftext|>", "<|pad|>"]


def test_require_fast_tokenizer(sp_tokenizer):
    require_fast_tokenizer(sp_tokenizer, "tiny-llama")

    class SlowTokenizer:  # the one attribute the check reads; transformers 5 ships no slow BPE to build
        is_fast = False

    with pytest.raises(ValueError, match=r"model 'org/slow-7b'.*fast tokenizer.*use_fast=True"):
        require_fast_tokenizer(SlowTokenizer(), "org/slow-7b")


def test_tokenize_document_byte_level(bpe_tokenizer):
    doc = tokenize_document(bpe_tokenizer, "a b\n")
    assert isinstance(doc, TokenizedText)
    assert doc.tokens == ["a", "Ġb", "Ċ", "<|endoftext|>"]
    assert doc.ids.dtype == np.int32 and doc.offsets.dtype == np.int64
    assert doc.ids.tolist() == bpe_tokenizer.convert_tokens_to_ids(doc.tokens)
    assert doc.ids[-1] == bpe_tokenizer.eos_token_id
    assert doc.offsets.tolist() == [[0, 1], [1, 3], [3, 4], [4, 4]]
    assert doc.marker == "Ġ" and doc.n_bytes == 4 and len(doc) == 4


def test_tokenize_document_sentencepiece(sp_tokenizer):
    doc = tokenize_document(sp_tokenizer, "the quick brown fox")
    assert doc.tokens == ["▁the", "▁quick", "▁brown", "▁fox", "</s>"]
    # the prepended "▁" of the first word covers no character: span (0, 3), not (0, 4)
    assert doc.offsets.tolist() == [[0, 3], [3, 9], [9, 15], [15, 19], [19, 19]]
    assert doc.marker == "▁" and doc.n_bytes == 19


def test_tokenize_document_multibyte_unicode(bpe_tokenizer, sp_tokenizer):
    text = "héllo 日本"
    doc = tokenize_document(bpe_tokenizer, text)
    assert doc.n_bytes == 13  # h 1 + é 2 + llo 3 + space 1 + 日 3 + 本 3
    assert doc.offsets[-1].tolist() == [8, 8]  # EOS at len(text) in characters, not bytes
    # the byte tokens of one character all carry that character's span
    assert doc.tokens[1:3] == ["Ã", "©"] and doc.offsets[1:3].tolist() == [[1, 2], [1, 2]]
    assert doc.tokens[-7:-1] == ["æ", "Ĺ", "¥", "æ", "ľ", "¬"]
    assert doc.offsets[-7:-1].tolist() == [[6, 7]] * 3 + [[7, 8]] * 3
    # the raw tokens spell exactly the text's utf-8 bytes
    table = _unicode_to_byte()
    spelled = bytes(table[c] for token in doc.tokens[:-1] for c in token)
    assert spelled.decode("utf-8") == text
    sp_doc = tokenize_document(sp_tokenizer, text)
    assert sp_doc.n_bytes == 13 and sp_doc.offsets[-1].tolist() == [8, 8]


def test_tokenize_document_bos_and_no_eos(sp_tokenizer, plain_tokenizer):
    doc = tokenize_document(sp_tokenizer, "hello world", add_bos=True, add_eos=False)
    assert doc.tokens == ["<s>", "▁hello", "▁wor", "l", "d"]
    assert doc.ids[0] == sp_tokenizer.bos_token_id
    assert doc.offsets.tolist() == [[0, 0], [0, 5], [5, 9], [9, 10], [10, 11]]
    with pytest.raises(ValueError, match=r"no bos token.*add_bos=False"):
        tokenize_document(plain_tokenizer, "a b", add_bos=True)


def test_tokenize_document_empty_text(bpe_tokenizer):
    doc = tokenize_document(bpe_tokenizer, "")
    assert doc.tokens == ["<|endoftext|>"] and doc.offsets.tolist() == [[0, 0]] and doc.n_bytes == 0
