"""Vocabulary mapping between tokenizers: exact match (EM) and minimum edit distance (MinED).

Both maps work on normalised token texts (`fusion.tokens.normalized_vocab`: marker -> space, byte-level
alphabet -> real text), so "▁the" (sentencepiece) and "Ġthe" (byte-level) are both " the" and match.

Special tokens (`build_vocab_map`): a source special token maps to the target special token of the same
role (eos, bos, unk, pad), else to a target special token with the same text, else to -1. Ordinary
tokens are mapped among ordinary tokens only: an edit distance to "</s>" means nothing, and letting
"<s>" attract short ordinary tokens under MinED would inject special tokens into fused distributions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from .registry import VOCAB_MAPS
from .tokens import normalized_vocab

# Rows of the MinED distance matrix computed at once: 512 x 50k int32 is 100 MB.
_MINED_CHUNK_BYTES = 100 * 2**20
_SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id")


@dataclass(frozen=True)
class VocabMap:
    """source_to_target: int32 [source_vocab_size], target id or -1 (unmapped); method: "em" | "mined"."""

    source_to_target: np.ndarray
    method: str


def _first_id_by_text(target_vocab: list[str]) -> dict[str, int]:
    """text -> lowest target id with that text (iterating backwards lets lower ids overwrite)."""
    first: dict[str, int] = {}
    for idx in range(len(target_vocab) - 1, -1, -1):
        first[target_vocab[idx]] = idx
    return first


@VOCAB_MAPS.register("em")
def em_map(source_vocab: list[str], target_vocab: list[str]) -> VocabMap:
    """Exact match on normalised text: source id -> lowest target id with the same text, else -1.

    source_vocab: [source_vocab_size] texts indexed by source id; target_vocab likewise.
    Returns VocabMap(source_to_target int32 [source_vocab_size], "em").
    """
    first = _first_id_by_text(target_vocab)
    mapped = np.fromiter((first.get(text, -1) for text in source_vocab), dtype=np.int32, count=len(source_vocab))
    return VocabMap(source_to_target=mapped, method="em")


@VOCAB_MAPS.register("mined")
def mined_map(source_vocab: list[str], target_vocab: list[str], workers: int = -1) -> VocabMap:
    """Minimum edit distance: every source id -> the target id whose text has the least Levenshtein
    distance (unit insert/delete/substitute on code points) to the source text; ties -> lowest target id.

    Exact matches are resolved by a hash lookup (distance 0 is the minimum and the lowest equal id wins,
    as the scan would give); the rest go through rapidfuzz's native `cdist` in row chunks, whose
    `argmin` returns the first, i.e. lowest, target id among equal distances. `workers`: threads for
    cdist (-1 = all cores). Returns VocabMap(source_to_target int32 [source_vocab_size], "mined");
    -1 only when the target vocabulary is empty.
    """
    n_source = len(source_vocab)
    if not target_vocab:
        return VocabMap(source_to_target=np.full(n_source, -1, dtype=np.int32), method="mined")
    mapped = em_map(source_vocab, target_vocab).source_to_target.copy()
    todo = np.flatnonzero(mapped < 0)
    chunk = max(1, _MINED_CHUNK_BYTES // (4 * len(target_vocab)))
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        distances = cdist([source_vocab[i] for i in rows], target_vocab, scorer=Levenshtein.distance,
                          dtype=np.int32, workers=workers)
        mapped[rows] = np.argmin(distances, axis=1)
    return VocabMap(source_to_target=mapped, method="mined")


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(idx))
    return ids


def build_vocab_map(method: str, source_tokenizer, target_tokenizer) -> VocabMap:
    """Map every source token id to a target token id with the registered `method` ("em" | "mined").

    Both vocabularies are normalised with `normalized_vocab`. Ordinary tokens are mapped onto ordinary
    target tokens only (ids keep their original numbering, so "lowest id" ties still mean the lowest
    target id); special tokens map by role (eos->eos, bos->bos, unk->unk, pad->pad), else by identical
    text among target specials, else -1. Returns VocabMap(int32 [len(source_tokenizer)], method).
    """
    mapper = VOCAB_MAPS.get(method)
    source_vocab = normalized_vocab(source_tokenizer)
    target_vocab = normalized_vocab(target_tokenizer)
    source_special = _special_ids(source_tokenizer)
    target_special = _special_ids(target_tokenizer)

    source_plain = np.array([i for i in range(len(source_vocab)) if i not in source_special], dtype=np.int64)
    target_plain = np.array([i for i in range(len(target_vocab)) if i not in target_special], dtype=np.int64)
    plain_map = mapper([source_vocab[i] for i in source_plain], [target_vocab[i] for i in target_plain])
    mapped = np.full(len(source_vocab), -1, dtype=np.int32)
    hit = plain_map.source_to_target >= 0
    # target_plain is ascending, so "lowest index in the sub-list" is still "lowest target id".
    mapped[source_plain[hit]] = target_plain[plain_map.source_to_target[hit]]

    special_by_text = _first_id_by_text([target_vocab[i] if i in target_special else "\0not-special"
                                         for i in range(len(target_vocab))])
    special_by_text.pop("\0not-special", None)
    for idx in sorted(source_special):
        if idx >= len(source_vocab):
            continue
        target_id = special_by_text.get(source_vocab[idx], -1)
        for role in _SPECIAL_ROLES:
            source_role = getattr(source_tokenizer, role, None)
            target_role = getattr(target_tokenizer, role, None)
            if source_role == idx and target_role is not None:
                target_id = int(target_role)
                break
        mapped[idx] = target_id
    return VocabMap(source_to_target=mapped, method=plain_map.method)
