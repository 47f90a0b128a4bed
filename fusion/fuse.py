"""Fusion functions: combine the target's and the aligned sources' top-k distributions per document.

Each candidate is one model's distribution on the target's tokenization (the target's own, or a source's
from `fusion.aligned.align_distribution`) with a quality score (lower is better: CE in nats per token on the
model's own tokenization, as in the paper, or bits per byte, the only score comparable across tokenizers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registry import FUSIONS

AVGCE_WEIGHTS = ("softmax_neg", "softmax_exp_neg")


@dataclass
class Candidate:
    """ids int32 [n_t, k]; probs float32 [n_t, k] (empty slots id 0 prob 0); score: CE (nats/token) or bpb."""

    ids: np.ndarray
    probs: np.ndarray
    score: float


def merge_slots(ids: np.ndarray, probs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, sum the probabilities of equal ids and keep the top_k largest.

    ids int [n, m]; probs float [n, m] (slots with prob <= 0 are empty and ignored).
    Returns ids int32 [n, top_k], probs float32 [n, top_k], each row sorted by probability descending
    (ties: lower id first); unused slots id 0 prob 0.
    """
    n, m = ids.shape
    out_ids = np.zeros((n, top_k), dtype=np.int32)
    out_probs = np.zeros((n, top_k), dtype=np.float32)
    rows = np.repeat(np.arange(n, dtype=np.int64), m)
    flat_ids = ids.reshape(-1).astype(np.int64)
    flat_probs = probs.reshape(-1).astype(np.float64)
    keep = flat_probs > 0
    if not keep.any():
        return out_ids, out_probs
    if (flat_ids[keep] < 0).any():
        raise ValueError("merge_slots got a negative id in a slot with probability > 0")
    rows, flat_ids, flat_probs = rows[keep], flat_ids[keep], flat_probs[keep]
    # One key per (row, id): unique + bincount sums duplicates without a Python loop over rows.
    stride = int(flat_ids.max()) + 1
    keys, inverse = np.unique(rows * stride + flat_ids, return_inverse=True)
    sums = np.bincount(inverse, weights=flat_probs)
    key_rows, key_ids = keys // stride, keys % stride
    order = np.lexsort((key_ids, -sums, key_rows))
    key_rows, key_ids, sums = key_rows[order], key_ids[order], sums[order]
    first_of_row = np.searchsorted(key_rows, key_rows, side="left")
    rank = np.arange(len(key_rows)) - first_of_row
    sel = rank < top_k
    out_ids[key_rows[sel], rank[sel]] = key_ids[sel]
    out_probs[key_rows[sel], rank[sel]] = sums[sel]
    return out_ids, out_probs


def _check(candidates: list[Candidate], top_k: int) -> None:
    if not candidates:
        raise ValueError("fusion needs at least one candidate (the target model's own distribution)")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = candidates[0].ids.shape[0]
    for index, c in enumerate(candidates):
        if c.ids.shape != c.probs.shape or c.ids.ndim != 2:
            raise ValueError(f"candidate {index}: ids {c.ids.shape} and probs {c.probs.shape} must both be [n_t, k]")
        if c.ids.shape[0] != n:
            raise ValueError(f"candidate {index} has {c.ids.shape[0]} positions, candidate 0 has {n}: all "
                             "candidates must be on the target's tokenization of the same document")
        if not np.isfinite(c.score):
            raise ValueError(f"candidate {index} has a non-finite score {c.score}")


@FUSIONS.register("mince", reference="Wan et al. 2024, eq. 5 (MinCE)")
def mince(candidates: list[Candidate], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole distribution of the candidate with the lowest score (ties: the first, i.e. the target).

    Returns ids int32 [n_t, top_k], probs float32 [n_t, top_k].
    """
    _check(candidates, top_k)
    best = candidates[int(np.argmin([c.score for c in candidates]))]
    return merge_slots(best.ids, best.probs, top_k)


def avgce_weights(scores: list[float], weights: str = "softmax_neg") -> np.ndarray:
    """Candidate weights float64 [C]: softmax(-score) (paper) or softmax(exp(-score)) (reference code)."""
    s = np.asarray(scores, dtype=np.float64)
    if weights == "softmax_neg":
        logits = -s
    elif weights == "softmax_exp_neg":
        logits = np.exp(-s)
    else:
        raise ValueError(f"avgce weights must be one of {AVGCE_WEIGHTS}, got {weights!r}")
    e = np.exp(logits - logits.max())
    return e / e.sum()


AVGCE_CUTS = ("union", "top_k")


def normalize_rows(probs: np.ndarray) -> np.ndarray:
    """probs float [n, k] -> each row divided by its sum (float64); all-zero rows stay all-zero."""
    p = np.asarray(probs, dtype=np.float64)
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=np.zeros_like(p), where=total > 0)


@FUSIONS.register("avgce", reference="Wan et al. 2024, AvgCE")
def avgce(candidates: list[Candidate], top_k: int, weights: str = "softmax_neg",
          cut: str = "union") -> tuple[np.ndarray, np.ndarray]:
    """Weighted average of the candidates' distributions, each row first renormalised to sum 1.

    A candidate keeps only its top-k (mass < 1) while a one-hot fallback row has mass 1: without the
    renormalisation a fallback would outweigh a real distribution at equal scores. The reference renormalises
    each candidate's kept top-k (a softmax over the k logits) before averaging, and so does the paper.
    weights: "softmax_neg" = softmax(-score) (paper), "softmax_exp_neg" = softmax(exp(-score)) (reference code).
    cut: "union" keeps every id of the union (the reference's dense average; width = sum of the candidates'
    widths, empty slots id 0 prob 0), "top_k" keeps the top_k largest (the rest of the mass is dropped; the
    loss renormalises). Returns ids int32 [n_t, width], probs float32 [n_t, width], rows sorted by probability.
    """
    _check(candidates, top_k)
    if cut not in AVGCE_CUTS:
        raise ValueError(f"avgce cut must be one of {AVGCE_CUTS}, got {cut!r}")
    w = avgce_weights([c.score for c in candidates], weights)
    ids = np.concatenate([c.ids for c in candidates], axis=1)
    probs = np.concatenate([normalize_rows(c.probs) * wi for c, wi in zip(candidates, w)], axis=1)
    return merge_slots(ids, probs, ids.shape[1] if cut == "union" else top_k)
