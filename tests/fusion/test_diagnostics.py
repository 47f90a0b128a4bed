"""Fusion diagnostics on a hand-built two-document toy: categories, shares, coverage, nats, candidate weights."""
import math

import numpy as np
import pytest

from fusion.align import offsets_align
from fusion.diagnostics import (POSITION_CATEGORIES, Diagnostics, candidate_choices, candidate_weights,
                                classify_positions, diagnose_document, gold_logprob, topk_mass)
from fusion.tokens import TokenizedText
from fusion.vocab import VocabMap


def doc(ids, offsets, n_bytes):
    return TokenizedText(ids=np.asarray(ids, dtype=np.int32), tokens=[f"t{i}" for i in ids],
                         offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2), marker="", n_bytes=n_bytes)


# source vocabulary of 40 ids; -1 = unmapped
S2T = np.full(40, -1, dtype=np.int32)
S2T[[20, 23, 24, 26, 3, 25, 30]] = [10, 12, 14, 15, 2, 13, 14]
VOCAB = VocabMap(S2T, "em")

# doc 1 "ab cd": target "ab" " cd" EOS; source "ab" " c" "d" EOS
T1 = doc([10, 11, 2], [(0, 2), (2, 5), (5, 5)], 5)
S1 = doc([20, 21, 22, 3], [(0, 2), (2, 4), (4, 5), (5, 5)], 5)
S1_IDS = np.array([[21, 30], [0, 0], [0, 0], [0, 0]])
S1_LP = np.log(np.array([[0.6, 0.3], [1, 1e-9], [1, 1e-9], [1, 1e-9]]))
# doc 2 "x y z": same token boundaries in both models
T2 = doc([12, 13, 15, 2], [(0, 1), (1, 3), (3, 5), (5, 5)], 5)
S2 = doc([23, 24, 26, 3], [(0, 1), (1, 3), (3, 5), (5, 5)], 5)
S2_IDS = np.array([[24, 25], [0, 0], [27, 28], [0, 0]])
S2_LP = np.log(np.array([[0.5, 0.25], [1, 1e-9], [0.7, 0.2], [1, 1e-9]]))


def test_categories_by_hand():
    # doc 1: t0 "ab" is one-to-one with s0, 20 -> 10 accepted, its top-k has 30 -> 14 mapped, but the source's
    # next token " c" spans (2, 4) where the target's " cd" spans (2, 5): next_span_differs.
    # t1 " cd" overlaps " c" and "d": not one-to-one. t2 is the last position.
    assert classify_positions(T1, S1, S1_IDS, offsets_align(T1, S1), VOCAB).tolist() == [3, 0, -1]
    # doc 2: t0 accepted (23 -> 12), top-k maps, next spans equal: usable; t1: 24 maps to 14, not 13:
    # token_mismatch; t2: 26 -> 15 accepted but top-k ids 27, 28 map nowhere: unmapped_ids.
    assert classify_positions(T2, S2, S2_IDS, offsets_align(T2, S2), VOCAB).tolist() == [4, 1, 2, -1]
    assert POSITION_CATEGORIES[4] == "usable"


def test_two_document_summary_by_hand():
    # the rows the fusion used at the carried positions, written from the rule (top-k ids mapped, unmapped dropped):
    # doc 1 t0: {21: .6 unmapped, 30 -> 14: .3} -> {14: .3}; doc 2 t0: {24 -> 14: .5, 25 -> 13: .25}
    a1_ids = np.array([[14, 0], [11, 0], [0, 0]]); a1_p = np.array([[0.3, 0], [1, 0], [0, 0]])
    a2_ids = np.array([[14, 13], [15, 0], [0, 0], [0, 0]]); a2_p = np.array([[0.5, 0.25], [1, 0], [1, 0], [0, 0]])
    # the target model's own log p(next token): .5 then .2 at the carried positions (others do not matter)
    gold1 = np.log([0.5, 0.9, 1.0])
    gold2 = np.log([0.2, 0.9, 0.9, 1.0])
    d = (diagnose_document(T1, S1, S1_IDS, S1_LP, offsets_align(T1, S1), VOCAB, a1_ids, a1_p, gold1)
         + diagnose_document(T2, S2, S2_IDS, S2_LP, offsets_align(T2, S2), VOCAB, a2_ids, a2_p, gold2))
    s = d.summary()
    assert s["positions"] == 5
    for name in POSITION_CATEGORIES:                       # one position of each kind
        assert s[f"share_{name}"] == pytest.approx(0.2)
    assert s["share_carried"] == pytest.approx(0.4)
    # gold next tokens: doc 1 t0 -> 11, not in {14}: not covered; doc 2 t0 -> 13, q = .25 / .75 = 1/3
    assert s["coverage"] == pytest.approx(0.5)
    assert s["target_coverage"] == 1.0  # the target knows p at both: compared positions = covered ones
    assert s["teacher_nll"] == pytest.approx(math.log(3))
    assert s["target_nll"] == pytest.approx(math.log(5))
    assert s["mass_kept"] == pytest.approx((0.9 + 0.75) / 2)
    mixed = -math.log(0.9 * 0.5) - math.log(0.9 * 0.2 + 0.1 / 3)
    assert s["mix_gain_nats"] == pytest.approx((mixed - math.log(2) - math.log(5)) / 2)


