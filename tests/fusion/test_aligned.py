import numpy as np
import pytest

from fusion.align import Alignment
from fusion.aligned import align_distribution
from fusion.tokens import TokenizedText
from fusion.vocab import VocabMap


def text(ids):
    ids = np.array(ids, dtype=np.int32)
    return TokenizedText(ids=ids, tokens=[f"t{i}" for i in ids], offsets=np.zeros((len(ids), 2), np.int64),
                         marker="▁", n_bytes=len(ids))


TARGET = text([10, 11, 12, 13])
SOURCE = text([20, 21, 22])
S2T = np.full(30, -1, dtype=np.int32)
S2T[[20, 21, 22, 25, 26, 27]] = [10, 11, 13, 12, 12, 14]
VOCAB = VocabMap(S2T, "em")
SRC_IDS = np.array([[25, 26, 28], [27, 20, 21], [21, 20, 29]], dtype=np.int32)
SRC_LOGPROBS = np.log(np.array([[0.5, 0.25, 0.125], [0.4, 0.3, 0.2], [0.5, 0.25, 0.125]], dtype=np.float32))


def alignment(pairs, n_t=4, n_s=3):
    return Alignment(np.array(pairs, dtype=np.int32), n_t, n_s)


def run(pairs, **kw):
    return align_distribution(TARGET, SOURCE, SRC_IDS, SRC_LOGPROBS, alignment(pairs), VOCAB, **kw)


def test_one_to_one_and_many_to_one():
    # t2 shares s1 with t1 (many-to-1, still 1-to-1 from the target's side) but s1 maps to 11, not 12 -> one-hot
    ids, probs = run([(0, 0), (1, 1), (2, 1), (3, 2)])
    np.testing.assert_array_equal(ids, [[12, 0, 0], [14, 10, 11], [13, 0, 0], [11, 10, 0]])
    np.testing.assert_allclose(probs, [[0.75, 0, 0], [0.4, 0.3, 0.2], [1, 0, 0], [0.5, 0.25, 0]], rtol=1e-6)
    assert ids.dtype == np.int32 and probs.dtype == np.float32


def test_duplicate_ids_first_is_reference():
    ids, probs = run([(0, 0), (1, 1), (2, 1), (3, 2)], duplicate_ids="first")
    np.testing.assert_array_equal(ids[0], [12, 0, 0])
    np.testing.assert_allclose(probs[0], [0.5, 0, 0], rtol=1e-6)


def test_current_token_fallback_is_reference_bug():
    ids, probs = run([(0, 0), (1, 1), (2, 1), (3, 2)], fallback_onehot="current_token")
    np.testing.assert_array_equal(ids[2], [12, 0, 0])
    np.testing.assert_allclose(probs[2], [1, 0, 0])


