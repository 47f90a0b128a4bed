"""Progress where a user waits: perplexity and the output ensemble show bars named by the model's label, and the
bars change no number."""
from __future__ import annotations

import pandas as pd
import pytest
from lm_eval.api.instance import Instance

import tiny
from baselines.ensemble import EnsembleLM
from harness.evaluation.perplexity import lm_perplexity_by_domain, perplexity_by_domain


@pytest.fixture()
def bars(monkeypatch):
    """Every tqdm bar opened through tqdm.auto (what the code under test uses), kept to read its name and counts."""
    import tqdm.auto

    opened = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    return opened


def _counts(bars, name: str) -> tuple[int, int]:
    """(done, total) of the one bar called `name`."""
    named = [b for b in bars if b.desc == name]
    assert len(named) == 1, [b.desc for b in bars]
    return named[0].n, named[0].total


def test_perplexity_bar_counts_windows_and_changes_nothing(sp_tokenizer, bars):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    texts = {"docs": ["the quick brown fox jumps over the lazy dog", "hello world"],
             "code": ["def add(a, b):\n    return a + b\n"]}
    quiet = perplexity_by_domain(model, sp_tokenizer, texts, window=8, stride=4, batch_size=2)
    assert bars == []
    shown = perplexity_by_domain(model, sp_tokenizer, texts, window=8, stride=4, batch_size=2, progress="llama-docs")
    # windows of 8 positions every 4 over [BOS] + tokens, each token scored once (harness.evaluation.perplexity):
    # n positions need 1 window up to 8, then one more per further 4 positions (ceil((n - 8) / 4))
    sizes = [len(sp_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for d in texts.values() for t in d]
    expected = sum(1 + max(0, -(-(n - 8) // 4)) for n in sizes)
    assert expected > len(sizes)  # some text needs more than one window
    assert _counts(bars, "perplexity llama-docs") == (expected, expected)
    pd.testing.assert_frame_equal(quiet, shown)


def test_ensemble_bars_for_scoring_generation_and_rolling(sp_tokenizer, bars):
    ens = EnsembleLM([(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer),
                      (tiny.tiny_model("llama", sp_tokenizer, seed=1), sp_tokenizer)], batch_size=2, max_gen_toks=3)
    pairs = [("the quick brown", " fox"), ("hello", " world"), ("a stitch in", " time")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    silent = ens.loglikelihood(requests, disable_tqdm=True)
    assert all(b.disable for b in bars)          # lm-eval asked for no bar: none is drawn
    bars.clear()
    assert ens.loglikelihood(requests) == silent
    assert _counts(bars, "ensemble loglikelihood") == (3, 3)
    gen = [Instance("generate_until", {}, ("the quick", {"until": ["\n"], "max_gen_toks": 3}), i) for i in range(3)]
    assert len(ens.generate_until(gen)) == 3
    assert _counts(bars, "ensemble generate_until") == (3, 3)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["hello world", "two plus"])]
    ens.loglikelihood_rolling(rolling)
    assert _counts(bars, "ensemble loglikelihood_rolling") == (2, 2)
    window = lm_perplexity_by_domain(ens, {"docs": ["hello world"]}, window=8, stride=4, progress="ensemble")
    assert _counts(bars, "perplexity ensemble") == (1, 1) and len(window) == 1