def test_empty_diagnostics_are_nan_not_errors():
    s = Diagnostics().summary()
    assert s["positions"] == 0 and math.isnan(s["coverage"]) and math.isnan(s["share_usable"])


def test_candidate_weights():
    scores = np.array([[2.0, 1.0, 1.0], [0.5, 3.0, 1.0]])
    np.testing.assert_array_equal(candidate_weights(scores, "mince"), [[0, 1, 0], [1, 0, 0]])   # ties: first
    w = candidate_weights(np.array([[0.0, math.log(3)]]), "avgce")
    np.testing.assert_allclose(w, [[0.75, 0.25]])
    with pytest.raises(ValueError, match="mince"):
        candidate_weights(scores, "maxce")


# the target model's own stored top-k (k = 2) on its tokenization of the two documents
T1_TOP = np.array([[11, 10], [2, 11], [10, 11]]); T1_LP = np.log(np.array([[0.5, 0.25], [0.5, 0.125], [0.5, 0.5]]))
T2_TOP = np.array([[14, 12], [15, 13], [2, 15], [12, 13]])
T2_LP = np.log(np.array([[0.5, 0.25], [0.5, 0.25], [0.75, 0.125], [0.5, 0.25]]))


def test_gold_logprob_reads_the_next_token_from_the_target_top_k():
    # doc 1: next tokens 11, 2: 11 is in row 0 at p .5, 2 in row 1 at p .5; the last position predicts nothing
    np.testing.assert_allclose(gold_logprob(T1, T1_TOP, T1_LP), [math.log(0.5), math.log(0.5), -math.inf])
    # doc 2: next tokens 13, 15, 2: 13 is not in row 0 {14, 12} (unknown), 15 in row 1 at .5, 2 in row 2 at .75
    np.testing.assert_allclose(gold_logprob(T2, T2_TOP, T2_LP), [-math.inf, math.log(0.5), math.log(0.75), -math.inf])


def test_topk_mass_over_predicting_positions():
    assert topk_mass(T1_LP) == (pytest.approx(0.75 + 0.625), 2)        # rows 0, 1; the last row is not counted
    assert topk_mass(T2_LP) == (pytest.approx(0.75 + 0.75 + 0.875), 3)


def test_unknown_target_probability_leaves_the_position_out_of_the_nats():
    # the carried positions are doc 1 t0 (teacher row {14: .3}, gold 11: q = 0) and doc 2 t0 (row {14: .5, 13: .25},
    # gold 13: q = 1/3); the target's top-k holds gold at doc 1 t0 (p = .5) but not at doc 2 t0 (unknown)
    a1_ids = np.array([[14, 0], [11, 0], [0, 0]]); a1_p = np.array([[0.3, 0], [1, 0], [0, 0]])
    a2_ids = np.array([[14, 13], [15, 0], [0, 0], [0, 0]]); a2_p = np.array([[0.5, 0.25], [1, 0], [1, 0], [0, 0]])
    d = (diagnose_document(T1, S1, S1_IDS, S1_LP, offsets_align(T1, S1), VOCAB, a1_ids, a1_p,
                           gold_logprob(T1, T1_TOP, T1_LP))
         + diagnose_document(T2, S2, S2_IDS, S2_LP, offsets_align(T2, S2), VOCAB, a2_ids, a2_p,
                             gold_logprob(T2, T2_TOP, T2_LP)))
    f = d.figures()
    assert f["share_usable"] == (pytest.approx(0.2), 5) and f["share_carried"] == (pytest.approx(0.4), 5)
    assert f["coverage"] == (0.5, 2) and f["target_coverage"] == (0.5, 2)
    # no position has both probabilities: the teacher-vs-target nats are over 0 positions
    assert math.isnan(f["teacher_nll"][0]) and f["teacher_nll"][1] == 0 and f["target_nll"][1] == 0
    # mixing at doc 1 t0: -ln(.9 * .5 + .1 * 0) - (-ln .5) = -ln .9, over the 1 position where p is known
    assert f["mix_gain_nats"] == (pytest.approx(-math.log(0.9)), 1)
    assert f["mass_kept"] == (pytest.approx((0.9 + 0.75) / 2), 2)


def test_candidate_choices_count_documents_and_sum_weights():
    picked, weights = candidate_choices(np.array([[2.0, 1.0, 1.0], [0.5, 3.0, 1.0]]), "mince")
    assert picked.tolist() == [1, 1, 0] and weights.tolist() == [1.0, 1.0, 0.0]   # ties: the first
    picked, weights = candidate_choices(np.array([[0.0, math.log(3)], [math.log(3), 0.0]]), "avgce")
    assert picked.tolist() == [1, 1]
    np.testing.assert_allclose(weights, [0.75 + 0.25, 0.25 + 0.75])
    picked, weights = candidate_choices(np.zeros((0, 2)), "mince")
    assert picked.tolist() == [0, 0] and weights.tolist() == [0.0, 0.0]
