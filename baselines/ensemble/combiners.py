"""Combiners: (logprobs [M, P, V], available bool [M, P], weights [M], history_ce [M, P]) -> [P, V].

logprobs: each member's natural-log next-token distribution over the pivot vocabulary at P positions;
available: whether the member contributes there; weights: the members' weights (>= 0);
history_ce: the member's mean cross-entropy (nats per token) on the pivot tokens already seen before
the position, where it contributed (inf where it has none). Output: log-probabilities [P, V].
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fusion.registry import Registry

Combiner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENSEMBLE_COMBINERS: Registry = Registry("ensemble combiner")


def _uniform_where_none(out: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    none = ~available.any(dim=0)
    if none.any():
        out[none] = -math.log(out.shape[-1])
    return out


def _weighted_mixture(logprobs: torch.Tensor, available: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights[:, None].to(logprobs.dtype) * available.to(logprobs.dtype)          # [M, P]
    total = w.sum(dim=0, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    # log-space mixture: one member with weight 1 gives back its log-probs bit for bit (log 1 = 0)
    log_w = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
    out = torch.logsumexp(logprobs + log_w[..., None], dim=0)
    return _uniform_where_none(out, w > 0)


@ENSEMBLE_COMBINERS.register("mean", needs_history=False)
def mean_combiner(logprobs, available, weights, history_ce):
    """Uniform probability average over the members contributing at each position."""
    return _weighted_mixture(logprobs, available, torch.ones_like(weights))


@ENSEMBLE_COMBINERS.register("weighted", needs_history=False)
def weighted_combiner(logprobs, available, weights, history_ce):
    """Probability average with the given member weights, renormalised over contributing members."""
    return _weighted_mixture(logprobs, available, weights)


def _select(logprobs: torch.Tensor, available: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per position, the distribution of the available member with the lowest score (ties: first)."""
    rank = torch.where(available, score, torch.full_like(score, math.inf))
    # when every available member scores inf (no history yet) take the first available one
    first_available = available.float().argmax(dim=0)
    best = torch.where(torch.isinf(rank.min(dim=0).values), first_available, rank.argmin(dim=0))
    out = logprobs[best, torch.arange(logprobs.shape[1])].clone()
    return _uniform_where_none(out, available)


@ENSEMBLE_COMBINERS.register("max_prob", needs_history=False)
def max_prob_combiner(logprobs, available, weights, history_ce):
    """Per position, the most confident member's distribution (highest top-1 probability)."""
    return _select(logprobs, available, -logprobs.max(dim=-1).values)


@ENSEMBLE_COMBINERS.register("mince", needs_history=True)
def mince_combiner(logprobs, available, weights, history_ce):
    """MinCE at evaluation time: per position, the member with the lowest cross-entropy on the text
    seen so far (causal: only tokens before the position count); the first member before any history."""
    return _select(logprobs, available, history_ce)


# ----------------------------------------------------------------------------------------------
# History: each member's cross-entropy on the pivot tokens seen so far (what "mince" ranks by)


def observed_nll(logprobs: torch.Tensor, available: torch.Tensor,
                 observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's CE (nats) on the observed pivot token per position, [M, T] (0 where not counted), and
    where it counts, bool [M, T]: the member contributes and a token follows (`observed` int64 [T], -1: none)."""
    counted = available & (observed >= 0)[None]
    picked = logprobs.gather(-1, observed.clamp(min=0)[None, :, None].expand(len(logprobs), -1, 1))[..., 0]
    return torch.where(counted, -picked, torch.zeros(())), counted


def causal_mean_ce(nll: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean CE over the counted positions strictly before t (causal), [M, T]; inf before the first one."""
    csum = torch.cumsum(nll, dim=1) - nll
    ccount = torch.cumsum(counted.float(), dim=1) - counted.float()
    return torch.where(ccount > 0, csum / ccount.clamp(min=1), torch.full_like(csum, math.inf))


def running_mean_ce(nll_sum: torch.Tensor, nll_count: torch.Tensor) -> torch.Tensor:
    """Mean CE nll_sum / nll_count per member [M]; inf where nothing was counted yet."""
    return torch.where(nll_count > 0, nll_sum / nll_count.clamp(min=1), torch.full_like(nll_sum, math.inf))
