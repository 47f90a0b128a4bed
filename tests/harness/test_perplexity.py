"""Perplexity per domain: exact against a direct forward pass, batch-size invariant, each token scored once;
with lm-eval's rolling windows, equal to lm-eval's own loglikelihood_rolling."""
from __future__ import annotations

import math

import pytest
import torch

import tiny
from fusion.windows import plan_windows
from harness.evaluation import minipile_texts, perplexity_by_domain

torch.set_num_threads(1)

TEXTS = {
    "prose": ["the quick brown fox jumps over the lazy dog and the early bird catches the worm " * 3,
              "hello world, hello fusion", "a stitch in time saves nine"],
    "code": ["def add(a, b):\n    return a + b\n" * 4, "for i in range(10):\n    print(i * i)\n"],
}


@pytest.fixture(scope="module")
def llama(sp_tokenizer):
    return tiny.tiny_model("llama", sp_tokenizer, seed=0)


def test_matches_a_direct_forward_pass_when_the_window_covers_the_text(llama, sp_tokenizer):
    text = TEXTS["prose"][0]
    ids = [sp_tokenizer.bos_token_id] + sp_tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logprobs = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    nll = -sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
    row = perplexity_by_domain(llama, sp_tokenizer, {"d": [text]}, window=256, stride=128).iloc[0]
    assert row.n_tokens == len(ids) - 1
    assert row.n_bytes == len(text.encode("utf-8"))
    assert row.nll_nats == pytest.approx(nll, rel=1e-5)
    assert row.token_perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert row.bits_per_byte == pytest.approx(nll / (math.log(2) * len(text.encode("utf-8"))), rel=1e-5)


def test_short_windows_score_every_token_with_limited_context(llama, sp_tokenizer):
    text = TEXTS["prose"][0]
    ids = [sp_tokenizer.bos_token_id] + sp_tokenizer.encode(text, add_special_tokens=False)
    window, stride = 8, 4
    expected = 0.0
    with torch.no_grad():
        for begin, end, first in plan_windows(len(ids), window, stride):
            logprobs = torch.log_softmax(llama(input_ids=torch.tensor([ids[begin:end]])).logits[0].double(), -1)
            expected -= sum(float(logprobs[t - begin - 1, ids[t]]) for t in range(first, end))
    full = perplexity_by_domain(llama, sp_tokenizer, {"d": [text]}, window=256, stride=128).iloc[0]
    short = perplexity_by_domain(llama, sp_tokenizer, {"d": [text]}, window=window, stride=stride).iloc[0]
    assert short.n_tokens == full.n_tokens == len(ids) - 1
    assert short.nll_nats == pytest.approx(expected, rel=1e-5)
    assert short.nll_nats != pytest.approx(full.nll_nats, rel=1e-6)   # less context, different score


def test_batch_size_does_not_change_the_result(llama, sp_tokenizer):
    one = perplexity_by_domain(llama, sp_tokenizer, TEXTS, window=16, stride=8, batch_size=1)
    eight = perplexity_by_domain(llama, sp_tokenizer, TEXTS, window=16, stride=8, batch_size=8)
    assert list(one.domain) == ["prose", "code"]
    assert (one.n_tokens == eight.n_tokens).all() and (one.n_bytes == eight.n_bytes).all()
    for column in ("nll_nats", "token_perplexity", "bits_per_byte"):
        for a, b in zip(one[column], eight[column]):
            assert b == pytest.approx(a, rel=1e-6)


def test_per_document_rows_are_each_text_scored_alone(llama, sp_tokenizer):
    """Each document's nll is what scoring that text alone gives; they add up to the domain's totals."""
    domains, docs = perplexity_by_domain(llama, sp_tokenizer, TEXTS, window=16, stride=8, batch_size=4,
                                         per_document=True)
    assert list(zip(docs.domain, docs.doc)) == [("prose", 0), ("prose", 1), ("prose", 2), ("code", 0), ("code", 1)]
    for row in docs.itertuples():
        alone = perplexity_by_domain(llama, sp_tokenizer, {"x": [TEXTS[row.domain][row.doc]]}, window=16,
                                     stride=8).iloc[0]
        assert (row.n_tokens, row.n_bytes) == (alone.n_tokens, alone.n_bytes)
        assert row.nll_nats == pytest.approx(alone.nll_nats, rel=1e-9)
    for d in domains.itertuples():
        mine = docs[docs.domain == d.domain]
        assert mine.n_tokens.sum() == d.n_tokens and mine.n_bytes.sum() == d.n_bytes
        assert math.fsum(mine.nll_nats) == pytest.approx(d.nll_nats, rel=1e-12)