def test_one_to_many_falls_back_and_last_position_is_empty():
    # t1 -> {s1, s2} (1-to-many): one-hot; t3 -> s1 maps to 11 != 13: last position, next_token -> all zero
    ids, probs = run([(0, 0), (1, 1), (1, 2), (2, 2), (3, 1)])
    np.testing.assert_array_equal(ids, [[12, 0, 0], [12, 0, 0], [13, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(probs, [[0.75, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], rtol=1e-6)
    ids_ref, probs_ref = run([(0, 0), (1, 1), (1, 2), (2, 2), (3, 1)], fallback_onehot="current_token")
    np.testing.assert_array_equal(ids_ref[:, 0], [12, 11, 12, 13])
    np.testing.assert_allclose(probs_ref[1:, 0], [1, 1, 1])


def test_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="alignment is for 4 target x 2 source"):
        align_distribution(TARGET, SOURCE, SRC_IDS, SRC_LOGPROBS, alignment([(0, 0)], 4, 2), VOCAB)
    with pytest.raises(ValueError, match="source document ids reach 22 but the vocab map covers 21"):
        align_distribution(TARGET, SOURCE, SRC_IDS, SRC_LOGPROBS, alignment([(0, 0)]), VocabMap(S2T[:21], "em"))
    with pytest.raises(ValueError, match="fallback_onehot"):
        run([(0, 0)], fallback_onehot="previous")


def test_topk_ids_in_padded_embedding_rows_are_unmapped():
    """A source whose embedding matrix is larger than its tokenizer may put padding ids in its top-k."""
    import numpy as np

    from fusion.align import Alignment
    from fusion.aligned import align_distribution
    from fusion.tokens import TokenizedText
    from fusion.vocab import VocabMap

    def tt(ids):
        n = len(ids)
        return TokenizedText(np.array(ids, np.int32), [f"t{i}" for i in ids],
                             np.array([[i, i + 1] for i in range(n)]), "", n)

    target, source = tt([5, 6]), tt([1, 2])
    vm = VocabMap(np.array([-1, 5, 6, 7], np.int32), "em")  # 4 source tokens; the model has 10 rows
    al = Alignment(np.array([[0, 0], [1, 1]], np.int32), 2, 2)
    ids = np.array([[2, 9], [3, 8]], np.int32)  # 9 and 8 are padding rows
    lp = np.log(np.array([[0.6, 0.3], [0.5, 0.4]], np.float32))
    out_ids, out_p = align_distribution(target, source, ids, lp, al, vm)
    assert out_ids.tolist() == [[6, 0], [7, 0]]
    np.testing.assert_allclose(out_p, [[0.6, 0.0], [0.5, 0.0]], rtol=1e-6)


def tokenized(ids, tokens, marker):
    return TokenizedText(ids=np.array(ids, dtype=np.int32), tokens=tokens, offsets=np.zeros((len(ids), 2), np.int64),
                         marker=marker, n_bytes=len(ids))


# "def x": a sentencepiece target spells the first word "▁def", a byte-level source "def"
DEF_TARGET = tokenized([11, 12, 2], ["▁def", "▁x", "</s>"], "▁")
DEF_SOURCE = tokenized([100, 101, 0], ["def", "Ġx", "<|endoftext|>"], "Ġ")
DEF_S2T = np.full(110, -1, dtype=np.int32)
DEF_S2T[[0, 101, 102, 103]] = [2, 12, 11, 5]            # 100 "def" is unmapped as it stands
DEF_PREFIXED = DEF_S2T.copy()
DEF_PREFIXED[[100, 101]] = [11, 40]                      # "▁def" is the target's 11
DEF_VOCAB = VocabMap(DEF_S2T, "em", DEF_PREFIXED)
DEF_IDS = np.array([[102, 103], [101, 100], [0, 102]], dtype=np.int32)
DEF_LP = np.log(np.array([[0.5, 0.25], [0.6, 0.2], [0.9, 0.05]], dtype=np.float32))


def run_def(target=DEF_TARGET, source=DEF_SOURCE, vocab=DEF_VOCAB, **kw):
    al = alignment([(0, 0), (1, 1), (2, 2)], 3, 3)
    return align_distribution(target, source, DEF_IDS, DEF_LP, al, vocab, **kw)


def test_position0_prepend_marker_accepts_the_first_word():
    ids, probs = run_def()  # strict: "def" != "▁def" -> one-hot on the next token (12)
    np.testing.assert_array_equal(ids, [[12, 0], [12, 0], [2, 11]])
    np.testing.assert_allclose(probs, [[1, 0], [0.6, 0], [0.9, 0.05]], rtol=1e-6)
    ids, probs = run_def(position0="prepend_marker")
    np.testing.assert_array_equal(ids, [[11, 5], [12, 0], [2, 11]])
    np.testing.assert_allclose(probs, [[0.5, 0.25], [0.6, 0], [0.9, 0.05]], rtol=1e-6)


def test_position0_rule_needs_its_condition():
    # the source token already has its marker: compared as it stands (101 -> 12 != 11), not via prefixed (40)
    source = tokenized([101, 101, 0], ["Ġx", "Ġx", "<|endoftext|>"], "Ġ")
    ids, _ = run_def(source=source, position0="prepend_marker")
    assert ids[0].tolist() == [12, 0]
    # the target token has no marker ("def" at 11): the rule does not apply, 100 stays unmapped -> one-hot
    target = tokenized([11, 12, 2], ["def", "▁x", "</s>"], "▁")
    ids, _ = run_def(target=target, position0="prepend_marker")
    assert ids[0].tolist() == [12, 0]
    # only position 0: the same pair at position 1 is not rescued
    target = tokenized([12, 11, 2], ["▁x", "▁def", "</s>"], "▁")
    source = tokenized([101, 100, 0], ["Ġx", "def", "<|endoftext|>"], "Ġ")
    ids, _ = run_def(target=target, source=source, position0="prepend_marker")
    assert ids[1].tolist() == [2, 0]
    with pytest.raises(ValueError, match="prefixed_to_target"):
        run_def(vocab=VocabMap(DEF_S2T, "em"), position0="prepend_marker")


def test_empty_rows_take_the_target_distribution():
    # position 1 is accepted (101 -> 12) but none of its top-k ids maps into the target vocabulary
    s2t = DEF_S2T.copy()
    top_ids = np.array([[102, 103], [100, 109], [0, 102]], dtype=np.int32)    # 100 and 109 are unmapped
    target_ids = np.array([[7, 8], [5, 9], [2, 3]], dtype=np.int32)
    target_lp = np.log(np.array([[0.7, 0.1], [0.3, 0.45], [0.8, 0.1]], dtype=np.float32))
    al = alignment([(0, 0), (1, 1), (2, 2)], 3, 3)
    vocab = VocabMap(s2t, "em", DEF_PREFIXED)
    ids, probs = align_distribution(DEF_TARGET, DEF_SOURCE, top_ids, DEF_LP, al, vocab)
    assert ids[1].tolist() == [0, 0] and probs[1].tolist() == [0, 0]           # "zero": the loss skips it
    ids, probs = align_distribution(DEF_TARGET, DEF_SOURCE, top_ids, DEF_LP, al, vocab, empty_rows="target",
                                    target_ids=target_ids, target_logprobs=target_lp)
    np.testing.assert_array_equal(ids, [[12, 0], [9, 5], [2, 11]])             # row 1: the target's own, sorted
    np.testing.assert_allclose(probs, [[1, 0], [0.45, 0.3], [0.9, 0.05]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"empty_rows='target' needs the target model's own top-k.*\[n_target=3"):
        align_distribution(DEF_TARGET, DEF_SOURCE, top_ids, DEF_LP, al, vocab, empty_rows="target")
