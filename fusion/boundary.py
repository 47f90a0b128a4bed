"""Boundary transfer: FuseLab's own alignment rule (not in the paper), for sources that split text differently.

The paper's rule uses a source distribution at target position t only when t is aligned one-to-one to a
source position s whose token maps to the target token. Where the tokenizations differ (runs of spaces and
newlines in code, merged words) that rule discards the source: a Llama target spells four spaces of
indentation as several pieces, a GPT-NeoX source as one "newline + spaces" token, so no position is one-to-one.

What matters for distillation is narrower: both models must be predicting the continuation of the same
prefix. Target position t predicts the token that starts at character c = start of target token t + 1; the
source position s whose next token s + 1 also starts at c predicts the continuation of the same text
("boundary" alignment). The source's candidates for token s + 1 then all start at c, and each is projected
onto the target token that spells the longest prefix of its text ("prefix" vocabulary map): the target's
first token of that continuation. Probabilities of candidates projected onto one target id add up, so the
row is the source's marginal over the target's next token (under a greedy longest-prefix tokenization of
each candidate, an approximation of what the target tokenizer would do).

Use both together: `fusion.alignment: boundary` and `fusion.vocab_map: prefix`. Positions without a shared
boundary fall back as in the paper's rule.
"""
from __future__ import annotations

import numpy as np

from .align import Alignment, _empty
from .registry import ALIGNMENTS, VOCAB_MAPS
from .tokens import TokenizedText
from .vocab import VocabMap


@ALIGNMENTS.register("boundary", accept="any")
def boundary_align(target: TokenizedText, source: TokenizedText) -> Alignment:
    """Pairs (t, s) where source token s + 1 starts at the same character as target token t + 1 (character
    offsets of two tokenizations of one text). A shared start is claimed by one source position only when
    exactly one source token starts there; several (byte tokens sharing one character) pair t with each, so
    the position is not one-to-one. The last target position predicts nothing and is left unpaired.

    The pairs need no token agreement (`Alignment.accept == "any"`): the two models predict the continuation
    of the same prefix even where the current tokens differ. Returns Alignment, pairs int32 [P, 2] sorted.
    """
    n, m = len(target.ids), len(source.ids)
    if target.n_bytes != source.n_bytes:
        raise ValueError(f"boundary_align: target and source tokenize different texts ({target.n_bytes} vs "
                         f"{source.n_bytes} utf-8 bytes); tokenize the same document with both tokenizers")
    if n < 2 or m < 2:
        return _empty(n, m, accept="any")
    target_next = np.asarray(target.offsets, dtype=np.int64)[1:, 0]   # start of token t + 1, t = 0 .. n-2
    source_next = np.asarray(source.offsets, dtype=np.int64)[1:, 0]   # start of token s + 1, s = 0 .. m-2
    order = np.argsort(source_next, kind="stable")
    starts = source_next[order]
    lo = np.searchsorted(starts, target_next, side="left")
    hi = np.searchsorted(starts, target_next, side="right")
    counts = hi - lo
    run_start = np.cumsum(counts) - counts                             # where target t's run of pairs begins
    t = np.repeat(np.arange(n - 1, dtype=np.int64), counts)
    s = order[np.repeat(lo, counts) + np.arange(len(t)) - np.repeat(run_start, counts)]
    pairs = np.stack([t, s], axis=1).astype(np.int32).reshape(-1, 2)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return Alignment(pairs=pairs, n_target=n, n_source=m, accept="any")


@VOCAB_MAPS.register("prefix")
def prefix_map(source_vocab: list[str], target_vocab: list[str]) -> VocabMap:
    """Each source text -> the target id whose text is the longest non-empty prefix of it (equal texts:
    the lowest id), else -1. source_vocab / target_vocab: texts indexed by id (`normalized_vocab`).
    Returns VocabMap(int32 [len(source_vocab)], "prefix")."""
    first: dict[str, int] = {}
    for idx in range(len(target_vocab) - 1, -1, -1):
        if target_vocab[idx]:
            first[target_vocab[idx]] = idx
    longest = max((len(text) for text in first), default=0)
    out = np.full(len(source_vocab), -1, dtype=np.int32)
    for i, text in enumerate(source_vocab):
        for length in range(min(len(text), longest), 0, -1):
            hit = first.get(text[:length])
            if hit is not None:
                out[i] = hit
                break
    return VocabMap(source_to_target=out, method="prefix")
