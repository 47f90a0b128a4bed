"""Vocabulary mapping between tokenizers: exact match (EM) and minimum edit distance (MinED).

`em_map` / `mined_map` map lists of token texts; `build_vocab_map` builds the texts from two tokenizers in
one of two ways (`text`):
- "normalized" (default): the text each token stands for (`fusion.tokens.normalized_vocab`: marker -> space,
  byte-level alphabet -> real text, byte tokens compared as bytes), so "▁the" (sentencepiece) and "Ġthe"
  (byte-level) are both " the", byte-level "Ċ" and sentencepiece "<0x0A>" are both "\n". When both tokenizers
  share a convention, a token that exists verbatim in the target vocabulary maps to that very token first.
- "reference": the reference FuseLLM's raw token strings, the source's marker replaced by the target's and
  nothing else (`fusion.tokens.reference_vocab`): "ĊĠĠ" stays "ĊĠĠ" and matches no "▁" target token.

Special tokens (`special_tokens`): "role" (default) maps a source special token to the target special token
of the same role (eos, bos, unk, pad), else to a target special token with the same text, else to -1, and
maps ordinary tokens among ordinary tokens only: an edit distance to "</s>" means nothing, and letting "<s>"
attract short ordinary tokens under MinED would inject special tokens into fused distributions. "string"
(the reference) treats every token, special or not, as one more string of one vocabulary.

Ids without a token (gaps in a hand-edited vocabulary) map to -1 and are never a target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from .registry import VOCAB_MAPS
from .tokens import detect_word_boundary, is_byte_level, normalized_vocab, raw_vocab, reference_vocab

# Rows of the MinED distance matrix computed at once: 512 x 50k int32 is 100 MB.
_MINED_CHUNK_BYTES = 100 * 2**20
_SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id")
VOCAB_TEXTS = ("normalized", "reference")
SPECIAL_TOKENS = ("role", "string")


@dataclass(frozen=True)
class VocabMap:
    """source_to_target: int32 [source_vocab_size], target id or -1 (unmapped); method: "em" | "mined".

    prefixed_to_target: int32 [source_vocab_size] or None: where each source token maps once a word-boundary
    marker is prepended to it (the reference's position-0 rule, `fusion.aligned.align_distribution`
    `position0="prepend_marker"`); built by `build_vocab_map`.
    """

    source_to_target: np.ndarray
    method: str
    prefixed_to_target: np.ndarray | None = None


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
    as the scan would give). The rest go through rapidfuzz's native `cdist` in length bands: a target
    whose length differs from the source's by more than `band` is at distance > `band`, so when the
    best distance within the band is <= `band` it is the global minimum, and `argmin` over the band's
    columns (ascending ids) returns the lowest target id among the equals, exactly what a full scan gives.
    Rows not settled are retried with the band doubled, up to the whole vocabulary (most tokens settle at
    band 1 or 2 against a fraction of the target vocabulary). `workers`: threads for cdist (-1 = all cores).
    Returns VocabMap(source_to_target int32 [source_vocab_size], "mined"); -1 only when the target
    vocabulary is empty.
    """
    n_source = len(source_vocab)
    if not target_vocab:
        return VocabMap(source_to_target=np.full(n_source, -1, dtype=np.int32), method="mined")
    mapped = em_map(source_vocab, target_vocab).source_to_target.copy()
    todo = np.flatnonzero(mapped < 0)
    if not len(todo):
        return VocabMap(source_to_target=mapped, method="mined")
    target_len = np.fromiter(map(len, target_vocab), dtype=np.int64, count=len(target_vocab))
    source_len = np.fromiter((len(source_vocab[i]) for i in todo), dtype=np.int64, count=len(todo))
    for length in np.unique(source_len):
        rows = todo[source_len == length]
        band = 1
        while len(rows):
            cols = np.flatnonzero(np.abs(target_len - length) <= band)
            whole = len(cols) == len(target_vocab)
            if len(cols):
                best = _banded_argmin([source_vocab[i] for i in rows], [target_vocab[c] for c in cols],
                                      None if whole else band, workers)
                settled = best >= 0
                mapped[rows[settled]] = cols[best[settled]]
                rows = rows[~settled]
            band *= 2
    return VocabMap(source_to_target=mapped, method="mined")


def _banded_argmin(sources: list[str], targets: list[str], cutoff: int | None, workers: int) -> np.ndarray:
    """int64 [len(sources)]: per source, the index of the first target at minimum Levenshtein distance
    when that minimum is <= cutoff (any minimum when cutoff is None), else -1. Row chunks of
    `_MINED_CHUNK_BYTES` of int32 distances."""
    out = np.full(len(sources), -1, dtype=np.int64)
    chunk = max(1, _MINED_CHUNK_BYTES // (4 * len(targets)))
    for start in range(0, len(sources), chunk):
        # with a cutoff rapidfuzz reports any distance above it as cutoff + 1 (and stops early)
        distances = cdist(sources[start:start + chunk], targets, scorer=Levenshtein.distance, dtype=np.int32,
                          workers=workers, score_cutoff=cutoff)
        best = np.argmin(distances, axis=1)
        if cutoff is not None:
            best[distances[np.arange(len(best)), best] > cutoff] = -1
        out[start:start + chunk] = best
    return out


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(idx))
    return ids


