import math

import datasets
import numpy as np
import pytest
import torch

import tiny
from fusion.distributions import extract_distributions, topk_arrays

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "def add(a, b):\n    return a + b\n",
    "two plus three equals five; seven times six equals forty two, and a stitch in time saves nine",
    "a",
    "for i in range(10):\n    print(i * i)\n",
]
DOC_IDS = [5, 3, 0, 4, 1, 2]


@pytest.fixture(scope="module")
def llama(sp_tokenizer):
    return tiny.tiny_model("llama", sp_tokenizer, seed=0)


@pytest.fixture(scope="module")
def extracted(llama, sp_tokenizer):
    return extract_distributions(llama, sp_tokenizer, TEXTS, DOC_IDS, k=4, batch_size=4, progress=False)


def test_columns_types_and_order(extracted, sp_tokenizer):
    ds, stats = extracted
    assert ds.features["doc_id"].dtype == "int64" and ds.features["n_tokens"].dtype == "int32"
    assert ds.features["topk_ids"].feature.dtype == "int32"
    assert ds.features["topk_logprobs"].feature.dtype == "float16"
    assert ds["doc_id"] == sorted(DOC_IDS)
    for row in ds:
        text = TEXTS[DOC_IDS.index(row["doc_id"])]
        n = len(sp_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1     # no BOS, EOS appended
        assert row["n_tokens"] == n and len(row["topk_ids"]) == n * 4 == len(row["topk_logprobs"])
        assert row["n_bytes"] == len(text.encode("utf-8"))
    assert stats.tokens == sum(ds["n_tokens"])


def test_values_match_a_manual_forward(extracted, llama, sp_tokenizer):
    ds, stats = extracted
    row = ds[3]
    text = TEXTS[DOC_IDS.index(3)]
    ids = sp_tokenizer(text, add_special_tokens=False)["input_ids"] + [sp_tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want_lp, want_ids = logp.topk(4, -1)
    got_ids, got_lp, tail = topk_arrays(row, 4)
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_allclose(got_lp, want_lp.numpy(), atol=5e-3)            # float16 storage
    np.testing.assert_allclose(tail, 1 - np.exp(got_lp).sum(1), atol=1e-6)
    nll = -logp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).double().sum().item()
    assert row["ce"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert row["bpb"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)
    # the untied input embedding is a lookup, not a matmul
    params = sum(p.numel() for p in llama.parameters()) - llama.model.embed_tokens.weight.numel()
    assert stats.flops == 2 * params * stats.tokens


def test_batch_size_does_not_change_results(extracted, llama, sp_tokenizer):
    ds4, _ = extracted
    ds1, _ = extract_distributions(llama, sp_tokenizer, TEXTS, DOC_IDS, k=4, batch_size=1, progress=False)
    for a, b in zip(ds4, ds1):
        assert a["topk_ids"] == b["topk_ids"]
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-3)
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-5)


def test_round_trip_on_disk(extracted, tmp_path):
    ds, _ = extracted
    ds.save_to_disk(str(tmp_path / "d"))
    back = datasets.load_from_disk(str(tmp_path / "d"))
    assert back.features == ds.features and back["topk_ids"] == ds["topk_ids"]


def test_max_length_names_the_document(llama, sp_tokenizer):
    with pytest.raises(ValueError, match=r"doc_id=4 has \d+ tokens.*max_length=8.*split_documents"):
        extract_distributions(llama, sp_tokenizer, [TEXTS[1], TEXTS[3]], [3, 4], k=4, max_length=8, progress=False)


def test_byte_level_model(bpe_tokenizer):
    gpt2 = tiny.tiny_model("gpt2", bpe_tokenizer, seed=1)
    ds, stats = extract_distributions(gpt2, bpe_tokenizer, TEXTS[:3], [0, 1, 2], k=3, batch_size=2, progress=False)
    ids, lp, tail = topk_arrays(ds[1], 3)
    assert ids.shape == (ds[1]["n_tokens"], 3) and (np.diff(lp, axis=1) <= 0).all() and (tail >= 0).all()
    assert stats.tokens_per_s > 0 and stats.flops_per_s > 0


def test_tokenization_is_tokenize_document(sp_tokenizer, bpe_tokenizer):
    from fusion.distributions import document_ids
    from fusion.tokens import tokenize_document

    for tok in (sp_tokenizer, bpe_tokenizer):
        assert document_ids(tok, TEXTS) == [tokenize_document(tok, t).ids.tolist() for t in TEXTS]
