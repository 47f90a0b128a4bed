"""DTW (reference) and character-offset alignment: hand-computed paths, tie rules, spans, agreement."""
from __future__ import annotations

import json
import random

import editdistance
import numpy as np
import pytest

from fusion.align import Alignment, dtw_align, dtw_tokens, offsets_align
from fusion.registry import ALIGNMENTS
from fusion.tokens import TokenizedText, tokenize_document


def reference_dtw(target: list[str], source: list[str], target_marker: str, source_marker: str) -> list[list[int]]:
    """The reference algorithm written plainly from DESIGN.md section 4, in the reference's own orientation:
    it calls dtw(source_tokens, target_tokens), so matrix rows are SOURCE positions, columns TARGET positions.
    Traceback from the last cell: the cheapest of (diagonal, up = back in the source, left = back in the
    target), ties resolved in that order (first minimum wins). Returns sorted [target_pos, source_pos] pairs."""
    inf = float("inf")
    rows, cols = len(source), len(target)
    acc = [[inf] * (cols + 1) for _ in range(rows + 1)]
    acc[0][0] = 0
    for r in range(rows):
        for c in range(cols):
            cost = editdistance.eval(source[r].replace(source_marker, ""), target[c].replace(target_marker, ""))
            acc[r + 1][c + 1] = cost + min(acc[r][c + 1], acc[r + 1][c], acc[r][c])
    r, c, path = rows - 1, cols - 1, [(rows - 1, cols - 1)]
    while r > 0 or c > 0:
        options = [acc[r][c] if r > 0 and c > 0 else inf,     # diagonal
                   acc[r][c + 1] if r > 0 else inf,          # up: one source position back
                   acc[r + 1][c] if c > 0 else inf]          # left: one target position back
        move = options.index(min(options))
        r, c = (r - 1, c - 1) if move == 0 else (r - 1, c) if move == 1 else (r, c - 1)
        path.append((r, c))
    return sorted([t, s] for s, t in path)


def doc(offsets: list[tuple[int, int]], tokens: list[str] | None = None, marker: str = "",
        n_bytes: int = 11) -> TokenizedText:
    tokens = tokens if tokens is not None else [f"t{i}" for i in range(len(offsets))]
    return TokenizedText(ids=np.arange(len(offsets), dtype=np.int32), tokens=tokens,
                         offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2), marker=marker, n_bytes=n_bytes)


def test_registered():
    assert ALIGNMENTS.get("dtw") is dtw_align
    assert ALIGNMENTS.get("offsets") is offsets_align


# ---------------------------------------------------------------- DTW, hand-computed
def test_dtw_identical_sequences_markers_stripped():
    # cost [[0, 1], [1, 0]] once "▁"/"Ġ" are removed -> the diagonal
    result = dtw_tokens(["▁a", "▁b"], ["Ġa", "Ġb"], "▁", "Ġ")
    assert result.pairs.dtype == np.int32
    assert result.pairs.tolist() == [[0, 0], [1, 1]]
    assert (result.n_target, result.n_source) == (2, 2)


def test_dtw_one_to_many():
    # one target token "ab" against source "a", "b": D = [[1, 2]], the path walks left from (0, 1)
    result = dtw_tokens(["▁ab"], ["Ġa", "b"], "▁", "Ġ")
    assert result.pairs.tolist() == [[0, 0], [0, 1]]
    assert result.one_to_one().tolist() == [-1]


def test_dtw_many_to_one():
    # D = [[1], [2]]: up from (1, 0)
    result = dtw_tokens(["▁a", "b"], ["Ġab"], "▁", "Ġ")
    assert result.pairs.tolist() == [[0, 0], [1, 0]]
    assert result.one_to_one().tolist() == [0, 0]


def test_dtw_tie_all_three_takes_diagonal():
    # all costs 0, D = [[0, 0], [0, 0]]: at (1, 1) diag = up = left = 0 -> diagonal
    assert dtw_tokens(["a", "a"], ["a", "a"], "", "").pairs.tolist() == [[0, 0], [1, 1]]


def test_dtw_tie_diagonal_up_takes_diagonal():
    # cost [[1, 0], [1, 0]], D = [[1, 1], [2, 1]]: at (1, 1) diag 1 = up 1 < left 2 -> diagonal
    assert dtw_tokens(["a", "a"], ["b", "a"], "", "").pairs.tolist() == [[0, 0], [1, 1]]


def test_dtw_tie_diagonal_left_takes_diagonal():
    # cost [[0, 1], [0, 1]], D = [[0, 1], [0, 1]]: at (1, 1) diag 0 = left 0 < up 1 -> diagonal
    assert dtw_tokens(["a", "a"], ["a", "b"], "", "").pairs.tolist() == [[0, 0], [1, 1]]


