import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import tiny
from fusion.data import FusionCollator, pack_documents, prepare_train_dataset, split_documents, token_count


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real word-level tokenizer: one token per whitespace-separated word, so splits can be computed by hand."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>"] + list("abcdefghijk") + ["abcdefghij"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_split_at_lines_then_words(word_tokenizer):
    text = "a b c\nd e\nf g h i j k\n"
    # block 4 = 3 words + EOS: lines first; the 6-word line splits at whitespace, spaces stay with the piece before
    assert split_documents([text, "a b"], [word_tokenizer], block_size=4) == ["a b c\n", "d e\n", "f g h ", "i j k\n",
                                                                             "a b"]


def test_split_inside_a_word_only_when_unavoidable(sp_tokenizer):
    word = "abcdefghijklmnopqrstuvwxyz" * 3
    pieces = split_documents([f"the fox {word} dog"], [sp_tokenizer], block_size=8)
    assert "".join(pieces) == f"the fox {word} dog"
    assert all(token_count(sp_tokenizer, p) + 1 <= 8 for p in pieces)
    assert pieces[0] == "the fox "        # the words before the long one are not cut


OLD_SP_PIECES = ["the fox ", "abcdefgh", "ijklmno", "pqrstuvw", "xyzabc", "defghijkl", "mnopqr", "stuvwxyz", " ",
                 "dog\n", "the end"]


def _greedy_split(text, tokenizers, block_size, level=0):
    """The definition in split_documents' docstring, by brute force: from where the last piece ended, the longest
    run of units (lines; words; characters) that fits, found by trying every end from the longest down."""
    import re

    units = [text.splitlines(keepends=True), re.findall(r"\s*\S+\s*|\s+", text), list(text)][level]

    def fits(piece):
        return all(token_count(tok, piece) + 1 <= block_size for tok in tokenizers)

    pieces, first = [], 0
    while first < len(units):
        end = next((e for e in range(len(units), first, -1) if fits("".join(units[first:e]))), first)
        if end == first:
            pieces += _greedy_split(units[first], tokenizers, block_size, level + 1)
            first += 1
        else:
            pieces.append("".join(units[first:end]))
            first = end
    return pieces


def test_split_is_the_greedy_longest_fitting_run(shared_data, sp_tokenizer, bpe_tokenizer):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()[:1500]
    long_word = "antidisestablishmentarianism" * 4
    docs = [text, text.replace("\n", " ")[:700], f"a line\n{long_word} and more\nend\n"]
    for block_size in (16, 40):
        for doc in docs:
            expected = _greedy_split(doc, [sp_tokenizer, bpe_tokenizer], block_size)
            assert split_documents([doc], [sp_tokenizer, bpe_tokenizer], block_size) == expected


def test_split_pieces_of_a_small_case_are_unchanged(word_tokenizer, sp_tokenizer):
    # Outputs of the former (quadratic) implementation on small cases, kept as they were.
    assert split_documents(["a b c d e f g h i j k a b c"], [word_tokenizer], block_size=5) == [
        "a b c d ", "e f g h ", "i j k a ", "b c"]
    assert split_documents(["the fox abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz dog\nthe end"],
                           [sp_tokenizer], block_size=8) == OLD_SP_PIECES


def test_split_real_text_fits_every_tokenizer(shared_data, sp_tokenizer, bpe_tokenizer):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()[:6000]
    docs = [text[:3000], text[3000:], "short"]
    pieces = split_documents(docs, [sp_tokenizer, bpe_tokenizer], block_size=64)
    assert "".join(pieces) == "".join(docs) and pieces[-1] == "short"
    for piece in pieces:
        assert token_count(sp_tokenizer, piece) + 1 <= 64 and token_count(bpe_tokenizer, piece) + 1 <= 64
    # line boundaries are preferred: most pieces end a line
    assert sum(p.endswith("\n") for p in pieces[:-1]) >= 0.8 * (len(pieces) - 1)


def test_pack_documents_by_hand():
    rows = [{"input_ids": [1, 2, 3], "fused_ids": [1, 0, 2, 0, 3, 0], "fused_probs": [1, 0, .5, .5, 0, 0], "k": 2},
            {"input_ids": [4, 5], "fused_ids": [4, 0, 5, 0], "fused_probs": [1, 0, 1, 0], "k": 2}]
    blocks = pack_documents(rows, block_size=4)
    assert blocks[0]["input_ids"] == [1, 2, 3, 4] and blocks[0]["position_ids"] == [0, 1, 2, 0]
    assert blocks[0]["fused_ids"] == [1, 0, 2, 0, 3, 0, 4, 0] and blocks[0]["fused_probs"][6:] == [1, 0]
    assert blocks[1] == {"input_ids": [5], "position_ids": [0], "fused_ids": [5, 0], "fused_probs": [1, 0], "k": 2}


def test_prepare_with_bos_and_without_packing():
    ds = datasets.Dataset.from_list([{"doc_id": 7, "input_ids": [5, 6], "fused_ids": [6, 2], "fused_probs": [1.0, 0.0],
                                      "k": 1}])
    out = prepare_train_dataset(ds, block_size=4, packing=False, add_bos=True, bos_token_id=1)
    assert out[0]["input_ids"] == [1, 5, 6] and out[0]["fused_ids"] == [0, 6, 2]
    assert out[0]["fused_probs"] == [0.0, 1.0, 0.0] and out[0]["position_ids"] == [0, 1, 2]
    with pytest.raises(ValueError, match="doc_id=7 has 3 tokens, more than block_size=2"):
        prepare_train_dataset(ds, block_size=2, packing=False, add_bos=True, bos_token_id=1)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['fused_ids'"):
        prepare_train_dataset(ds.select_columns(["input_ids"]), block_size=4)
    clm_only = prepare_train_dataset(ds.select_columns(["input_ids"]), block_size=4, fusion=False)
    assert clm_only.column_names == ["input_ids", "position_ids"]


def test_collator_pads_and_aligns_fused_rows():
    feats = [{"input_ids": [5, 6, 7], "position_ids": [0, 1, 0], "fused_ids": [6, 9, 7, 0, 0, 0],
              "fused_probs": [.75, .25, 1, 0, 0, 0], "k": 2},
             {"input_ids": [8], "position_ids": [0], "fused_ids": [3, 0], "fused_probs": [.5, 0], "k": 2}]
    batch = FusionCollator(pad_token_id=0)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and "position_ids" not in batch
    assert batch["fused_ids"].tolist() == [[[6, 9], [7, 0], [0, 0]], [[3, 0], [0, 0], [0, 0]]]
    assert batch["fused_probs"].dtype == torch.float32 and batch["fused_probs"][1, 1:].sum() == 0
    reset = FusionCollator(pad_token_id=0, cross_document_attention=False)(feats)
    assert "attention_mask" not in reset and reset["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    clm = FusionCollator(pad_token_id=0)([{"input_ids": [1, 2]}])
    assert set(clm) == {"input_ids", "labels", "attention_mask"}


def test_reset_positions_isolate_documents(sp_tokenizer):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=2)
    doc_a, doc_b = [10, 11, 12, 13], [20, 21, 22]
    block = pack_documents([{"input_ids": doc_a}, {"input_ids": doc_b}], block_size=16)[0]
    batch = FusionCollator(pad_token_id=3, cross_document_attention=False)([block])
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([doc_b]), use_cache=False).logits[0]
        cross = model(**FusionCollator(pad_token_id=3)([block]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[4:], alone, atol=1e-5, rtol=1e-5)
    assert (cross[4:] - alone).abs().max() > 1e-3     # without the reset doc_b sees doc_a


def test_preparing_a_saved_dataset_writes_nothing_beside_it(tmp_path):
    """Training reads a published stage's dataset, which other runs may read at the same time: preparing it must
    not add cache files to that folder (two workers once raced on one `cache-*.arrow` there)."""
    import datasets

    from fusion.data import prepare_train_dataset

    folder = tmp_path / "dataset"
    datasets.Dataset.from_dict({"doc_id": [0, 1], "input_ids": [[1, 2, 3], [4, 5]]}).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    out = prepare_train_dataset(datasets.load_from_disk(str(folder)), block_size=4, fusion=False)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert out["input_ids"] == [[1, 2, 3, 4], [5]]  # packed: the documents concatenated, cut at 4 tokens
