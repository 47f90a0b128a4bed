"""EM and MinED vocabulary maps on hand-computed vocabularies and on the two tiny tokenizers."""
from __future__ import annotations

import editdistance
import numpy as np
import pytest

import fusion.vocab as vocab_module
from fusion.registry import VOCAB_MAPS
from fusion.tokens import normalized_vocab
from fusion.vocab import VocabMap, build_vocab_map, em_map, mined_map


def brute_force_mined(source: list[str], target: list[str]) -> list[int]:
    out = []
    for s in source:
        best, best_id = None, -1
        for idx, t in enumerate(target):
            d = editdistance.eval(s, t)
            if best is None or d < best:  # strict: the first (lowest) id keeps a tie
                best, best_id = d, idx
        out.append(best_id)
    return out


def test_registered():
    assert VOCAB_MAPS.get("em") is em_map
    assert VOCAB_MAPS.get("mined") is mined_map


def test_em_map_exact_text_lowest_id():
    source = ["a", " the", "x", "a", ""]
    target = ["b", " the", "a", "a", "the"]
    result = em_map(source, target)
    assert isinstance(result, VocabMap) and result.method == "em"
    assert result.source_to_target.dtype == np.int32
    # "a" appears at target ids 2 and 3: the lowest wins; "x" and "" are absent
    assert result.source_to_target.tolist() == [2, 1, -1, 2, -1]


def test_mined_map_hand_computed():
    target = ["cat", "cut", "dog", "ca"]
    source = ["cat", "cot", "do", "c", "zzzz"]
    # distances to (cat, cut, dog, ca):
    #   cat  -> (0, 1, 3, 1): exact              -> 0
    #   cot  -> (1, 1, 2, 2): tie cat/cut        -> 0 (lowest id)
    #   do   -> (3, 3, 1, 2)                     -> 2
    #   c    -> (2, 2, 3, 1)                     -> 3
    #   zzzz -> (4, 4, 4, 4): four-way tie       -> 0
    result = mined_map(source, target)
    assert result.method == "mined" and result.source_to_target.dtype == np.int32
    assert result.source_to_target.tolist() == [0, 0, 2, 3, 0]


def test_mined_exact_match_maps_to_itself_even_after_a_closer_looking_id():
    # "abc" is at distance 1 from id 0 but exactly at ids 1 and 2: the first exact id wins
    assert mined_map(["abc", "abd"], ["ab", "abc", "abc"]).source_to_target.tolist() == [1, 0]


def test_mined_ties_across_row_chunks(monkeypatch):
    target = ["cat", "cut", "dog", "ca"]
    source = ["cot", "do", "c", "zzzz", "cut", "dg", "a"]
    # two rows per cdist call, so chunk boundaries fall between rows
    monkeypatch.setattr(vocab_module, "_MINED_CHUNK_BYTES", 2 * 4 * len(target))
    chunked = mined_map(source, target, workers=1).source_to_target.tolist()
    assert chunked == [0, 2, 3, 0, 1, 2, 3] == brute_force_mined(source, target)


def test_mined_empty_target():
    assert mined_map(["a"], []).source_to_target.tolist() == [-1]


def test_marker_normalisation_matches_across_conventions(sp_tokenizer, bpe_tokenizer):
    sp_the = sp_tokenizer.convert_tokens_to_ids("▁the")
    bpe_b = bpe_tokenizer.convert_tokens_to_ids("Ġb")
    sp_b = sp_tokenizer.convert_tokens_to_ids("▁b")
    em = build_vocab_map("em", sp_tokenizer, bpe_tokenizer).source_to_target
    assert em.shape == (len(sp_tokenizer),)
    assert em[sp_b] == bpe_b  # "▁b" and "Ġb" are both " b"
    assert em[sp_the] == bpe_tokenizer.convert_tokens_to_ids("Ġthe")
    reverse = build_vocab_map("em", bpe_tokenizer, sp_tokenizer).source_to_target
    assert reverse[bpe_b] == sp_b


def test_special_tokens_map_by_role(sp_tokenizer, bpe_tokenizer):
    for method in ("em", "mined"):
        mapped = build_vocab_map(method, sp_tokenizer, bpe_tokenizer).source_to_target
        assert mapped[sp_tokenizer.eos_token_id] == bpe_tokenizer.eos_token_id == 0
        assert mapped[sp_tokenizer.bos_token_id] == bpe_tokenizer.bos_token_id == 0
        assert mapped[sp_tokenizer.pad_token_id] == bpe_tokenizer.pad_token_id == 1
        assert mapped[sp_tokenizer.unk_token_id] == -1  # the target has no unk and no "<unk>" text
        # ordinary tokens never land on a special token
        ordinary = np.setdiff1d(np.arange(len(sp_tokenizer)), sp_tokenizer.all_special_ids)
        assert not np.isin(mapped[ordinary], bpe_tokenizer.all_special_ids).any()
    back = build_vocab_map("em", bpe_tokenizer, sp_tokenizer).source_to_target
    assert back[0] == sp_tokenizer.eos_token_id  # id 0 is both bos and eos: eos is the role that counts


def test_build_mined_equals_brute_force_on_tiny_tokenizers(sp_tokenizer, bpe_tokenizer):
    sp_vocab = normalized_vocab(sp_tokenizer)
    bpe_vocab = normalized_vocab(bpe_tokenizer)
    mapped = build_vocab_map("mined", sp_tokenizer, bpe_tokenizer).source_to_target
    sp_special, bpe_special = set(sp_tokenizer.all_special_ids), set(bpe_tokenizer.all_special_ids)
    source_ids = [i for i in range(len(sp_vocab)) if i not in sp_special]
    target_ids = [i for i in range(len(bpe_vocab)) if i not in bpe_special]
    expected = brute_force_mined([sp_vocab[i] for i in source_ids], [bpe_vocab[i] for i in target_ids])
    assert mapped[source_ids].tolist() == [target_ids[e] for e in expected]
    # MinED maps every ordinary token; EM is the subset of exact matches of MinED
    assert (mapped[source_ids] >= 0).all()
    em = build_vocab_map("em", sp_tokenizer, bpe_tokenizer).source_to_target
    kept = em >= 0
    assert (em[kept] == mapped[kept]).all()


def test_unknown_method_names_the_registered_ones(sp_tokenizer, bpe_tokenizer):
    with pytest.raises(KeyError, match=r"unknown vocab map 'fuzzy'.*em, mined"):
        build_vocab_map("fuzzy", sp_tokenizer, bpe_tokenizer)
