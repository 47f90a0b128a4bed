"""Fusion diagnostics: where a source's signal reaches the fused teacher, and where it is lost.

A null result of FuseLLM can come from the alignment (few one-to-one positions), the vocabulary map (the
source token maps to another target token, or its top-k ids map nowhere), a next-token mismatch (the source
predicts a unit that spans other characters than the target's next token), the truncation to top-k, the
candidate choice, or the training budget. These functions count each cause per document; the harness sums
them per source and domain.

Every target position t that predicts a token (t < n_t - 1) falls in exactly one category, tested in order:
- "not_one_to_one": the alignment pairs t with zero or several source positions;
- "token_mismatch": one source position s, but its token does not map to the target token t;
- "unmapped_ids": accepted, but none of the source's top-k ids at s maps into the target vocabulary;
- "next_span_differs": accepted with mapped ids, but the source's next token (s + 1) covers other characters
  than the target's next token (t + 1): the source's distribution is about another unit of text;
- "usable": accepted, mapped, and both models predict the same span of text next.
The last two carry the source's distribution into the loss; the first three get a fallback row.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .align import Alignment
from .aligned import accepted_positions
from .tokens import TokenizedText
from .vocab import VocabMap

POSITION_CATEGORIES = ("not_one_to_one", "token_mismatch", "unmapped_ids", "next_span_differs", "usable")
CARRIED = ("next_span_differs", "usable")


def classify_positions(target: TokenizedText, source: TokenizedText, source_ids: np.ndarray, alignment: Alignment,
                       vocab_map: VocabMap, position0: str = "strict") -> np.ndarray:
    """int8 [n_t]: the index into POSITION_CATEGORIES of each target position; -1 at the last position
    (it predicts no token of the document).

    source_ids int [n_s, k]: the source's top-k ids on its own tokenization; position0 as in
    `fusion.aligned.align_distribution` (the acceptance rule is shared: `accepted_positions`).
    """
    n_t, n_s = len(target.ids), len(source.ids)
    out = np.full(n_t, -1, dtype=np.int8)
    if n_t < 2:
        return out
    src_pos, accepted = accepted_positions(target, source, alignment, vocab_map, position0)
    s2t = vocab_map.source_to_target
    t = np.arange(n_t - 1)
    s = src_pos[t]
    category = np.where(s < 0, 0, np.where(accepted[t], 4, 1)).astype(np.int8)
    rows = np.flatnonzero(category == 4)
    if len(rows):
        top = source_ids[s[rows]]
        mapped = np.where(top < len(s2t), s2t[np.minimum(top, len(s2t) - 1)], -1) >= 0  # ids past the vocab: unmapped
        category[rows[~mapped.any(axis=1)]] = 2
        nxt = s[rows] + 1
        has_next = nxt < n_s
        same_span = np.zeros(len(rows), dtype=bool)
        same_span[has_next] = (source.offsets[nxt[has_next]] == target.offsets[rows[has_next] + 1]).all(axis=1)
        category[rows[mapped.any(axis=1) & ~same_span]] = 3
    out[: n_t - 1] = category
    return out


@dataclass
class Diagnostics:
    """Sums over target positions that predict a token, additive over documents (`a + b`).

    counts: positions per POSITION_CATEGORIES entry. Over the positions that carry the source's row and whose
    row has mass (carried): covered (the gold next target token is among the row's ids, q > 0), target_covered
    (the gold token is among the target model's own stored top-k, so its probability p is known), compared (both),
    mass_kept (the source's top-k mass at the aligned source position). In nats: teacher_nll and target_nll,
    -ln q and -ln p on the compared positions; target_nll_known, -ln p on the target-covered positions, beside
    mix_nll = -ln((1 - mix) p + mix q) there, the loss the target would get by mixing the teacher in at `mix`.
    q is the teacher's row renormalised to sum 1 (what the fusion loss trains towards); p is the target model's
    own probability (its stored top-k log-probability, not renormalised), unknown outside its top-k.
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(POSITION_CATEGORIES), dtype=np.int64))
    carried: int = 0
    covered: int = 0
    target_covered: int = 0
    compared: int = 0
    mass_kept: float = 0.0
    teacher_nll: float = 0.0
    target_nll: float = 0.0
    target_nll_known: float = 0.0
    mix_nll: float = 0.0

    def __add__(self, other: "Diagnostics") -> "Diagnostics":
        return Diagnostics(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def figures(self) -> dict[str, tuple[float, int]]:
        """{figure: (value, n)}, n the positions the value is a share or mean over (value NaN when n = 0):
        share_<category> and share_carried over predicting positions; coverage, target_coverage and mass_kept
        (mean top-k mass) over carried positions; teacher_nll and target_nll (mean nats) over compared
        positions; mix_gain_nats = mean mix_nll - mean target_nll_known over target-covered positions
        (negative: mixing the teacher in lowers the target's loss)."""
        positions = int(self.counts.sum())

        def ratio(num: float, n: int) -> tuple[float, int]:
            return (float(num) / n if n else float("nan")), int(n)

        out = {f"share_{name}": ratio(count, positions) for name, count in zip(POSITION_CATEGORIES, self.counts)}
        out["share_carried"] = ratio(self.carried, positions)
        out["coverage"] = ratio(self.covered, self.carried)
        out["target_coverage"] = ratio(self.target_covered, self.carried)
        out["mass_kept"] = ratio(self.mass_kept, self.carried)
        out["teacher_nll"] = ratio(self.teacher_nll, self.compared)
        out["target_nll"] = ratio(self.target_nll, self.compared)
        out["mix_gain_nats"] = ratio(self.mix_nll - self.target_nll_known, self.target_covered)
        return out

    def summary(self) -> dict[str, float]:
        """`figures()` without the counts, plus the number of predicting positions."""
        return {"positions": int(self.counts.sum()), **{k: v for k, (v, _) in self.figures().items()}}


def diagnose_document(target: TokenizedText, source: TokenizedText, source_ids: np.ndarray,
                      source_logprobs: np.ndarray, alignment: Alignment, vocab_map: VocabMap,
                      aligned_ids: np.ndarray, aligned_probs: np.ndarray, target_gold_logprob: np.ndarray,
                      position0: str = "strict", mix: float = 0.1) -> Diagnostics:
    """Diagnostics of one source on one document.

    source_ids / source_logprobs [n_s, k] (nats): the source's top-k on its tokenization; aligned_ids /
    aligned_probs [n_t, k']: the source's row per target position as the fusion used it
    (`fusion.aligned.align_distribution`); target_gold_logprob float [n_t]: the target model's own
    log p(target.ids[t + 1] | prefix) in nats, -inf where unknown (`gold_logprob`; the last entry is ignored).
    mix in (0, 1].
    """
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"mix must be in (0, 1], got {mix}")
    n_t = len(target.ids)
    if aligned_ids.shape != aligned_probs.shape or aligned_ids.shape[0] != n_t or len(target_gold_logprob) != n_t:
        raise ValueError(f"aligned rows {aligned_ids.shape} / {aligned_probs.shape} and target_gold_logprob "
                         f"{np.shape(target_gold_logprob)} must all have n_target={n_t} rows")
    category = classify_positions(target, source, source_ids, alignment, vocab_map, position0)
    diag = Diagnostics(counts=np.bincount(category[category >= 0], minlength=len(POSITION_CATEGORIES)))
    carried = np.isin(category, [POSITION_CATEGORIES.index(c) for c in CARRIED])
    mass = aligned_probs.astype(np.float64).sum(axis=1)
    t = np.flatnonzero(carried & (mass > 0))
    if not len(t):
        return diag
    gold = target.ids[t + 1]
    q = np.where(aligned_ids[t] == gold[:, None], aligned_probs[t], 0.0).sum(axis=1) / mass[t]
    log_p = np.asarray(target_gold_logprob, dtype=np.float64)[t]
    p = np.exp(log_p)  # 0 where unknown
    covered, known = q > 0, np.isfinite(log_p)
    both = covered & known
    diag.carried, diag.covered = len(t), int(covered.sum())
    diag.target_covered, diag.compared = int(known.sum()), int(both.sum())
    diag.mass_kept = float(np.exp(source_logprobs[alignment.one_to_one()[t]].astype(np.float64)).sum())
    diag.teacher_nll = float(-np.log(q[both]).sum())
    diag.target_nll = float(-log_p[both].sum())
    diag.target_nll_known = float(-log_p[known].sum())
    diag.mix_nll = float(-np.log((1.0 - mix) * p[known] + mix * q[known]).sum())
    return diag


def gold_logprob(target: TokenizedText, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """float64 [n_t]: the target model's log p(target.ids[t + 1] | prefix) in nats, read from its stored top-k
    on the same tokenization (topk_ids / topk_logprobs [n_t, k]): the model's own probability, not
    renormalised; -inf where the next token is not among the top-k (its probability is unknown, below the
    k-th) and at the last position (it predicts no token of the document)."""
    n_t = len(target.ids)
    out = np.full(n_t, -np.inf)
    if n_t < 2:
        return out
    hit = np.asarray(topk_ids)[:-1] == target.ids[1:, None]
    prob = np.where(hit, np.exp(np.asarray(topk_logprobs, dtype=np.float64)[:-1]), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        out[:-1] = np.where(hit.any(axis=1), np.log(prob), -np.inf)
    return out


def topk_mass(topk_logprobs: np.ndarray) -> tuple[float, int]:
    """(sum over the positions that predict a token, all but the last, of the top-k mass sum_k exp(logprob),
    number of those positions) of one document; topk_logprobs [n, k] in nats, a model's stored top-k on its
    own tokenization. Their ratio is the mean mass the top-k keeps (1 - the tail the fusion drops)."""
    lp = np.asarray(topk_logprobs, dtype=np.float64)[:-1]
    return float(np.exp(lp).sum()), int(lp.shape[0])


def candidate_weights(scores: np.ndarray, fusion: str, avgce_weights: str = "softmax_neg") -> np.ndarray:
    """float64 [n_docs, C]: the weight each fusion candidate gets per document (scores [n_docs, C], lower is
    better; candidate 0 is the target). MinCE: 1 on the lowest score (ties: the first), else 0; AvgCE: the
    weights `fusion.fuse.avgce_weights` gives. Summed per domain they say which model each domain listens to."""
    from .fuse import avgce_weights as weights_of

    scores = np.asarray(scores, dtype=np.float64)
    if fusion == "mince":
        out = np.zeros_like(scores)
        out[np.arange(len(scores)), np.argmin(scores, axis=1)] = 1.0
        return out
    if fusion == "avgce":
        return np.stack([weights_of(list(row), avgce_weights) for row in scores]) if len(scores) else scores
    raise ValueError(f"candidate_weights knows fusion 'mince' and 'avgce', got {fusion!r}")


def candidate_choices(scores: np.ndarray, fusion: str,
                      avgce_weights: str = "softmax_neg") -> tuple[np.ndarray, np.ndarray]:
    """(picked int64 [C]: documents whose lowest score is candidate c (ties: the first), MinCE's choice and
    AvgCE's largest weight; weight_sum float64 [C]: `candidate_weights` summed over documents) of scores
    [n_docs, C] (candidate 0 the target). Divided by n_docs: the share of documents and the mean weight."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_docs, candidates], got shape {scores.shape}")
    picked = np.bincount(np.argmin(scores, axis=1), minlength=scores.shape[1]).astype(np.int64)
    return picked, candidate_weights(scores, fusion, avgce_weights).sum(axis=0)
