"""Sequence alignment: which source positions belong to each target position.

Two strategies, registered in `ALIGNMENTS`:
- "dtw": the reference FuseLLM dynamic time warping over token strings (cost = Levenshtein distance
  after removing the word-boundary markers, traceback ties diagonal > up > left). Quadratic per document;
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
    """pairs: int32 [P, 2], columns (target_pos, source_pos), sorted by target then source."""

    pairs: np.ndarray
    n_target: int
    n_source: int

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


def _empty(n_target: int, n_source: int) -> Alignment:
    return Alignment(pairs=np.zeros((0, 2), dtype=np.int32), n_target=n_target, n_source=n_source)


def _cost_matrix(target_tokens: list[str], source_tokens: list[str], target_marker: str,
                 source_marker: str) -> np.ndarray:
    """int32 [n, m]: Levenshtein distance between marker-stripped token strings.

    Documents repeat tokens a lot (a 2k-token text has ~600 distinct tokens), so distances are computed
    once per pair of distinct strings and gathered.
    """
    target = [t.replace(target_marker, "") if target_marker else t for t in target_tokens]
    source = [s.replace(source_marker, "") if source_marker else s for s in source_tokens]
    target_unique, target_index = np.unique(np.array(target, dtype=object), return_inverse=True)
    source_unique, source_index = np.unique(np.array(source, dtype=object), return_inverse=True)
    distinct = cdist(list(target_unique), list(source_unique), scorer=Levenshtein.distance, dtype=np.int32,
                     workers=1)
    return distinct[np.ix_(target_index.ravel(), source_index.ravel())]


def _accumulate(cost: np.ndarray) -> tuple[np.ndarray, int]:
    """Accumulated DTW costs in anti-diagonal ("skewed") layout, and the infinity used for borders.

    Returns acc [n + m, n + 1] with acc[i + j + 1, i + 1] = D[i, j]; row 0 and column 0 are the infinite
    borders (D[-1, *], D[*, -1]) and every cell off the band of valid (i, j) stays infinite, so the
    traceback reads unavailable moves as infinite without bounds checks.
    D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1]), D[-1, -1] = 0.
    """
    n, m = cost.shape
    worst = int(cost.max(initial=0)) * (n + m)
    dtype = np.int32 if worst < 2**30 else np.int64
    inf = np.iinfo(dtype).max // 2  # inf + a cost must not overflow
    # skew[k, i] = cost[i, k - i]: a strided view of the cost rows shifted right by their index, then
    # made contiguous so each anti-diagonal is one slice.
    padded = np.full((n, n + m), inf, dtype=dtype)
    padded[:, :m] = cost
    flat = padded.ravel()
    stride = flat.strides[0]
    skew = np.lib.stride_tricks.as_strided(flat, shape=(n, n + m - 1), strides=(stride * (n + m - 1), stride))
    skew = np.ascontiguousarray(skew.T)
    acc = np.full((n + m, n + 1), inf, dtype=dtype)
    acc[1, 1] = skew[0, 0]
    best = np.empty(n, dtype=dtype)
    for k in range(1, n + m - 1):
        lo, hi = max(0, k - m + 1), min(k, n - 1) + 1
        out = best[: hi - lo]
        # up = D[i-1, j] and left = D[i, j-1] lie on diagonal k-1, diag = D[i-1, j-1] on k-2.
        np.minimum(acc[k, lo:hi], acc[k, lo + 1:hi + 1], out=out)
        np.minimum(out, acc[k - 1, lo:hi], out=out)
        np.add(out, skew[k, lo:hi], out=acc[k + 1, lo + 1:hi + 1])
    return acc, inf


def _traceback(acc: np.ndarray, n: int, m: int) -> np.ndarray:
    """The reference path from (n-1, m-1) back to (0, 0): at each step the cheapest of diagonal, up,
    left (unavailable = infinite), ties broken in that order. Returns int32 [P, 2] in path order."""
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        k = i + j + 1  # row of D[i, j]; D[a, b] = acc[a + b + 1, a + 1]
        diag = acc[k - 2, i]
        up = acc[k - 1, i]
        left = acc[k - 1, i + 1]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    if path[-1] != (0, 0):  # cannot happen: (0, 0) is the only cell with both indices 0
        path.append((0, 0))
    return np.asarray(path[::-1], dtype=np.int32)


def dtw_tokens(target_tokens: list[str], source_tokens: list[str], target_marker: str,
               source_marker: str) -> Alignment:
    """Reference FuseLLM DTW between two token-string sequences.

    cost(i, j) = Levenshtein distance between target_tokens[i] with target_marker removed and
    source_tokens[j] with source_marker removed (raw token strings otherwise, as the reference);
    D[i, j] = cost(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]), D[-1, -1] = 0, other borders infinite;
    traceback from (n-1, m-1) choosing the cheapest of diagonal, up (i-1), left (j-1), ties in that order.
    Returns Alignment with pairs int32 [P, 2] = the path (n + m - 1 >= P >= max(n, m)), sorted.
    """
    n, m = len(target_tokens), len(source_tokens)
    if n == 0 or m == 0:
        return _empty(n, m)
    cost = _cost_matrix(target_tokens, source_tokens, target_marker, source_marker)
    acc, _ = _accumulate(cost)
    return Alignment(pairs=_traceback(acc, n, m), n_target=n, n_source=m)


@ALIGNMENTS.register("dtw", reference=True)
def dtw_align(target: TokenizedText, source: TokenizedText) -> Alignment:
    """DTW alignment of two tokenizations of the same text (see `dtw_tokens`); offsets are ignored."""
    return dtw_tokens(target.tokens, source.tokens, target.marker, source.marker)


def _point_spans(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open spans in doubled coordinates: [s, e) -> [2s, 2e), a zero-width span at p -> [2p, 2p + 1).

    Ordinary overlap of the doubled spans then means: two tokens share a character; a zero-width token
    at p (BOS at 0, EOS at len(text), a trimmed marker-only token) overlaps the token covering character
    p and any zero-width token at p. So EOS pairs with EOS, and never with the last real token.
    """
    starts = 2 * offsets[:, 0].astype(np.int64)
    ends = np.maximum(2 * offsets[:, 1].astype(np.int64), starts + 1)
    return starts, ends


