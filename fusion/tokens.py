"""Tokenizer conventions: word-boundary markers, byte-level alphabets, document tokenization.

Two conventions matter for FuseLLM's pools:
- sentencepiece / Metaspace ("▁" stands for a space, rare bytes as "<0xNN>" byte-fallback tokens), Llama-like;
- byte-level BPE (GPT-2's bytes-to-unicode alphabet, so a space byte shows as "Ġ"), GPT-2/NeoX/MPT-like.

transformers 5 reports every fast tokenizer as `TokenizersBackend`, so the convention is detected from
behaviour (what the tokenizer does to " a" and "a b") and from the backend's JSON, never from the class.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WORD_BOUNDARY_MARKERS = ("▁", "Ġ")

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenizedText:
    """One document as one tokenizer sees it.

    ids: int32 [n]; tokens: raw token strings (with the tokenizer's marker), length n;
    offsets: int64 [n, 2] character spans in the text (EOS gets (len(text), len(text)));
    marker: the word-boundary marker ("▁", "Ġ" or ""); n_bytes: utf-8 bytes of the text.
    """

    ids: np.ndarray
    tokens: list[str]
    offsets: np.ndarray
    marker: str
    n_bytes: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 bytes
    are shifted to code points 256.. in byte order (so 0x20 -> "Ġ", 0x0A -> "Ċ")."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    try:
        return json.loads(backend.to_str())
    except Exception:  # a backend that cannot serialise itself just gives no structural hints
        return {}


def _component_types(node) -> set[str]:
    """All "type" names inside a pre_tokenizer/normalizer/decoder JSON node (Sequence nodes nest)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _component_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _component_types(value)
    return found


def _probe_tokens(tokenizer) -> list[str]:
    tokens: list[str] = []
    for probe in (" a", "a b"):
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        tokens += tokenizer.convert_ids_to_tokens(ids)
    return tokens


def detect_word_boundary(tokenizer) -> str:
    """The tokenizer's word-boundary marker: "▁" (sentencepiece/Metaspace), "Ġ" (byte-level BPE) or "".

    Decided by behaviour: the token strings of " a" and "a b" carry the marker where one exists.
    When the probe is inconclusive (e.g. the marker piece is out of a tiny vocabulary and became <unk>),
    the backend's pre-tokenizer/normalizer/decoder JSON decides (Metaspace or a "▁" replacement -> "▁",
    ByteLevel -> "Ġ").
    """
    tokens = "".join(_probe_tokens(tokenizer))
    for marker in WORD_BOUNDARY_MARKERS:
        if marker in tokens:
            return marker
    spec = _backend_json(tokenizer)
    parts = [spec.get(key) for key in ("pre_tokenizer", "normalizer", "decoder")]
    types = _component_types(parts)
    if "Metaspace" in types or "▁" in json.dumps(parts, ensure_ascii=False):
        return "▁"
    if "ByteLevel" in types:
        return "Ġ"
    return ""


def is_byte_level(tokenizer) -> bool:
    """True for byte-level BPE (tokens spelled in GPT-2's bytes_to_unicode alphabet).

    Structural check first (a ByteLevel pre-tokenizer or decoder in the backend JSON); without a
    backend, behaviour: a newline byte comes out as "Ċ", which only that alphabet produces.
    """
    spec = _backend_json(tokenizer)
    if spec:
        return "ByteLevel" in _component_types([spec.get("pre_tokenizer"), spec.get("decoder")])
    ids = tokenizer("a\nb", add_special_tokens=False)["input_ids"]
    return any("Ċ" in token for token in tokenizer.convert_ids_to_tokens(ids))


def token_text(token: str, marker: str, byte_level: bool) -> str:
    """The text a token stands for: the marker becomes a space; byte-level tokens are mapped back
    through GPT-2's bytes_to_unicode table and decoded as utf-8; sentencepiece byte-fallback tokens
    ("<0x0A>") become that byte's character.

    Bytes that are not (complete) utf-8, e.g. a token holding the first byte of a multi-byte character,
    decode with errors="surrogateescape": byte 0xNN becomes the lone surrogate U+DCNN, one code point per
    byte. So two byte tokens have equal texts exactly when they stand for the same bytes (byte-level "Ã"
    and byte-fallback "<0xC3>" are both "\\udcc3"), and no byte token ever equals a real character or
    collapses with other byte tokens into one replacement character.
    """
    if byte_level:
        table = _unicode_to_byte()
        raw = bytearray()
        for char in token:
            byte = table.get(char)
            if byte is None:
                # Characters outside the alphabet only occur in hand-added tokens: keep their own text.
                raw += char.encode("utf-8")
            else:
                raw.append(byte)
        return raw.decode("utf-8", errors="surrogateescape")
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback:
        return bytes([int(fallback.group(1), 16)]).decode("utf-8", errors="surrogateescape")
    return token.replace(marker, " ") if marker else token


def _added_contents(tokenizer) -> dict[int, str]:
    return {int(i): tok.content for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}


def normalized_vocab(tokenizer) -> list[str]:
    """Index = token id (0 .. len(tokenizer)-1), value = token_text of that token.

    Added tokens (specials such as "</s>", "<|endoftext|>", user-added tokens) keep their content
    verbatim: their text was never spelled in the byte alphabet or with the marker. Ids without a token
    (gaps in a hand-edited vocab) get "".
    """
    marker = detect_word_boundary(tokenizer)
    byte_level = is_byte_level(tokenizer)
    added = _added_contents(tokenizer)
    size = len(tokenizer)
    vocab = [""] * size
    for token, idx in tokenizer.get_vocab().items():
        if 0 <= idx < size:
            vocab[idx] = added[idx] if idx in added else token_text(token, marker, byte_level)
    return vocab


def raw_vocab(tokenizer) -> list[str]:
    """Index = token id (0 .. len(tokenizer)-1), value = the token string exactly as the tokenizer spells it
    (with its marker, byte-level alphabet, "<0xNN>" byte-fallback pieces; added tokens by their content),
    i.e. `convert_ids_to_tokens` for every id. Ids without a token get "".
    """
    size = len(tokenizer)
    vocab = [""] * size
    for token, idx in tokenizer.get_vocab().items():
        if 0 <= idx < size:
            vocab[idx] = token
    for idx, content in _added_contents(tokenizer).items():
        if 0 <= idx < size:
            vocab[idx] = content
    return vocab


def reference_vocab(tokenizer, target_marker: str) -> list[str]:
    """The reference FuseLLM's token strings: `raw_vocab` with this tokenizer's word-boundary marker replaced
    by `target_marker` wherever it occurs (for a Llama target and a GPT-NeoX/MPT source: "Ġ" -> "▁"), and
    nothing else changed: byte-level "Ċ" stays "Ċ", "<0x0A>" stays "<0x0A>". Without a marker on either
    side (or the same marker on both) the raw strings are returned.
    """
    marker = detect_word_boundary(tokenizer)
    vocab = raw_vocab(tokenizer)
    if not marker or not target_marker or marker == target_marker:
        return vocab
    return [text.replace(marker, target_marker) for text in vocab]


def require_fast_tokenizer(tokenizer, name: str) -> None:
    """Raise ValueError naming `name` when `tokenizer` is not a fast (Rust `tokenizers`) tokenizer:
    character offsets (`return_offsets_mapping`) exist only there."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"model {name!r}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; FuseLab needs "
            "character offsets (return_offsets_mapping), which only fast tokenizers give. Load it with "
            "use_fast=True or ship a tokenizer.json next to the model."
        )


def tokenize_document(tokenizer, text: str, add_bos: bool = False, add_eos: bool = True) -> TokenizedText:
    """Tokenize one document the reference FuseLLM way (no BOS, EOS appended, by default).

    Returns TokenizedText with ids int32 [n], raw tokens, offsets int64 [n, 2] (character spans into
    `text`; BOS gets (0, 0), EOS gets (len(text), len(text))), the marker and n_bytes (utf-8 bytes of
    `text`). The tokenizer's own special-token template is not applied: BOS/EOS come only from the flags.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    require_fast_tokenizer(tokenizer, name)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    for flag, attr in ((add_bos, "bos_token_id"), (add_eos, "eos_token_id")):
        if flag and getattr(tokenizer, attr, None) is None:
            raise ValueError(f"model {name!r}: tokenizer has no {attr.split('_')[0]} token but "
                             f"tokenize_document(add_{attr.split('_')[0]}=True) was asked for; set "
                             f"tokenizer.{attr.replace('_id', '')} or pass add_{attr.split('_')[0]}=False")
    if add_bos:
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
    return TokenizedText(
        ids=np.asarray(ids, dtype=np.int32),
        tokens=list(tokenizer.convert_ids_to_tokens(ids)),
        offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
        marker=detect_word_boundary(tokenizer),
        n_bytes=len(text.encode("utf-8")),
    )