def test_gpt2_style_tokenizer_uses_eos_as_context(bpe_tokenizer):
    model = tiny.tiny_model("gpt2", bpe_tokenizer, seed=1)
    text = "hello world, hello merging"
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    row = perplexity_by_domain(model, bpe_tokenizer, {"d": [text]}).iloc[0]
    assert row.n_tokens == len(ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_eval_rolling_convention_is_lm_evals_loglikelihood_rolling(family, sp_tokenizer, bpe_tokenizer):
    """convention="lm_eval_rolling" gives each text the nll lm-eval's HFLM.loglikelihood_rolling gives it, at
    max lengths that cut every text into several windows and one that holds them whole (llama: BOS as the
    prefix token; gpt2: EOS)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = sp_tokenizer if family == "llama" else bpe_tokenizer
    model = tiny.tiny_model(family, tokenizer, seed=3)
    texts = TEXTS["prose"] + TEXTS["code"]
    for window in (3, 8, 64):
        hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=window, device="cpu")
        want = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                           for i, t in enumerate(texts)], disable_tqdm=True)
        _, docs = perplexity_by_domain(model, tokenizer, {"d": texts}, window=window, stride=1, batch_size=3,
                                       per_document=True, convention="lm_eval_rolling")
        for got, ll in zip(docs.nll_nats, want):
            assert got == pytest.approx(-ll, rel=1e-5), (family, window)
    # the conventions differ: FuseLab's strided windows give the same text another score
    strided = perplexity_by_domain(model, tokenizer, {"d": texts}, window=8, stride=4).iloc[0]
    rolling = perplexity_by_domain(model, tokenizer, {"d": texts}, window=8, convention="lm_eval_rolling").iloc[0]
    assert strided.n_tokens == rolling.n_tokens and strided.nll_nats != pytest.approx(rolling.nll_nats, rel=1e-6)


def test_unknown_convention_is_refused_before_any_work(llama, sp_tokenizer):
    with pytest.raises(ValueError, match="unknown window convention 'rolling'"):
        perplexity_by_domain(llama, sp_tokenizer, TEXTS, window=16, stride=8, convention="rolling")


def test_config_convention_defaults_to_strided_and_frees_stride_for_lm_eval():
    from pydantic import ValidationError

    from harness.config import PerplexitySpec

    assert PerplexitySpec().convention == "strided"
    assert PerplexitySpec(window=64, stride=128, convention="lm_eval_rolling").window == 64  # stride unused
    with pytest.raises(ValidationError, match="stride \\(128\\) must be <= window \\(64\\)"):
        PerplexitySpec(window=64, stride=128)
    with pytest.raises(ValidationError, match="convention"):
        PerplexitySpec(convention="rolling")


def test_window_longer_than_the_model_is_refused(llama, sp_tokenizer):
    with pytest.raises(ValueError, match="window=1024 exceeds the model's 512 positions"):
        perplexity_by_domain(llama, sp_tokenizer, TEXTS, window=1024, stride=512)


def test_minipile_texts_domains_and_seed(shared_data):
    first = minipile_texts(shared_data, max_docs_per_domain=2, seed=7)
    assert set(first) == {"wikipedia", "books", "pubmed", "shakespeare", "speeches", "web", "code"}
    assert all(len(docs) == 2 and all(d.strip() for d in docs) for docs in first.values())
    assert minipile_texts(shared_data, max_docs_per_domain=2, seed=7) == first
    assert minipile_texts(shared_data, max_docs_per_domain=2, seed=8) != first
    assert not first["pubmed"][0].startswith("Context:") and "Question:" not in first["pubmed"][0]