def _is_sorted(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] >= values[:-1]))


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
    n, m = len(target), len(source)
    if n == 0 or m == 0:
        return _empty(n, m)
    t_start, t_end = _point_spans(np.asarray(target.offsets))
    s_start, s_end = _point_spans(np.asarray(source.offsets))
    if _is_sorted(s_start) and _is_sorted(s_end):
        lo = np.searchsorted(s_end, t_start, side="right")
        hi = np.searchsorted(s_start, t_end, side="left")
        counts = np.maximum(hi - lo, 0)
        total = int(counts.sum())
        target_pos = np.repeat(np.arange(n, dtype=np.int64), counts)
        # within each target's run, source positions count up from lo
        run_start = np.repeat(np.cumsum(counts) - counts, counts)
        source_pos = np.repeat(lo, counts) + (np.arange(total) - run_start)
        pairs = np.stack([target_pos, source_pos], axis=1).astype(np.int32)
    else:
        found = []
        rows = max(1, 2**24 // m)
        for a in range(0, n, rows):
            overlap = (t_start[a:a + rows, None] < s_end[None, :]) & (s_start[None, :] < t_end[a:a + rows, None])
            t_idx, s_idx = np.nonzero(overlap)
            found.append(np.stack([t_idx + a, s_idx], axis=1))
        pairs = np.concatenate(found).astype(np.int32).reshape(-1, 2)
    return Alignment(pairs=pairs, n_target=n, n_source=m)
