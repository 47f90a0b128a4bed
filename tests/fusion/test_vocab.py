"""EM and MinED vocabulary maps on hand-computed vocabularies and on the two tiny tokenizers."""
from __future__ import annotations

import editdistance
import numpy as np
import pytest

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import fusion.vocab as vocab_module
from fusion.align import dtw_align
from fusion.aligned import align_distribution
from fusion.registry import VOCAB_MAPS
from fusion.tokens import normalized_vocab, tokenize_document
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


# --- hand-built tokenizers: every id known, so every expected map is written down by hand -----------------

BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 characters in code-point order


def byte_level_from_vocab(specials: list[str], tokens: list[str], merges: list[tuple[str, str]]):
    """Byte-level BPE whose ids are specials, then `tokens`, in that order; eos = "<|endoftext|>", pad = "<pad>"
    when listed; no bos, no unk."""
    vocab = {t: i for i, t in enumerate([*specials, *tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    pad = {"pad_token": "<pad>"} if "<pad>" in specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **pad)


def sentencepiece_from_vocab(tokens: list[str], merges: list[tuple[str, str]]):
    """Metaspace BPE with byte fallback; ids 0-2 are <unk> <s> </s>, then `tokens`."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def omega_pair():
    """Two byte-level tokenizers that both spell " Ω" (bytes 20 CE A9) as ["ĠÎ", "©"], with other ids:
    the source lists its alphabet in code-point order, the target puts two merges first and the alphabet
    in reverse order after a "<pad>"."""
    merges = [("Ġ", "Î"), ("Ġ", "a")]
    source = byte_level_from_vocab(["<|endoftext|>"], [*BYTE_ALPHABET, "ĠÎ", "Ġa"], merges)
    target = byte_level_from_vocab(["<pad>", "<|endoftext|>"], ["Ġa", "ĠÎ", *BYTE_ALPHABET[::-1]], merges)
    return source, target


def test_omega_byte_tokens_map_to_themselves(omega_pair):
    """Issue 14 item 2: " Ω" tokenizes identically under both; each byte token maps to the same token (the
    old U+FFFD decoding sent "©" and every other lone byte >= 0x80 to one target id)."""
    source, target = omega_pair
    assert source.tokenize(" Ω") == target.tokenize(" Ω") == ["ĠÎ", "©"]
    # target ids: <pad> 0, <|endoftext|> 1, Ġa 2, ĠÎ 3, then the alphabet reversed: char c at 4 + (255 - rank(c))
    rank = {c: i for i, c in enumerate(BYTE_ALPHABET)}
    assert target.convert_tokens_to_ids(["ĠÎ", "©", "Î"]) == [3, 4 + 255 - rank["©"], 4 + 255 - rank["Î"]]
    for method in ("em", "mined"):
        mapped = build_vocab_map(method, source, target).source_to_target
        # source ids: <|endoftext|> 0, alphabet 1..256, ĠÎ 257, Ġa 258: every token is in the target verbatim
        expected = [1] + [4 + 255 - i for i in range(256)] + [3, 2]
        assert mapped.tolist() == expected
        assert mapped[source.convert_tokens_to_ids("ĠÎ")] == 3
        assert mapped[source.convert_tokens_to_ids("©")] == target.convert_tokens_to_ids("©")


def test_omega_positions_use_the_source_distribution(omega_pair):
    source, target = omega_pair
    tt, st = tokenize_document(target, " Ω"), tokenize_document(source, " Ω")
    vm = build_vocab_map("em", source, target)
    src_ids = np.array([[source.convert_tokens_to_ids("©"), 5], [0, 6], [0, 7]], dtype=np.int32)
    src_lp = np.log(np.array([[0.75, 0.25]] * 3, dtype=np.float32))
    # DTW (the reference alignment): character offsets cannot pair them 1-to-1, since "ĠÎ" and "©" share Ω's span
    ids, probs = align_distribution(tt, st, src_ids, src_lp, dtw_align(tt, st), vm)
    # position 0 ("ĠÎ") is accepted: its top-k moves over (not the fallback one-hot on "©" with probability 1)
    assert ids[0].tolist() == [target.convert_tokens_to_ids("©"), vm.source_to_target[5]]
    np.testing.assert_allclose(probs[0], [0.75, 0.25], rtol=1e-6)
    assert ids[1].tolist() == [1, vm.source_to_target[6]]  # "©" accepted too: eos first, then id 6's target
    np.testing.assert_allclose(probs[1], [0.75, 0.25], rtol=1e-6)


def test_byte_fallback_pieces_compare_as_bytes_with_byte_level_tokens(omega_pair):
    _, target = omega_pair
    sp = sentencepiece_from_vocab(["▁", "a", "▁a", "<0xCE>", "<0xA9>", "<0x0A>"], [("▁", "a")])
    assert sp.tokenize(" Ω") == ["▁", "<0xCE>", "<0xA9>"]
    rank = {c: i for i, c in enumerate(BYTE_ALPHABET)}
    in_target = {c: 4 + 255 - rank[c] for c in BYTE_ALPHABET}
    mapped = build_vocab_map("em", sp, target).source_to_target
    # sp ids: <unk> 0, <s> 1, </s> 2, ▁ 3, a 4, ▁a 5, <0xCE> 6, <0xA9> 7, <0x0A> 8
    # specials by role: the target has no unk and no bos and no "<unk>"/"<s>" special -> -1; </s> -> its eos (1)
    assert mapped.tolist() == [-1, -1, 1, in_target["Ġ"], in_target["a"], 2, in_target["Î"], in_target["©"],
                               in_target["Ċ"]]


def test_reference_text_compares_raw_strings(omega_pair):
    """vocab_text="reference": only the marker changes ("▁" -> "Ġ" for this byte-level target); byte-fallback
    pieces are their raw "<0xCE>" spelling, so EM drops them and MinED sends them to a 1-character token."""
    _, target = omega_pair
    sp = sentencepiece_from_vocab(["▁", "a", "▁a", "<0xCE>", "<0xA9>", "<0x0A>"], [("▁", "a")])
    rank = {c: i for i, c in enumerate(BYTE_ALPHABET)}
    in_target = {c: 4 + 255 - rank[c] for c in BYTE_ALPHABET}
    em = build_vocab_map("em", sp, target, text="reference").source_to_target
    assert em.tolist() == [-1, -1, 1, in_target["Ġ"], in_target["a"], 2, -1, -1, -1]
    mined = build_vocab_map("mined", sp, target, text="reference").source_to_target
    # "<0xCE>" (6 characters) is at distance 5 from each single character it contains (< 0 x C E >) and at 6
    # or more from everything else; the lowest target id among those is the highest code point: "x".
    # Same for "<0xA9>" and "<0x0A>".
    assert mined.tolist() == [-1, -1, 1, in_target["Ġ"], in_target["a"], 2, in_target["x"], in_target["x"],
                              in_target["x"]]


def test_special_tokens_as_strings(omega_pair):
    """special_tokens="string": "</s>", "<s>", "<unk>" are ordinary strings of the one vocabulary."""
    _, target = omega_pair
    sp = sentencepiece_from_vocab(["▁", "a", "▁a"], [("▁", "a")])
    rank = {c: i for i, c in enumerate(BYTE_ALPHABET)}
    in_target = {c: 4 + 255 - rank[c] for c in BYTE_ALPHABET}
    em = build_vocab_map("em", sp, target, special_tokens="string").source_to_target
    assert em.tolist() == [-1, -1, -1, in_target["Ġ"], in_target["a"], 2]
    mined = build_vocab_map("mined", sp, target, special_tokens="string").source_to_target
    # "<unk>" -> "<pad>" (id 0): 3 substitutions, every 1-character token is at 4.
    # "<s>" -> 2 from the characters < s >, 3 from "<pad>": the lowest of those ids is "s" (highest code point).
    # "</s>" -> 3 from "<pad>" (/->p, s->a, insert d) and from each of < / s >: "<pad>" has the lowest id, 0.
    assert mined.tolist() == [0, in_target["s"], 0, in_target["Ġ"], in_target["a"], 2]
    # by role (default) the same three go to -1, -1 (no unk, no bos in the target) and eos -> eos
    assert build_vocab_map("mined", sp, target).source_to_target[:3].tolist() == [-1, -1, 1]


def test_prefixed_to_target_for_the_position0_rule():
    """The "def x" example: a byte-level source spells the first word "def", a sentencepiece target "▁def"."""
    target = sentencepiece_from_vocab(["▁", "d", "e", "f", "x", "y", "▁d", "▁de", "▁def", "▁x"],
                                      [("▁", "d"), ("▁d", "e"), ("▁de", "f"), ("▁", "x")])
    merges = [("d", "e"), ("de", "f"), ("Ġ", "x"), ("Ġ", "y"), ("x", "y")]
    source = byte_level_from_vocab(["<|endoftext|>"], [*BYTE_ALPHABET, "de", "def", "Ġx", "Ġy", "xy"], merges)
    assert target.tokenize("def x") == ["▁def", "▁x"] and source.tokenize("def x") == ["def", "Ġx"]
    # target ids: <unk> 0 <s> 1 </s> 2 ▁ 3 d 4 e 5 f 6 x 7 y 8 ▁d 9 ▁de 10 ▁def 11 ▁x 12
    src = {t: source.convert_tokens_to_ids(t) for t in ["def", "Ġx", "Ġy", "xy", "x"]}
    ref_em = build_vocab_map("em", source, target, text="reference")
    assert ref_em.source_to_target[[src["def"], src["Ġx"], src["x"]]].tolist() == [-1, 12, 7]
    # "▁def" is no source token but is a target token; "▁x" is the source's "Ġx" (-> 12); "▁xy" is neither
    assert ref_em.prefixed_to_target[[src["def"], src["x"], src["xy"]]].tolist() == [11, 12, -1]
    ref_mined = build_vocab_map("mined", source, target, text="reference")
    # "def" -> "▁def" at 1 (before "▁de" 2, "d"/"e"/"f" 2); "xy" -> "x" (1, id 7) before "y" (1, id 8)
    assert ref_mined.source_to_target[[src["def"], src["xy"]]].tolist() == [11, 7]
    assert ref_mined.prefixed_to_target[[src["def"], src["x"]]].tolist() == [11, 12]
    # prefixed "▁y" is the source's "Ġy", whose MinED is at 1 from "▁" (3), "y" (8), "▁d" (9), "▁x" (12) -> 3
    assert ref_mined.prefixed_to_target[source.convert_tokens_to_ids("y")] == 3
    # normalised texts: the marker is a space, so "def" -> " def" is the target's "▁def" the same way
    norm = build_vocab_map("em", source, target)
    assert norm.prefixed_to_target[[src["def"], src["x"]]].tolist() == [11, 12]


def test_banded_mined_equals_brute_force_on_random_vocabularies():
    """MinED's length bands must give exactly the full scan's answer, ties included (short strings over a
    3-letter alphabet tie a lot; lengths 0-9 put rows in every band)."""
    rng = np.random.default_rng(14)
    for _ in range(5):
        alphabet = list("abc")
        def words(n):
            return ["".join(rng.choice(alphabet, size=rng.integers(0, 10))) for _ in range(n)]
        source, target = words(300), words(120)
        assert mined_map(source, target).source_to_target.tolist() == brute_force_mined(source, target)
