"""Window plans: each convention's windows for small texts, worked out by hand from its written description
(FuseLab's docs; lm-eval's get_rolling_token_windows docstring), and lm-eval's own windows for many sizes."""
from __future__ import annotations

import pytest
from lm_eval import utils as lm_utils

from fusion.windows import describe_windows, plan_windows


def test_strided_windows_score_each_position_once():
    # window 4, stride 2 over 10 positions: windows start at 0, 2, 4, 6; each scores after the previous end
    assert plan_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert plan_windows(3, 8, 4) == [(0, 3, 1)]
    # stride == window: each later window starts one position early, so its first target has a predecessor
    assert plan_windows(10, 4, 4, "strided") == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    assert plan_windows(1, 4, 2) == [] and plan_windows(0, 4, 2) == []
    for n, window, stride in [(2, 4, 4), (37, 8, 3), (100, 16, 16)]:
        plan = plan_windows(n, window, stride)
        assert [t for _, end, first in plan for t in range(first, end)] == list(range(1, n))
        assert all(start < first and end - start <= window for start, end, first in plan)


def test_lm_eval_rolling_windows_by_hand():
    # 9 text tokens after the prefix (positions 1..9), max_length 4: the first window reads the prefix and
    # tokens 1-3 and predicts 1-4; the next predicts 5-8 from the 4 positions before 8 (4-7); the last predicts 9
    # alone, still from the 4 positions before it (5-8)
    assert plan_windows(10, 4, convention="lm_eval_rolling") == [(0, 5, 1), (4, 9, 5), (5, 10, 9)]
    # a text that fits: one window predicting every token; stride plays no part
    assert plan_windows(3, 8, 4, "lm_eval_rolling") == [(0, 3, 1)]
    assert plan_windows(4, 3, convention="lm_eval_rolling") == [(0, 4, 1)]
    # max_length 1: each token from its predecessor alone
    assert plan_windows(4, 1, convention="lm_eval_rolling") == [(0, 2, 1), (1, 3, 2), (2, 4, 3)]
    assert plan_windows(1, 4, convention="lm_eval_rolling") == []


def test_lm_eval_rolling_windows_are_lm_evals_own():
    """lm-eval's windows over token indices (prefix -1, text token i = position i + 1), made disjoint as its
    HFLM.loglikelihood_rolling does: the model reads (context + prediction)[:-1] and scores the predictions."""
    for n_text in range(0, 40):
        for max_length in (1, 2, 3, 5, 8, 13, 64):
            want = []
            for context, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=list(range(n_text)), prefix_token=-1, max_seq_len=max_length, context_len=1)):
                read = [t + 1 for t in (context + pred)[:-1]]
                assert read == list(range(read[0], read[0] + len(read)))
                want.append((read[0], pred[-1] + 2, pred[0] + 1))
            assert plan_windows(n_text + 1, max_length, convention="lm_eval_rolling") == want, (n_text, max_length)


def test_micro_held_out_windows_are_strided_windows():
    """The micro world's held-out bits per byte: non-overlapping windows of seq_len predictions, the window at
    `start` reading [start, start + seq_len) and predicting [start + 1, start + seq_len + 1), i.e. strided windows
    of seq_len + 1 positions with stride seq_len (so the world's recorded figures do not move)."""
    for n in range(0, 50):
        for seq_len in (1, 2, 3, 7, 16, 64):
            want = [(s, min(s + seq_len + 1, n), s + 1) for s in range(0, n - 1, seq_len)]
            assert plan_windows(n, seq_len + 1, seq_len, "strided") == want, (n, seq_len)


def test_bad_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match="0 < stride <= window, got window=4, stride=5"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride=None"):
        plan_windows(10, 4)
    with pytest.raises(ValueError, match="max_length\\) >= 1, got 0"):
        plan_windows(10, 0, convention="lm_eval_rolling")
    with pytest.raises(ValueError, match="unknown window convention 'rolling'; expected one of strided, lm_eval"):
        plan_windows(10, 4, 2, "rolling")


def test_descriptions():
    assert describe_windows(256, 128, "strided") == "FuseLab strided windows (window 256, stride 128)"
    assert describe_windows(512, 128, "lm_eval_rolling") == "lm-eval rolling windows (max length 512)"
    with pytest.raises(ValueError, match="unknown window convention"):
        describe_windows(512, 128, "sliding")