def _present_ids(tokenizer) -> np.ndarray:
    """bool [len(tokenizer)]: the ids that are tokens (gaps in a hand-edited vocabulary are not)."""
    size = len(tokenizer)  # not in the loop: len() of a transformers tokenizer is far from free
    present = np.zeros(size, dtype=bool)
    ids = np.fromiter((i for i in tokenizer.get_vocab().values() if 0 <= i < size), dtype=np.int64)
    present[ids] = True
    return present


def _same_convention(source_tokenizer, target_tokenizer) -> bool:
    return (detect_word_boundary(source_tokenizer) == detect_word_boundary(target_tokenizer)
            and is_byte_level(source_tokenizer) == is_byte_level(target_tokenizer))


def build_vocab_map(method: str, source_tokenizer, target_tokenizer, text: str = "normalized",
                    special_tokens: str = "role") -> VocabMap:
    """Map every source token id to a target token id with the registered `method` ("em" | "mined").

    text: "normalized" (texts the tokens stand for; verbatim tokens first when both tokenizers share a
    convention) or "reference" (raw strings, source marker -> target marker); special_tokens: "role" or
    "string" (see the module docstring). Ids keep their original numbering inside the pools, so "lowest id"
    ties still mean the lowest target id.
    Returns VocabMap(source_to_target int32 [len(source_tokenizer)], method, prefixed_to_target int32
    [len(source_tokenizer)]): prefixed_to_target[s] is, for a source token s with the word-boundary marker
    put in front of it (a space in "normalized" texts, the target's marker in "reference" ones), the mapping
    of the source token spelled that way when the source vocabulary has one, else the target token with
    exactly that text, else -1 (special tokens under "role": their ordinary mapping).
    """
    if text not in VOCAB_TEXTS:
        raise ValueError(f"vocab map text must be one of {VOCAB_TEXTS}, got {text!r}")
    if special_tokens not in SPECIAL_TOKENS:
        raise ValueError(f"vocab map special_tokens must be one of {SPECIAL_TOKENS}, got {special_tokens!r}")
    mapper = VOCAB_MAPS.get(method)
    if text == "normalized":
        source_vocab = normalized_vocab(source_tokenizer)
        target_vocab = normalized_vocab(target_tokenizer)
        prefix = " "
    else:
        prefix = detect_word_boundary(target_tokenizer)
        source_vocab = reference_vocab(source_tokenizer, prefix)
        target_vocab = raw_vocab(target_tokenizer)
    n_source = len(source_vocab)
    source_present, target_present = _present_ids(source_tokenizer), _present_ids(target_tokenizer)
    source_special, target_special = _special_ids(source_tokenizer), _special_ids(target_tokenizer)
    if special_tokens == "string":
        source_special, target_special = set(), set()
    source_pool = np.array([i for i in range(n_source) if source_present[i] and i not in source_special],
                           dtype=np.int64)
    target_pool = np.array([i for i in range(len(target_vocab)) if target_present[i] and i not in target_special],
                           dtype=np.int64)
    mapped = np.full(n_source, -1, dtype=np.int32)

    todo = source_pool
    if text == "normalized" and _same_convention(source_tokenizer, target_tokenizer):
        # A token spelled identically in both vocabularies of one convention is the same token: it maps to
        # itself even where normalised texts collide (sentencepiece "▁" and "<0x20>" are both " ").
        source_raw, target_raw = raw_vocab(source_tokenizer), raw_vocab(target_tokenizer)
        verbatim = _first_id_by_text([target_raw[i] for i in target_pool])
        hits = np.array([verbatim.get(source_raw[i], -1) for i in source_pool], dtype=np.int64)
        found = hits >= 0
        mapped[source_pool[found]] = target_pool[hits[found]]
        todo = source_pool[~found]
    if len(target_pool):
        pool_map = mapper([source_vocab[i] for i in todo], [target_vocab[i] for i in target_pool])
        hit = pool_map.source_to_target >= 0
        # target_pool is ascending, so "lowest index in the sub-list" is still "lowest target id".
        mapped[todo[hit]] = target_pool[pool_map.source_to_target[hit]]

    if special_tokens == "role":
        special_by_text = _first_id_by_text([target_vocab[i] if i in target_special else "\0not-special"
                                             for i in range(len(target_vocab))])
        special_by_text.pop("\0not-special", None)
        for idx in sorted(source_special):
            if idx >= n_source:
                continue
            target_id = special_by_text.get(source_vocab[idx], -1)
            for role in _SPECIAL_ROLES:
                source_role = getattr(source_tokenizer, role, None)
                target_role = getattr(target_tokenizer, role, None)
                if source_role == idx and target_role is not None:
                    target_id = int(target_role)
                    break
            mapped[idx] = target_id

    prefixed = mapped.copy()
    if prefix:
        in_source_pool = np.zeros(n_source, dtype=bool)
        in_source_pool[source_pool] = True
        in_target_pool = np.zeros(len(target_vocab), dtype=bool)
        in_target_pool[target_pool] = True
        source_by_text = _first_id_by_text([t if keep else "" for t, keep in zip(source_vocab, in_source_pool)])
        target_by_text = _first_id_by_text([t if keep else "" for t, keep in zip(target_vocab, in_target_pool)])
        # "" is never a prefixed text, so the placeholders of ids outside the pools cannot be hit
        for idx in source_pool:
            spelled = prefix + source_vocab[idx]
            same = source_by_text.get(spelled)
            prefixed[idx] = mapped[same] if same is not None else target_by_text.get(spelled, -1)
    return VocabMap(source_to_target=mapped, method=method, prefixed_to_target=prefixed)
