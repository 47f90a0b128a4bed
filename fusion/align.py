"""Sequence alignment: which source positions belong to each target position.

Two strategies, registered in `ALIGNMENTS`:
- "dtw": the reference FuseLLM dynamic time warping over token strings (cost = Levenshtein distance
  after removing the word-boundary markers, traceback ties diagonal > source back > target back). Quadratic per document;
  here the cost matrix is one native `rapidfuzz.process.cdist` over the distinct token strings and the
  recurrence runs vectorised along anti-diagonals, so it gives the reference path at native speed.
- "offsets": both tokenizations cover the same characters, so fast tokenizers' character spans give the
  correspondence directly: target position t pairs with every source position whose span overlaps t's.
  Linear time (two `np.searchsorted` calls), no Python loop over tokens.

Index convention (as the reference): i / target_pos indexes the TARGET ("base") sequence, j / source_pos
the SOURCE ("blending") sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from .registry import ALIGNMENTS
from .tokens import TokenizedText


@dataclass(frozen=True)
class Alignment:
    """pairs: int32 [P, 2], columns (target_pos, source_pos), sorted by target then source.

    accept: what a one-to-one pair needs before the source's distribution is used there: "token_match" (the
    paper: the source token maps to the target token) or "any" (the pair itself says both models predict the
    same continuation, as `fusion.boundary` pairs do)."""

    pairs: np.ndarray
    n_target: int
    n_source: int
    accept: str = "token_match"

    def one_to_one(self) -> np.ndarray:
        """int32 [n_target]: the source position when target position t is aligned to exactly one
        source position (the reference rule), else -1."""
        out = np.full(self.n_target, -1, dtype=np.int32)
        if len(self.pairs) == 0:
            return out
        t = self.pairs[:, 0]
        counts = np.bincount(t, minlength=self.n_target)
        single = counts[t] == 1
        out[t[single]] = self.pairs[single, 1]
        return out


def _empty(n_target: int, n_source: int, accept: str = "token_match") -> Alignment:
    return Alignment(pairs=np.zeros((0, 2), dtype=np.int32), n_target=n_target, n_source=n_source, accept=accept)


def _factorize(strings: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct strings in first-seen order, int64 [len(strings)] index of each into them)."""
    index: dict[str, int] = {}
    codes = [index.setdefault(text, len(index)) for text in strings]
    return list(index), np.asarray(codes, dtype=np.int64)


