import math

import numpy as np
import pytest

from fusion.fuse import Candidate, avgce, avgce_weights, merge_slots, mince
from fusion.registry import FUSIONS


def cand(ids, probs, score):
    return Candidate(np.array(ids, dtype=np.int32), np.array(probs, dtype=np.float32), score)


def test_registered_by_name():
    assert FUSIONS.get("mince") is mince and FUSIONS.get("avgce") is avgce


def test_mince_takes_whole_distribution_of_lowest_score():
    a = cand([[1, 2]], [[0.5, 0.5]], 2.0)
    b = cand([[3, 4]], [[0.7, 0.2]], 1.5)
    c = cand([[5, 6]], [[0.9, 0.1]], 1.5)
    ids, probs = mince([a, b, c], top_k=2)
    np.testing.assert_array_equal(ids, [[3, 4]])     # tie between b and c -> the earlier one
    np.testing.assert_allclose(probs, [[0.7, 0.2]])


def test_mince_tie_keeps_target():
    target = cand([[1, 0]], [[1.0, 0.0]], 1.0)
    source = cand([[2, 3]], [[0.6, 0.4]], 1.0)
    ids, probs = mince([target, source], top_k=2)
    np.testing.assert_array_equal(ids, [[1, 0]])
    np.testing.assert_allclose(probs, [[1.0, 0.0]])


def test_avgce_weights_by_hand():
    np.testing.assert_allclose(avgce_weights([0.0, math.log(3)], "softmax_neg"), [0.75, 0.25])
    e1, e3 = math.exp(1.0), math.exp(1.0 / 3.0)
    np.testing.assert_allclose(avgce_weights([0.0, math.log(3)], "softmax_exp_neg"), [e1 / (e1 + e3), e3 / (e1 + e3)])
    with pytest.raises(ValueError, match="softmax_neg"):
        avgce_weights([1.0], "uniform")


def test_avgce_union_of_ids_and_top_k_cut():
    a = cand([[5, 7], [1, 0]], [[0.6, 0.4], [1.0, 0.0]], 0.0)
    b = cand([[7, 9], [2, 1]], [[0.5, 0.5], [0.5, 0.5]], math.log(3))
    # weights 3/4, 1/4: row 0 -> 5: .45, 7: .3 + .125 = .425, 9: .125; row 1 -> 1: .75 + .125, 2: .125
    ids, probs = avgce([a, b], top_k=2)          # default cut "union": every id kept, width 2 + 2
    np.testing.assert_array_equal(ids, [[5, 7, 9, 0], [1, 2, 0, 0]])
    np.testing.assert_allclose(probs, [[0.45, 0.425, 0.125, 0], [0.875, 0.125, 0, 0]], rtol=1e-6)
    ids2, probs2 = avgce([a, b], top_k=2, cut="top_k")
    np.testing.assert_array_equal(ids2, [[5, 7], [1, 2]])
    np.testing.assert_allclose(probs2, [[0.45, 0.425], [0.875, 0.125]], rtol=1e-6)
    with pytest.raises(ValueError, match="cut must be one of"):
        avgce([a, b], top_k=2, cut="top_p")


def test_avgce_renormalises_each_candidate_before_weighting():
    # issue 14 item 3: {10: .3, 11: .2} (a top-k row with mass .5) and a one-hot {12: 1} at equal scores.
    # The reference renormalises each kept top-k first: {10: .6, 11: .4} and {12: 1}, each weighted 1/2.
    top_k_row = cand([[10, 11]], [[0.3, 0.2]], 1.0)
    one_hot = cand([[12, 0]], [[1.0, 0.0]], 1.0)
    ids, probs = avgce([top_k_row, one_hot], top_k=2)
    np.testing.assert_array_equal(ids, [[12, 10, 11, 0]])
    np.testing.assert_allclose(probs, [[0.5, 0.3, 0.2, 0.0]], rtol=1e-6)
    # an all-zero row (no distribution at that position) contributes nothing and is not divided by zero
    empty = cand([[0, 0]], [[0.0, 0.0]], 1.0)
    ids, probs = avgce([top_k_row, empty], top_k=2, cut="top_k")
    np.testing.assert_array_equal(ids, [[10, 11]])
    np.testing.assert_allclose(probs, [[0.3, 0.2]], rtol=1e-6)


def test_avgce_reference_weights():
    a = cand([[1]], [[1.0]], 0.0)
    b = cand([[2]], [[1.0]], math.log(3))
    ids, probs = avgce([a, b], top_k=2, weights="softmax_exp_neg")
    e1, e3 = math.exp(1.0), math.exp(1.0 / 3.0)
    np.testing.assert_array_equal(ids, [[1, 2]])
    np.testing.assert_allclose(probs, [[e1 / (e1 + e3), e3 / (e1 + e3)]], rtol=1e-6)


def test_merge_slots_ties_and_empty_rows():
    ids, probs = merge_slots(np.array([[4, 3, 4], [0, 0, 0]]), np.array([[0.25, 0.5, 0.25], [0, 0, 0]]), 2)
    np.testing.assert_array_equal(ids, [[3, 4], [0, 0]])   # equal mass 0.5: the lower id first
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0, 0]])


def test_candidates_must_share_positions():
    with pytest.raises(ValueError, match="candidate 1 has 2 positions"):
        mince([cand([[1]], [[1.0]], 0.0), cand([[1], [2]], [[1.0], [1.0]], 1.0)], top_k=1)
