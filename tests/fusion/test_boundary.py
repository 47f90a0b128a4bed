"""Boundary transfer (FuseLab's own rule): shared next-token starts and longest-prefix projection, by hand."""
import numpy as np
import pytest

from fusion.aligned import align_distribution
from fusion.boundary import boundary_align, prefix_map
from fusion.diagnostics import classify_positions
from fusion.registry import ALIGNMENTS, VOCAB_MAPS
from fusion.tokens import TokenizedText

# "x\n    y": the target spells the newline and the indentation in pieces, the source as one token
TARGET_TEXTS = ["", "x", "\n", "  ", " ", "y", "</s>", "\n"]
SOURCE_TEXTS = ["", "x", "\n    ", "\n", " y", "y", "<eos>"]


def doc(ids, offsets):
    return TokenizedText(ids=np.asarray(ids, dtype=np.int32), tokens=[str(i) for i in ids],
                         offsets=np.asarray(offsets, dtype=np.int64), marker="", n_bytes=7)


TARGET = doc([1, 2, 3, 3, 5, 6], [(0, 1), (1, 2), (2, 4), (4, 6), (6, 7), (7, 7)])
SOURCE = doc([1, 2, 5, 6], [(0, 1), (1, 6), (6, 7), (7, 7)])


def test_registered():
    assert ALIGNMENTS.get("boundary") is boundary_align and VOCAB_MAPS.get("prefix") is prefix_map


def test_prefix_map_longest_prefix_lowest_id():
    # "\n    " -> "\n" (ids 2 and 7 spell it: the lowest); " y" -> " " ("  " is no prefix); "<eos>" and "" -> none
    assert prefix_map(SOURCE_TEXTS, TARGET_TEXTS).source_to_target.tolist() == [-1, 1, 2, 2, 4, 5, -1]


def test_boundary_pairs_shared_next_starts():
    # next-token starts: target t = 0..4 -> 1, 2, 4, 6, 7; source s = 0..2 -> 1, 6, 7
    al = boundary_align(TARGET, SOURCE)
    assert al.pairs.tolist() == [[0, 0], [3, 1], [4, 2]]
    assert al.one_to_one().tolist() == [0, -1, -1, 1, 2, -1]
    assert al.accept == "any"


def test_several_sources_starting_together_are_not_one_to_one():
    # two byte tokens of one character share its span: both "start" at 1
    source = doc([1, 8, 9, 5, 6], [(0, 1), (1, 2), (1, 2), (2, 7), (7, 7)])
    target = doc([1, 2, 5, 6], [(0, 1), (1, 2), (2, 7), (7, 7)])
    al = boundary_align(target, source)
    assert al.pairs.tolist() == [[0, 0], [0, 1], [1, 2], [2, 3]]
    assert al.one_to_one().tolist() == [-1, 2, 3, -1]


def test_aligned_rows_by_hand():
    vm = prefix_map(SOURCE_TEXTS, TARGET_TEXTS)
    ids = np.array([[2, 3, 4], [5, 4, 1], [6, 1, 5], [6, 1, 5]])
    probs = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1], [0.9, 0.05, 0.01], [0.4, 0.3, 0.2]])
    out_ids, out_probs = align_distribution(TARGET, SOURCE, ids, np.log(probs), boundary_align(TARGET, SOURCE), vm)
    # t0 <- s0: "\n    " and "\n" both start the target's "\n" (2): .5 + .3; " y" -> " " (4): .1
    # t1, t2: no shared boundary -> one-hot on the next target token (3, 3); t3 <- s1: 5 .6, 4 .2, 1 .1;
    # t4 <- s2: "<eos>" maps nowhere, 1 .05, 5 .01; t5: the last position, empty
    assert out_ids.tolist() == [[2, 4, 0], [3, 0, 0], [3, 0, 0], [5, 4, 1], [1, 5, 0], [0, 0, 0]]
    np.testing.assert_allclose(out_probs, [[0.8, 0.1, 0], [1, 0, 0], [1, 0, 0], [0.6, 0.2, 0.1], [0.05, 0.01, 0],
                                           [0, 0, 0]], rtol=1e-6)
    # diagnostics see the same acceptance: t0's next spans differ ("\n" vs "\n    "), t3 and t4 are usable
    assert classify_positions(TARGET, SOURCE, ids, boundary_align(TARGET, SOURCE), vm).tolist() == [3, 0, 0, 4, 4, -1]


def test_refuses_different_texts():
    with pytest.raises(ValueError, match="different texts"):
        boundary_align(TARGET, TokenizedText(SOURCE.ids, SOURCE.tokens, SOURCE.offsets, "", n_bytes=9))