def _accumulate(row_tokens: list[str], col_tokens: list[str]) -> np.ndarray:
    """Accumulated DTW cost D [len(row_tokens), len(col_tokens)] (integers; D[-1, -1] = 0, other borders
    infinite): D[i, j] = cost(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]), cost = Levenshtein distance.

    Row by row without a Python loop over columns: with E[j] = cost(i, j) + min(D[i-1, j], D[i-1, j-1])
    and P[j] = cost(i, 0) + ... + cost(i, j), unrolling the left moves gives
    D[i, j] = min over l <= j of (E[l] + P[j] - P[l]) = P[j] + prefix-min(E - P)[j]: one
    `np.minimum.accumulate` per row, exact in integer arithmetic. Documents repeat tokens a lot (a
    2k-token text has ~700 distinct ones), so distances, P and cost - P are computed once per distinct
    row string and rows are looked up.
    """
    row_unique, row_codes = _factorize(row_tokens)
    col_unique, col_codes = _factorize(col_tokens)
    distinct = cdist(row_unique, col_unique, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    # np.take keeps rows C-contiguous (distinct[:, codes] comes back Fortran-ordered, making every
    # row read below strided and the cumsum ~5x slower)
    cost = np.take(distinct, col_codes, axis=1)         # [distinct rows, m]
    worst = int(cost.max(initial=0)) * (len(row_tokens) + len(col_tokens))
    dtype = np.int32 if worst < 2**31 - 1 else np.int64
    cost = cost.astype(dtype, copy=False)
    prefix = np.cumsum(cost, axis=1, dtype=dtype)       # P per distinct row string
    cost_minus_prefix = cost - prefix
    n, m = len(row_tokens), len(col_tokens)
    acc = np.empty((n, m), dtype=dtype)
    acc[0] = prefix[row_codes[0]]                       # first row: only left moves from D[0, 0]
    work = np.empty(m, dtype=dtype)
    for i in range(1, n):
        above = acc[i - 1]
        code = row_codes[i]
        work[0] = above[0]                              # D[i-1, -1] is infinite: only "up" at j = 0
        np.minimum(above[1:], above[:-1], out=work[1:])
        np.add(work, cost_minus_prefix[code], out=work)
        np.minimum.accumulate(work, out=work)
        np.add(work, prefix[code], out=acc[i])
    return acc


def _traceback(acc: np.ndarray) -> np.ndarray:
    """The reference path from (n-1, m-1) back to (0, 0) over D = acc [n target, m source]: at each step the
    cheapest of diagonal, source back (j-1), target back (i-1) (a move off the matrix is infinite), ties broken
    in that order.

    The reference calls `dtw(source_tokens, target_tokens)`, so its matrix rows are source positions and its
    "up" step moves back in the source: in this [target, source] orientation that is the left step. Tie
    order matters: equal-cost paths pair different positions one-to-one.
    Returns int32 [P, 2] (i, j) in path order."""
    n, m = acc.shape
    inf = float("inf")
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        else:
            diag = inf
            up = acc[i - 1, j] if i > 0 else inf
            left = acc[i, j - 1] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        path.append((i, j))
    return np.asarray(path[::-1], dtype=np.int32)


def dtw_tokens(target_tokens: list[str], source_tokens: list[str], target_marker: str,
               source_marker: str) -> Alignment:
    """Reference FuseLLM DTW between two token-string sequences.

    cost(i, j) = Levenshtein distance between target_tokens[i] with target_marker removed and
    source_tokens[j] with source_marker removed (raw token strings otherwise, as the reference);
    D[i, j] = cost(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]), D[-1, -1] = 0, other borders infinite;
    traceback from (n-1, m-1) choosing the cheapest of diagonal, source back (j-1), target back (i-1), ties in
    that order (the reference's argmin over (diagonal, up, left) in its [source, target] matrix).
    Returns Alignment with pairs int32 [P, 2] = the path (n + m - 1 >= P >= max(n, m)), sorted.
    """
    n, m = len(target_tokens), len(source_tokens)
    if n == 0 or m == 0:
        return _empty(n, m)
    target = [t.replace(target_marker, "") for t in target_tokens] if target_marker else list(target_tokens)
    source = [s.replace(source_marker, "") for s in source_tokens] if source_marker else list(source_tokens)
    # D is symmetric in its two sequences, so run the row loop over the shorter one (fewer numpy calls)
    acc = _accumulate(target, source) if n <= m else _accumulate(source, target).T
    return Alignment(pairs=_traceback(acc), n_target=n, n_source=m)


@ALIGNMENTS.register("dtw", reference=True)
def dtw_align(target: TokenizedText, source: TokenizedText) -> Alignment:
    """DTW alignment of two tokenizations of the same text (see `dtw_tokens`); offsets are ignored."""
    return dtw_tokens(target.tokens, source.tokens, target.marker, source.marker)


def _point_spans(offsets: np.ndarray) -> np.ndarray:
    """int64 [2, n]: rows (starts, ends) of half-open spans in doubled coordinates: [s, e) -> [2s, 2e),
    a zero-width span at p -> [2p, 2p + 1).

    Ordinary overlap of the doubled spans then means: two tokens share a character; a zero-width token
    at p (BOS at 0, EOS at len(text), a trimmed marker-only token) overlaps the token covering character
    p and any zero-width token at p. So EOS pairs with EOS, and never with the last real token.
    """
    spans = np.multiply(np.asarray(offsets, dtype=np.int64).T, 2, order="C")  # contiguous rows for searchsorted
    np.maximum(spans[1], spans[0] + 1, out=spans[1])
    return spans


@ALIGNMENTS.register("offsets")
def offsets_align(target: TokenizedText, source: TokenizedText) -> Alignment:
    """Character-offset alignment: target position t pairs with every source position whose character
    span overlaps t's span (zero-width spans: see `_point_spans`; EOS (len, len) pairs with EOS).

    Both offsets arrays are int64 [n, 2] character spans into the same text. Linear time: with source
    starts and ends non-decreasing (true for real tokenizers, including several byte tokens sharing one
    character's span) the overlapping sources of t are the contiguous range
    [#sources ending at or before t's start, #sources starting before t's end). A non-monotone source
    falls back to a chunked dense comparison. Returns Alignment, pairs int32 [P, 2] sorted.
    """
    n, m = len(target.ids), len(source.ids)
    if target.n_bytes != source.n_bytes:
        raise ValueError(f"offsets_align: target and source tokenize different texts ({target.n_bytes} vs "
                         f"{source.n_bytes} utf-8 bytes); character offsets only align tokenizations of the "
                         "same document: tokenize the same text with both tokenizers (tokenize_document)")
    if n == 0 or m == 0:
        return _empty(n, m)
    t_span = _point_spans(target.offsets)
    s_span = _point_spans(source.offsets)
    if not (s_span[:, 1:] >= s_span[:, :-1]).all():
        return _dense_overlaps(t_span, s_span)
    lo = np.searchsorted(s_span[1], t_span[0], side="right")
    # every source counted in lo ends before t starts, so it also starts before t ends: hi >= lo
    counts = np.searchsorted(s_span[0], t_span[1], side="left") - lo
    run_end = np.cumsum(counts)
    total = int(run_end[-1])
    pairs = np.empty((total, 2), dtype=np.int32)
    pairs[:, 0] = np.repeat(np.arange(n, dtype=np.int32), counts)
    # pair k of target t's run is source lo[t] + (k - first k of the run)
    pairs[:, 1] = np.arange(total, dtype=np.int32) + np.repeat((lo - run_end + counts).astype(np.int32), counts)
    return Alignment(pairs=pairs, n_target=n, n_source=m)


def _dense_overlaps(t_span: np.ndarray, s_span: np.ndarray) -> Alignment:
    """Every overlapping (target, source) pair by direct comparison, in row chunks of <= 16M cells."""
    n, m = t_span.shape[1], s_span.shape[1]
    found = []
    rows = max(1, 2**24 // m)
    for a in range(0, n, rows):
        overlap = ((t_span[0, a:a + rows, None] < s_span[1][None, :])
                   & (s_span[0][None, :] < t_span[1, a:a + rows, None]))
        t_idx, s_idx = np.nonzero(overlap)
        found.append(np.stack([t_idx + a, s_idx], axis=1))
    pairs = np.concatenate(found).astype(np.int32).reshape(-1, 2)
    return Alignment(pairs=pairs, n_target=n, n_source=m)
