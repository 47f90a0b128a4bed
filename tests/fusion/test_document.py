"""Per-document FuseLLM steps (fusion/document.py) on real tokenizers, with oracles from the method's rules:
a target position takes the source's top-k when it is aligned one-to-one and the source token maps to the target
token, else a one-hot on the next target token; MinCE takes the whole distribution of the lowest-score candidate."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.document import align_document, fuse_document
from fusion.fuse import Candidate
from fusion.tokens import tokenize_document
from fusion.vocab import VocabMap

TEXT = "the quick brown fox jumps over the lazy dog"


def _source_topk(n: int, k: int = 3, vocab: int = 50):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(k + 1), size=n)[:, :k], axis=1)[:, ::-1].astype(np.float32)
    return ids, np.log(probs), probs


def test_same_tokenizer_identity_map_keeps_the_source_distribution(sp_tokenizer):
    tt = tokenize_document(sp_tokenizer, TEXT, add_bos=False, add_eos=True)
    ids, logprobs, probs = _source_topk(len(tt))
    identity = VocabMap(np.arange(len(sp_tokenizer), dtype=np.int32), "em")
    doc = align_document(TEXT, sp_tokenizer, sp_tokenizer, ids, logprobs, identity, alignment="offsets")
    assert doc.n_target == len(tt) and doc.n_one_to_one == len(tt)
    np.testing.assert_array_equal(doc.ids, ids)
    np.testing.assert_allclose(doc.probs, probs, rtol=1e-6)
    assert doc.ids.dtype == np.int32 and doc.probs.dtype == np.float32


@pytest.mark.parametrize("alignment", ["offsets", "dtw"])
def test_unmapped_vocabulary_falls_back_to_the_next_target_token(sp_tokenizer, alignment):
    tt = tokenize_document(sp_tokenizer, TEXT, add_bos=False, add_eos=True)
    ids, logprobs, _ = _source_topk(len(tt))
    nothing = VocabMap(np.full(len(sp_tokenizer), -1, dtype=np.int32), "em")
    doc = align_document(TEXT, sp_tokenizer, sp_tokenizer, ids, logprobs, nothing, alignment=alignment)
    n = len(tt)
    np.testing.assert_array_equal(doc.ids[:-1, 0], tt.ids[1:])  # one-hot on token t+1
    np.testing.assert_array_equal(doc.probs[:-1, 0], np.ones(n - 1))
    assert (doc.probs[:, 1:] == 0).all() and (doc.probs[-1] == 0).all()  # the last position has no next token


def test_cross_tokenizer_counts_one_to_one_positions(sp_tokenizer, bpe_tokenizer):
    tt = tokenize_document(sp_tokenizer, TEXT, add_bos=False, add_eos=True)
    st = tokenize_document(bpe_tokenizer, TEXT, add_bos=False, add_eos=True)
    ids, logprobs, _ = _source_topk(len(st))
    vm = VocabMap(np.full(len(bpe_tokenizer), -1, dtype=np.int32), "em")
    doc = align_document(TEXT, sp_tokenizer, bpe_tokenizer, ids, logprobs, vm, alignment="offsets")
    assert doc.ids.shape == (len(tt), 3) and 0 <= doc.n_one_to_one <= len(tt)


def _cand(ids, probs, score):
    return Candidate(np.array(ids, dtype=np.int32), np.array(probs, dtype=np.float32), score)


def test_mince_returns_the_lowest_score_candidate_and_names_it():
    cands = {"target": _cand([[1, 2]], [[0.6, 0.4]], 2.0), "a": _cand([[3, 4]], [[0.7, 0.3]], 1.0),
             "b": _cand([[5, 6]], [[0.9, 0.1]], 3.0)}
    fused = fuse_document(cands, "mince", top_k=2)
    assert fused.chosen == "a"
    np.testing.assert_array_equal(fused.ids, [[3, 4]])
    np.testing.assert_allclose(fused.probs, [[0.7, 0.3]], rtol=1e-6)


def test_mince_tie_takes_the_first_candidate():
    cands = {"target": _cand([[1, 2]], [[0.6, 0.4]], 1.0), "a": _cand([[3, 4]], [[0.7, 0.3]], 1.0)}
    assert fuse_document(cands, "mince", top_k=2).chosen == "target"


def test_avgce_chooses_nothing_and_averages():
    # equal scores: weights 1/2 each; each row renormalised first (sums 1 already)
    cands = {"target": _cand([[1, 2]], [[0.5, 0.5]], 1.0), "a": _cand([[1, 3]], [[0.5, 0.5]], 1.0)}
    fused = fuse_document(cands, "avgce", top_k=2, weights="softmax_neg", cut="top_k")
    assert fused.chosen is None
    np.testing.assert_array_equal(fused.ids, [[1, 2]])  # 0.5 for id 1; ties between 2 and 3: lower id first
    np.testing.assert_allclose(fused.probs, [[0.5, 0.25]], rtol=1e-6)


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="no candidates"):
        fuse_document({}, "mince", top_k=2)
