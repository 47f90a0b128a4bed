"""Output ensemble of language models with different tokenizers, as an lm-eval model.

The ensemble is scored by the very same lm-eval tasks as every other model (`fuselab-ensemble`).
Everything happens on one *pivot* tokenization (the target's tokenizer, or a chosen member's):

- A member that shares the pivot tokenizer (identical tokenizer.json) runs on the pivot token ids and
  contributes its full next-token distribution. So an ensemble of members with one tokenizer is plain
  probability averaging, and an ensemble of one model reproduces that model's log-likelihoods.
- Any other member runs once per text on its own tokenization. Its positions are aligned to the
  pivot's with a registered alignment (`fusion.registry.ALIGNMENTS`) and its vocabulary is mapped with
  a registered vocabulary map (`fusion.vocab.build_vocab_map`). It contributes at pivot position t
  (the prediction of pivot token t+1) only when, as in FuseLLM, t is aligned 1-to-1 to its position s
  and its token s maps to pivot token t, and, in addition, both tokens end at the same character, so
  the member conditions on exactly the pivot's prefix text (never on text the pivot has not seen yet).
  Elsewhere the member abstains and the combiner uses the members that do contribute.
- Coverage of the pivot vocabulary by a mapped member: its next-token probabilities (the full
  vocabulary, or only its top-k when `top_k` is set) are summed onto their mapped pivot ids; the
  mass that maps nowhere (unmapped ids, or outside the top-k) is spread uniformly over the pivot
  vocabulary. Every mapped distribution thus sums to 1 and is > 0 everywhere: log-likelihoods stay
  finite. A position where no member contributes gets the uniform distribution, log(1/V).

Known approximation: a member's tokenization of the prefix is taken from its tokenization of the
whole text (FuseLLM does the same); BPE boundaries inside a word can depend on the characters after it.

Modules: combiners (the registered combiners and the MinCE history), segments (a request as pivot-token
segments), members (loading, forward passes, positions and vocabulary mapped onto the pivot's), generation
(greedy decoding with per-member KV caches) and lm (EnsembleLM, the lm-eval model).
"""
from __future__ import annotations

from .combiners import (ENSEMBLE_COMBINERS, Combiner, max_prob_combiner, mean_combiner, mince_combiner,
                        weighted_combiner)
from .lm import EnsembleLM, parse_model_args

__all__ = ["ENSEMBLE_COMBINERS", "Combiner", "EnsembleLM", "max_prob_combiner", "mean_combiner", "mince_combiner",
           "parse_model_args", "weighted_combiner"]