def test_dtw_tie_up_left_steps_back_in_the_source():
    # target a b a, source b a b (markers on some tokens must not matter):
    # cost [[1,0,1],[0,1,0],[1,0,1]] (rows target); D = [[1,1,2],[1,2,1],[2,1,2]]
    # (2,2): diag D11=2, target-back D12=1, source-back D21=1: a tie between the two single steps; the reference
    # (rows = source) takes its "up", one SOURCE position back -> (2,1); (2,1): diag D10=1 < D11=2, D20=2 -> (1,0);
    # (1,0): only target-back -> (0,0)
    result = dtw_tokens(["▁a", "b", "▁a"], ["Ġb", "a", "Ġb"], "▁", "Ġ")
    assert result.pairs.tolist() == [[0, 0], [1, 0], [2, 1], [2, 2]]
    assert result.one_to_one().tolist() == [0, 0, -1]


def test_dtw_tie_issue_14_reproducer():
    # issue 14: source ['ba','ab','ba'], target ['b','ba','a']: reference target-to-source [[0], [0], [1, 2]]
    result = dtw_tokens(["b", "ba", "a"], ["ba", "ab", "ba"], "", "")
    per_target = [result.pairs[result.pairs[:, 0] == t, 1].tolist() for t in range(3)]
    assert per_target == [[0], [0], [1, 2]]


def test_dtw_removes_every_marker_occurrence():
    # "▁▁" stripped is "" and costs 1 against "a" (insert), 0 against "Ġ" -> ""
    assert dtw_tokens(["▁▁", "▁a"], ["Ġ", "Ġa"], "▁", "Ġ").pairs.tolist() == [[0, 0], [1, 1]]


def test_dtw_empty():
    result = dtw_tokens([], ["a"], "", "")
    assert result.pairs.shape == (0, 2) and result.one_to_one().tolist() == []


def test_dtw_matches_reference_on_random_sequences():
    rng = random.Random(7)
    target_pool = ["▁a", "b", "▁ab", "c", "▁", "ba", "▁the", "ing"]
    source_pool = ["Ġa", "b", "Ġab", "c", "Ġ", "abc", "Ġthe", "in", "g"]
    for _ in range(200):
        target = [rng.choice(target_pool) for _ in range(rng.randint(1, 14))]
        source = [rng.choice(source_pool) for _ in range(rng.randint(1, 14))]
        assert dtw_tokens(target, source, "▁", "Ġ").pairs.tolist() == reference_dtw(target, source, "▁", "Ġ")


def test_dtw_matches_reference_on_tie_heavy_sequences():
    # one- and two-letter tokens over a two-letter alphabet: equal-cost steps at almost every cell
    rng = random.Random(11)
    pool = ["a", "b", "ab", "ba", "aa"]
    for _ in range(500):
        target = [rng.choice(pool) for _ in range(rng.randint(1, 9))]
        source = [rng.choice(pool) for _ in range(rng.randint(1, 9))]
        assert dtw_tokens(target, source, "", "").pairs.tolist() == reference_dtw(target, source, "", "")


# ---------------------------------------------------------------- offsets, hand-made spans
def test_offsets_nested_and_eos():
    # "hello world": target hello | " world" | EOS, source hel | lo | " " | world | EOS
    target = doc([(0, 5), (5, 11), (11, 11)])
    source = doc([(0, 3), (3, 5), (5, 6), (6, 11), (11, 11)])
    result = offsets_align(target, source)
    assert result.pairs.dtype == np.int32
    assert result.pairs.tolist() == [[0, 0], [0, 1], [1, 2], [1, 3], [2, 4]]
    assert result.one_to_one().tolist() == [-1, -1, 4]
    back = offsets_align(source, target)
    assert back.pairs.tolist() == [[0, 0], [1, 0], [2, 1], [3, 1], [4, 2]]
    assert back.one_to_one().tolist() == [0, 0, 1, 1, 2]


def test_offsets_crossing_boundaries():
    # target [0,4) [4,11) vs source [0,3) [3,5) [5,11): source 1 straddles the target boundary
    result = offsets_align(doc([(0, 4), (4, 11)]), doc([(0, 3), (3, 5), (5, 11)]))
    assert result.pairs.tolist() == [[0, 0], [0, 1], [1, 1], [1, 2]]


def test_offsets_zero_width_tokens():
    # target: BOS (0,0), "ab" [0,2), trimmed marker-only token (2,2), "cd" [2,4), EOS (4,4)
    # source: "a" [0,1), "bc" [1,3), "d" [3,4), EOS (4,4)
    target = doc([(0, 0), (0, 2), (2, 2), (2, 4), (4, 4)])
    source = doc([(0, 1), (1, 3), (3, 4), (4, 4)])
    result = offsets_align(target, source)
    # BOS covers the point 0 -> "a"; the zero-width token at 2 lies inside "bc"; EOS only with EOS
    assert result.pairs.tolist() == [[0, 0], [1, 0], [1, 1], [2, 1], [3, 1], [3, 2], [4, 3]]
    assert result.one_to_one().tolist() == [0, -1, 1, -1, 3]


