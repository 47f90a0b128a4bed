"""The FuseLLM method per document: a source's distribution moved onto the target's tokenization
(`align_document`), and the fused distribution of the candidates (`fuse_document`).

These are the steps the harness runs for every training document; they take texts, tokenizers and arrays
and return arrays plus what was chosen, so they are testable without a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aligned import align_distribution
from .fuse import Candidate
from .registry import ALIGNMENTS, FUSIONS
from .tokens import TokenizedText, tokenize_document
from .vocab import VocabMap


@dataclass(frozen=True)
class AlignedDocument:
    """A source's top-k on the target's tokenization of one document.

    ids int32 [n_target, k], probs float32 [n_target, k] (empty slots id 0, prob 0); n_one_to_one: target
    positions aligned to exactly one source position (the others fall back to a one-hot)."""

    ids: np.ndarray
    probs: np.ndarray
    n_target: int
    n_one_to_one: int


def align_document(text: str, target_tokenizer, source_tokenizer, source_ids: np.ndarray,
                   source_logprobs: np.ndarray, vocab_map: VocabMap, *, alignment: str = "offsets",
                   target: TokenizedText | None = None, target_ids: np.ndarray | None = None,
                   target_logprobs: np.ndarray | None = None, **options) -> AlignedDocument:
    """Align one document's source distribution to the target tokenization.

    text: the document; source_ids int [n_source, k] and source_logprobs float [n_source, k] (natural log) are
    the source's stored top-k on its own tokenization of `text` (no BOS, EOS appended, as extraction does);
    alignment: a name in `fusion.registry.ALIGNMENTS`; `target`: the target's tokenization when the caller has
    it already; target_ids / target_logprobs [n_target, k]: the target's own top-k (for `empty_rows="target"`);
    options: the switches of `fusion.aligned.align_distribution` (fallback_onehot, duplicate_ids, position0,
    empty_rows), whose docstring states the rule per position. Returns an AlignedDocument.
    """
    tt = target if target is not None else tokenize_document(target_tokenizer, text, add_bos=False, add_eos=True)
    st = tokenize_document(source_tokenizer, text, add_bos=False, add_eos=True)
    al = ALIGNMENTS.get(alignment)(tt, st)
    ids, probs = align_distribution(tt, st, source_ids, source_logprobs, al, vocab_map, target_ids=target_ids,
                                    target_logprobs=target_logprobs, **options)
    return AlignedDocument(ids, probs, len(tt), int((al.one_to_one() >= 0).sum()))


@dataclass(frozen=True)
class FusedDocument:
    """The fused distribution of one document: ids int32 [n_target, top_k], probs float32 [n_target, top_k];
    chosen: the name of the candidate MinCE took (lowest score; ties: the first), None for other fusions."""

    ids: np.ndarray
    probs: np.ndarray
    chosen: str | None


def fuse_document(candidates: dict[str, Candidate], fusion: str, top_k: int, **params) -> FusedDocument:
    """Fuse the candidates of one document (target first, then the aligned sources, each with its score).

    fusion: a name in `fusion.registry.FUSIONS`; params: that function's own parameters (avgce: weights, cut).
    """
    if not candidates:
        raise ValueError("fuse_document: no candidates (the target's own distribution is always one)")
    names = list(candidates)
    cands = list(candidates.values())
    chosen = names[int(np.argmin([c.score for c in cands]))] if fusion == "mince" else None
    ids, probs = FUSIONS.get(fusion)(cands, top_k=top_k, **params)
    return FusedDocument(np.asarray(ids, dtype=np.int32), np.asarray(probs, dtype=np.float32), chosen)
