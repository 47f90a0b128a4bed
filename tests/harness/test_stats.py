"""Bootstrap intervals, sign-flip paired tests and seed intervals: exact values enumerated by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.stats import (
    bootstrap_interval,
    estimate,
    mean_scores,
    paired_comparisons,
    paired_test,
    score_intervals,
    seed_interval,
    sign_flip_p_value,
    significance_mark,
)


def test_sign_flip_p_value_enumerated_by_hand():
    # differences 1, 2, 3: the 8 sign patterns sum to 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 for 2 of 8
    t = paired_test(mean_scores([[1.0, 2.0, 3.0]]), mean_scores([[0.0, 0.0, 0.0]]))
    assert t.difference == 2.0 and t.p_value == 0.25 and t.exact and t.n == 3
    # five equal differences: only all-plus and all-minus are as extreme: 2 / 32
    assert sign_flip_p_value(np.ones(5)) == (2 / 32, True)


def test_sign_flip_weights_follow_the_strata():
    # suite of two tasks: task 1 one item (difference 1), task 2 three items (1, 1, -1).
    # difference of suite averages = (1/1 + 1/3) / 2 = 2/3; contributions 1/2, 1/6, 1/6, -1/6.
    # with the first sign +: 1, 2/3 (x3), 1/3 (x3), 0; with -: the negatives: |T| >= 2/3 in 8 of 16 patterns.
    a = mean_scores([[1.0], [1.0, 1.0, 0.0]])
    b = mean_scores([[0.0], [0.0, 0.0, 1.0]])
    t = paired_test(a, b)
    assert t.difference == pytest.approx(2 / 3, rel=1e-12)
    assert t.p_value == 0.5 and t.exact


def test_every_item_agrees():
    a = mean_scores([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0]])
    t = paired_test(a, a)
    assert (t.difference, t.lo, t.hi, t.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert significance_mark(t.p_value) == ""


def test_many_units_use_monte_carlo_with_the_plus_one_rule():
    # 20 equal differences: exact p = 2 / 2^20; 10000 random flips almost surely hit none: (1 + 0) / (1 + 10000)
    p, exact = sign_flip_p_value(np.ones(20), n_permutations=10000, seed=0)
    assert not exact and p == 1 / 10001
    assert sign_flip_p_value(np.ones(20), exact_max_units=20) == (2 / 2 ** 20, True)
    assert significance_mark(p) == "***" and significance_mark(0.005) == "**" and significance_mark(0.04) == "*"
    assert significance_mark(0.05) == "" and significance_mark(float("nan")) == ""


def test_bootstrap_on_a_constant_vector_has_zero_width():
    iv = bootstrap_interval(mean_scores([[0.25] * 8]), seed=3)
    assert (iv.estimate, iv.lo, iv.hi, iv.n) == (0.25, 0.25, 0.25, 8)


def test_bootstrap_of_two_items_spans_both():
    # items 0 and 1: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1 (each end holds 25% of the mass)
    iv = bootstrap_interval(mean_scores([[0.0, 1.0]]), n_resamples=2000, seed=0)
    assert (iv.estimate, iv.lo, iv.hi) == (0.5, 0.0, 1.0)
    assert bootstrap_interval(mean_scores([[0.0, 1.0]]), seed=0) == iv  # seeded: the same numbers


def test_bits_per_byte_is_a_ratio_of_sums_over_documents():
    # domain 1: 8 + 24 bits over 4 + 12 bytes = 2 bits/byte in every resample (each document is 2 bits/byte);
    # domain 2: 10 bits / 10 bytes = 1. bpb_avg = (2 + 1) / 2
    strata = [(np.array([8.0, 24.0]), np.array([4.0, 12.0])), (np.array([10.0]), np.array([10.0]))]
    assert estimate(strata) == 1.5
    iv = bootstrap_interval(strata)
    assert (iv.lo, iv.hi, iv.n) == (1.5, 1.5, 3)
    # one document that differs cannot be significant: the two sign patterns are equally extreme
    t = paired_test([(np.array([10.0, 30.0]), np.array([10.0, 10.0]))],
                    [(np.array([10.0, 10.0]), np.array([10.0, 10.0]))])
    assert t.difference == 1.0 and t.p_value == 1.0
    with pytest.raises(ValueError, match="stratum 0 does not hold the same units"):
        paired_test([(np.array([1.0]), np.array([2.0]))], [(np.array([1.0]), np.array([3.0]))])


def test_seed_interval_is_student_t():
    iv = seed_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2 dof) = 4.303 (tables)
    assert iv.estimate == 2.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    one = seed_interval([0.5])
    assert one.estimate == 0.5 and math.isnan(one.lo) and math.isnan(one.hi)


def _frames():
    """Two models on a suite of two tasks (4 and 2 items) and one held-out domain of 3 documents."""
    a_items = {"t1": [1, 1, 0, 1], "t2": [1, 0]}  # task means 0.75, 0.5: suite 0.625
    b_items = {"t1": [0, 1, 0, 1], "t2": [0, 0]}  # 0.5, 0: suite 0.25
    long, items, docs = [], [], []
    for model, per_task in (("a", a_items), ("b", b_items)):
        for task, vals in per_task.items():
            long.append((model, "s", task, "acc", float(np.mean(vals)), 0.1, len(vals), "", True, "task"))
            long.append((model, "s", task, "acc_norm", 0.0, 0.1, len(vals), "", False, "task"))
            items += [(model, "s", task, "acc", i, float(v)) for i, v in enumerate(vals)]
    for model, bits in (("a", [4.0, 4.0, 8.0]), ("b", [8.0, 8.0, 8.0])):
        nats = [x * math.log(2) for x in bits]
        docs += [(model, "d", i, 3, 4, n) for i, n in enumerate(nats)]
        long.append((model, "perplexity", "d", "bits_per_byte", sum(bits) / 12, float("nan"), 9, "", None, None))
    long = pd.DataFrame(long, columns=["model", "suite", "task", "metric", "value", "stderr", "n", "note",
                                       "primary", "level"])
    items = pd.DataFrame(items, columns=["model", "suite", "task", "metric", "doc_id", "value"])
    docs = pd.DataFrame(docs, columns=["model", "domain", "doc", "n_tokens", "n_bytes", "nll_nats"])
    return long, items, docs


def test_score_intervals_and_paired_comparisons_from_frames():
    long, items, docs = _frames()
    iv = score_intervals(long, items, docs, ["a", "b"]).set_index(["model", "score"])
    assert iv.loc[("a", "s"), "estimate"] == 0.625 and iv.loc[("a", "s"), "n"] == 6
    assert iv.loc[("a", "s"), "n_strata"] == 2
    assert iv.loc[("a", "s"), "lo"] <= 0.625 <= iv.loc[("a", "s"), "hi"]
    assert iv.loc[("a", "s"), "lmeval_stderr"] == pytest.approx(math.sqrt(0.02) / 2, rel=1e-12)
    assert iv.loc[("b", "bpb_d"), "estimate"] == pytest.approx(2.0, rel=1e-12)  # 24 bits / 12 bytes, constant
    assert iv.loc[("b", "bpb_d"), "lo"] == iv.loc[("b", "bpb_d"), "hi"] == iv.loc[("b", "bpb_d"), "estimate"]
    assert iv.loc[("a", "bpb_avg"), "estimate"] == pytest.approx(16 / 12, rel=1e-12)
    cmp = paired_comparisons(long, items, docs, ["a", "b"], {"target": "b"}).set_index("score")
    assert list(cmp.model.unique()) == ["a"]
    # suite: differences t1 (1, 0, 0, 0), t2 (1, 0): contributions 1/8 and 1/4, the rest 0: |sum| = 3/8
    # only for the two patterns with equal signs: p = 2/4
    assert cmp.loc["s", "difference"] == pytest.approx(0.375, rel=1e-12) and cmp.loc["s", "p_value"] == 0.5
    # bits per byte: differences -4, -4, 0 bits over 12 bytes: 2 non-zero, equal: p = 2/4
    assert cmp.loc["bpb_d", "difference"] == pytest.approx(-8 / 12, rel=1e-12)
    assert cmp.loc["bpb_d", "p_value"] == 0.5 and cmp.loc["bpb_d", "mark"] == ""


def test_no_interval_where_items_do_not_give_the_task_score():
    long, items, docs = _frames()
    wrong = items.copy()
    wrong.loc[(wrong.model == "a") & (wrong.task == "t2"), "value"] = 1.0  # mean 1, task reported 0.5
    iv = score_intervals(long, wrong, docs.iloc[:0], ["a"]).set_index("score")
    assert math.isnan(iv.loc["s", "lo"]) and iv.loc["s", "n"] == 0
    assert math.isnan(iv.loc["bpb_d", "lo"])  # no per-document rows: no interval either