def test_offsets_eos_without_source_eos_is_unaligned():
    result = offsets_align(doc([(0, 2), (2, 2)]), doc([(0, 1), (1, 2)]))
    assert result.pairs.tolist() == [[0, 0], [0, 1]]
    assert result.one_to_one().tolist() == [-1, -1]


def test_offsets_byte_tokens_sharing_a_character():
    # byte-level splits "é" [1,2) into two byte tokens with the same span
    target = doc([(0, 1), (1, 2), (1, 2), (2, 3), (3, 3)])
    source = doc([(0, 2), (2, 3), (3, 3)])
    result = offsets_align(target, source)
    assert result.pairs.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 2]]
    assert offsets_align(source, target).pairs.tolist() == [[0, 0], [0, 1], [0, 2], [1, 3], [2, 4]]


def test_offsets_non_monotone_source_falls_back_to_dense():
    # source ends 5, 4, 11 are not sorted: the dense path must still find every overlap
    result = offsets_align(doc([(0, 5), (5, 11)]), doc([(0, 5), (3, 4), (5, 11)]))
    assert result.pairs.tolist() == [[0, 0], [0, 1], [1, 2]]


def test_offsets_refuses_different_texts():
    with pytest.raises(ValueError, match=r"different texts \(11 vs 12 utf-8 bytes\)"):
        offsets_align(doc([(0, 11)]), doc([(0, 12)], n_bytes=12))


def test_one_to_one_rule():
    alignment = Alignment(pairs=np.array([[0, 0], [1, 1], [1, 2], [2, 3], [3, 3]], dtype=np.int32),
                          n_target=5, n_source=4)
    # 1-to-1, 1-to-many, many-to-1 (twice), and an unaligned position
    assert alignment.one_to_one().tolist() == [0, -1, 3, 3, -1]


# ---------------------------------------------------------------- on real tokenizers
def test_offsets_and_dtw_agree_where_tokenizations_coincide(sp_tokenizer, bpe_tokenizer):
    text = "hello world"
    target = tokenize_document(sp_tokenizer, text)   # ▁hello ▁wor l d </s>
    source = tokenize_document(bpe_tokenizer, text)  # hello Ġwor l d <|endoftext|>
    assert [t.replace("▁", "") for t in target.tokens[:-1]] == [s.replace("Ġ", "") for s in source.tokens[:-1]]
    identity = [[i, i] for i in range(5)]
    assert offsets_align(target, source).pairs.tolist() == identity
    assert dtw_align(target, source).pairs.tolist() == identity


def test_offsets_equal_dense_overlap_on_real_text(shared_data, sp_tokenizer, bpe_tokenizer):
    line = json.loads((shared_data / "text" / "lambada_openai.llmfoundry.jsonl").open().readline())
    text = line["context"] + line["continuation"]
    target = tokenize_document(sp_tokenizer, text)
    source = tokenize_document(bpe_tokenizer, text)
    result = offsets_align(target, source)

    def points(offsets):
        start = 2 * offsets[:, 0]
        return start, np.maximum(2 * offsets[:, 1], start + 1)

    ts, te = points(target.offsets)
    ss, se = points(source.offsets)
    dense = np.argwhere((ts[:, None] < se[None, :]) & (ss[None, :] < te[:, None]))
    assert result.pairs.tolist() == dense.tolist()
    # every target token is aligned to something, and the last pair is EOS with EOS
    assert np.unique(result.pairs[:, 0]).tolist() == list(range(len(target)))
    assert result.pairs[-1].tolist() == [len(target) - 1, len(source) - 1]
    # DTW on the same documents is the reference path
    assert dtw_align(target, source).pairs.tolist() == reference_dtw(target.tokens, source.tokens, "▁", "Ġ")


@pytest.mark.parametrize("n, m", [(1, 1), (1, 7), (7, 1), (40, 33)])
def test_dtw_shapes(n, m):
    rng = random.Random(n * 100 + m)
    target = ["".join(rng.choices("ab▁", k=rng.randint(1, 3))) for _ in range(n)]
    source = ["".join(rng.choices("abĠ", k=rng.randint(1, 3))) for _ in range(m)]
    pairs = dtw_tokens(target, source, "▁", "Ġ").pairs
    assert pairs.tolist() == reference_dtw(target, source, "▁", "Ġ")
    assert pairs[0].tolist() == [0, 0] and pairs[-1].tolist() == [n - 1, m - 1]
    steps = np.diff(pairs, axis=0)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(axis=1) >= 1).all()
