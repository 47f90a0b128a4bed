"""EnsembleLM: exact equivalences (one model; one shared tokenizer = probability averaging),
cross-tokenizer contributions computed by hand, generation stops, and lm-eval integration."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import tiny
from lm_eval.api.instance import Instance

from baselines.ensemble import ENSEMBLE_COMBINERS, EnsembleLM
from fusion.vocab import build_vocab_map

torch.set_num_threads(1)

PAIRS = [("the quick brown", " fox jumps"), ("hello world,", " hello fusion"), ("def add(a, b):", "\n    return a + b"),
         ("", "two plus three"), ("a stitch in time ", "saves nine")]
TEXTS = ["hello world, hello fusion", "the quick brown fox jumps over the lazy dog"]


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def rolling_requests(texts):
    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def llamas(sp_tokenizer):
    return [tiny.tiny_model("llama", sp_tokenizer, seed=s) for s in (0, 1)]


@pytest.fixture(scope="module")
def gpt2(bpe_tokenizer):
    return tiny.tiny_model("gpt2", bpe_tokenizer, seed=5)


@torch.no_grad()
def own_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def pivot_ids(tok, context, continuation):
    """lm-eval's causal encoding: trailing context spaces move to the continuation; the context's own
    tokens, then the whole text's tokens after the first len(context tokens)."""
    if context != context.rstrip():
        n = len(context) - len(context.rstrip())
        context, continuation = context[:-n], context[-n:] + continuation
    if context == "":
        return [tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id], \
            tok(continuation, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def direct_scores(models, tok, pairs, mix):
    """Reference: per continuation token, `mix` over the members' next-token log-probs [M, V]."""
    out = []
    for context, continuation in pairs:
        ctx, cont = pivot_ids(tok, context, continuation)
        ids = ctx + cont
        lps = torch.stack([own_logprobs(m, ids) for m in models])          # [M, T, V]
        total, greedy = 0.0, True
        for j, token in enumerate(cont):
            row = mix(lps[:, len(ctx) - 1 + j])
            total += float(row[token])
            greedy &= int(row.argmax()) == token
        out.append((total, greedy))
    return out


def test_registry_and_lm_eval_name():
    from lm_eval.api.registry import get_model

    assert get_model("fuselab-ensemble") is EnsembleLM
    assert ENSEMBLE_COMBINERS.names() == ["max_prob", "mean", "mince", "weighted"]


def test_one_member_equals_the_model_and_lm_evals_hflm(llamas, sp_tokenizer):
    from lm_eval.models.huggingface import HFLM

    model = llamas[0]
    ens = EnsembleLM([(model, sp_tokenizer)], batch_size=1)
    got = ens.loglikelihood(ll_requests(PAIRS))
    want = direct_scores([model], sp_tokenizer, PAIRS, lambda lp: lp[0])
    for (g, gg), (w, wg) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5) and gg == wg
    # one member through logsumexp with log-weight 0 is bit-identical to the member's own log-softmax
    seg = ens._pair_segment(*PAIRS[0])
    row = ens._distributions([seg])[0]
    ref = own_logprobs(model, seg.input_ids)[torch.as_tensor(seg.scored)]
    assert torch.equal(row, ref)

    hflm = HFLM(pretrained=model, tokenizer=sp_tokenizer, batch_size=1, device="cpu")
    for (g, gg), (h, hg) in zip(got, hflm.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)):
        assert g == pytest.approx(h, abs=1e-4) and gg == hg
    rolled = ens.loglikelihood_rolling(rolling_requests(TEXTS))
    for g, h in zip(rolled, hflm.loglikelihood_rolling(rolling_requests(TEXTS), disable_tqdm=True)):
        assert g == pytest.approx(h, abs=1e-4)


def test_shared_tokenizer_members_are_probability_averaging(llamas, sp_tokenizer):
    members = [(m, sp_tokenizer) for m in llamas]
    got = EnsembleLM(members, combiner="mean").loglikelihood(ll_requests(PAIRS))
    want = direct_scores(llamas, sp_tokenizer, PAIRS, lambda lp: torch.log(lp.exp().mean(dim=0)))
    for (g, gg), (w, wg) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5) and gg == wg
    got = EnsembleLM(members, combiner="weighted", weights=[3.0, 1.0]).loglikelihood(ll_requests(PAIRS))
    want = direct_scores(llamas, sp_tokenizer, PAIRS, lambda lp: torch.log(0.75 * lp[0].exp() + 0.25 * lp[1].exp()))
    for (g, _), (w, _) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    # the average is not either member: the test would notice a combiner that ignored one of them
    alone = direct_scores(llamas[:1], sp_tokenizer, PAIRS, lambda lp: lp[0])
    assert any(abs(g - a) > 1e-3 for (g, _), (a, _) in zip(got, alone))


def test_max_prob_and_mince_select_per_position(llamas, sp_tokenizer):
    members = [(m, sp_tokenizer) for m in llamas]
    got = EnsembleLM(members, combiner="max_prob").loglikelihood(ll_requests(PAIRS))
    want = direct_scores(llamas, sp_tokenizer, PAIRS, lambda lp: lp[int(lp.max(dim=-1).values.argmax())])
    for (g, _), (w, _) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)

    text = TEXTS[1]
    ids = [sp_tokenizer.bos_token_id] + sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    lps = torch.stack([own_logprobs(m, ids) for m in llamas])
    total, nll = 0.0, torch.zeros(2)
    for t in range(len(ids) - 1):
        # before any history the first member; then the lowest mean CE on tokens 1..t
        chosen = 0 if t == 0 else int(torch.argmin(nll / t))
        total += float(lps[chosen, t, ids[t + 1]])
        nll -= lps[:, t, ids[t + 1]]
    (got_rolling,) = EnsembleLM(members, combiner="mince").loglikelihood_rolling(rolling_requests([text]))
    assert got_rolling == pytest.approx(total, abs=1e-5)


def test_cross_tokenizer_member_contributes_only_where_aligned(llamas, gpt2, sp_tokenizer, bpe_tokenizer):
    ens = EnsembleLM([(llamas[0], sp_tokenizer), (gpt2, bpe_tokenizer)], pivot=0, alignment="offsets",
                     vocab_map="em")
    text = TEXTS[0]   # pivot: ▁hello ▁world, ▁hello ▁fus io n / gpt2: hello Ġwor l d , Ġhello Ġf us i o n
    (seg,) = ens._rolling_segments(text)
    member_ids, pos_map = ens._member_view(ens.members[1], seg)
    assert member_ids[0] == bpe_tokenizer.eos_token_id   # gpt2's empty-context token
    # empty text <-> empty text; "▁hello"(12..18) <-> "Ġhello"; "n" <-> "n" (the last position scores
    # nothing); "hello" vs "▁hello" differ under EM (no marker on gpt2's first word); the rest is 1-to-many
    assert pos_map.tolist() == [0, -1, -1, 6, -1, -1, 11]

    (got,) = ens.loglikelihood_rolling(rolling_requests([text]))
    ids = seg.input_ids
    lp_llama = own_logprobs(llamas[0], ids)
    lp_gpt2 = own_logprobs(gpt2, member_ids)
    to_pivot = build_vocab_map("em", bpe_tokenizer, sp_tokenizer).source_to_target
    V = len(sp_tokenizer)

    def mapped(row):
        p = np.zeros(V)
        probs = row.exp().double().numpy()
        for src, dst in enumerate(to_pivot[: len(probs)]):
            if dst >= 0:
                p[dst] += probs[src]
        return p + (1 - p.sum()) / V

    want = 0.0
    for t in range(len(ids) - 1):
        p = lp_llama[t].exp().double().numpy()
        if pos_map[t] >= 0:
            p = 0.5 * (p + mapped(lp_gpt2[pos_map[t]]))
        want += math.log(p[ids[t + 1]])
    assert got == pytest.approx(want, abs=1e-4)
    # the gpt2 member really changed the score (it contributes at 2 scored positions)
    (alone,) = EnsembleLM([(llamas[0], sp_tokenizer)]).loglikelihood_rolling(rolling_requests([text]))
    assert abs(got - alone) > 1e-3
    # weight 0 on the cross-tokenizer member gives back the pivot model exactly
    (zero,) = EnsembleLM([(llamas[0], sp_tokenizer), (gpt2, bpe_tokenizer)], combiner="weighted",
                         weights=[1.0, 0.0]).loglikelihood_rolling(rolling_requests([text]))
    assert zero == pytest.approx(alone, abs=1e-6)


def test_cross_tokenizer_scores_stay_finite(llamas, gpt2, sp_tokenizer, bpe_tokenizer):
    for pivot in (0, 1):
        for combiner in ENSEMBLE_COMBINERS.names():
            ens = EnsembleLM([(llamas[0], sp_tokenizer), (gpt2, bpe_tokenizer)], pivot=pivot, combiner=combiner,
                             vocab_map="mined", top_k=5, max_length=8)  # 8: forces several rolling windows
            scores = ens.loglikelihood(ll_requests(PAIRS))
            assert all(math.isfinite(s) and s < 0 for s, _ in scores), (pivot, combiner, scores)
            rolled = ens.loglikelihood_rolling(rolling_requests(TEXTS))
            assert all(math.isfinite(r) and r < 0 for r in rolled)


def test_rolling_windows_cover_every_token_once(llamas, sp_tokenizer):
    ens = EnsembleLM([(llamas[0], sp_tokenizer)], max_length=4)
    text = TEXTS[1]
    n = len(sp_tokenizer(text, add_special_tokens=False)["input_ids"])
    segments = ens._rolling_segments(text)
    assert sum(len(s.scored) for s in segments) == n and len(segments) > 1
    assert all(len(s.input_ids) <= 5 for s in segments)


def test_generate_until_is_greedy_and_stops_on_the_stop_sequence(llamas, sp_tokenizer):
    model = llamas[1]
    ens = EnsembleLM([(model, sp_tokenizer)])
    context = "the quick brown fox"
    ctx_ids = sp_tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ctx_ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=sp_tokenizer.pad_token_id)
    hf_text = sp_tokenizer.decode(out[0].tolist(), skip_special_tokens=True)[
        len(sp_tokenizer.decode(ctx_ids, skip_special_tokens=True)):]
    (free,) = ens.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 10}), 0)])
    assert free == hf_text and len(free) > 4
    stop = free[3:5]
    (stopped,) = ens.generate_until(
        [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 10}), 0)])
    assert stopped == free[: free.index(stop)]
    (short,) = ens.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 2}), 0)])
    assert free.startswith(short) and len(short) < len(free)


def test_cross_tokenizer_generation_stops(llamas, gpt2, sp_tokenizer, bpe_tokenizer):
    ens = EnsembleLM([(llamas[0], sp_tokenizer), (gpt2, bpe_tokenizer)], pivot=1, vocab_map="mined")
    (free,) = ens.generate_until([Instance("generate_until", {}, ("hello world", {"until": [], "max_gen_toks": 6}), 0)])
    assert free
    stop = free[1:3]
    (stopped,) = ens.generate_until(
        [Instance("generate_until", {}, ("hello world", {"until": [stop], "max_gen_toks": 6}), 0)])
    assert stopped == free[: free.index(stop)]


@pytest.mark.parametrize("kinds", [("llama", "gpt2"), ("gemma3_text", "gpt_neox"), ("mpt", "llama")])
def test_kv_cache_and_batched_generation_equal_full_recompute(kinds, sp_tokenizer, bpe_tokenizer):
    """Reusing each member's keys/values (cropped, or masked in a batch, where a cross-tokenizer member's
    tokenization of the text so far changed at its end) and decoding requests together give the very tokens
    of recomputing every step one request at a time, on every model family (gemma3_text: a sliding window
    shorter than the prompt, decoded row by row; mpt: ALiBi, row by row; the others batched). Requests stop
    at different steps (stop strings, token limits). The caches are really used: after the first step,
    members run only the few ids past their unchanged prefix, and batchable members run 3 rows at once."""
    members = [(tiny.tiny_model(kinds[0], sp_tokenizer, seed=3), sp_tokenizer),
               (tiny.tiny_model(kinds[1], bpe_tokenizer, seed=4), bpe_tokenizer)]
    shapes: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, j=j: shapes[j].append(tuple(kw["input_ids"].shape)),
                                         with_kwargs=True) for j, (m, _) in enumerate(members)]
    contexts = ["hello world, hello", "def add(a, b):\n   ", "the quick brown fox jumps over"]
    requests = [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 12}), i) for i, c in enumerate(contexts)]
    try:
        full = EnsembleLM(members, pivot=1, vocab_map="mined", kv_cache=False, batch_size=1).generate_until(requests)
        n_full = sum(b * w for j in shapes for b, w in shapes[j])
        shapes = {0: [], 1: []}
        ens = EnsembleLM(members, pivot=1, vocab_map="mined", batch_size=8)
        cached = ens.generate_until(requests)
        n_cached = sum(b * w for j in shapes for b, w in shapes[j])  # ids run, padding included
        # ragged stops in one batch: a stop string inside row 0's text, a shorter limit for row 2
        ragged = [Instance("generate_until", {}, (contexts[0], {"until": [full[0][2:4]], "max_gen_toks": 12}), 0),
                  requests[1],
                  Instance("generate_until", {}, (contexts[2], {"until": [], "max_gen_toks": 3}), 2)]
        want = EnsembleLM(members, pivot=1, vocab_map="mined", kv_cache=False, batch_size=1).generate_until(ragged)
        got = ens.generate_until(ragged)
    finally:
        for h in hooks:
            h.remove()
    assert cached == full and all(full)
    stop = full[0][2:4]
    assert got == want and want[0] == full[0][:full[0].index(stop)] and want[1] == full[1]
    assert full[2].startswith(want[2]) and len(want[2]) < len(full[2])
    assert all(m.kv_ok for m in ens.members)
    for j, (model, _) in enumerate(members):
        widths = sorted(w for _, w in shapes[j])
        assert widths[len(widths) // 2] <= 2
        batched = model.config.model_type in ("llama", "gpt2", "gpt_neox")
        assert ens.members[j].batch_ok == batched
        assert max(b for b, _ in shapes[j]) == (3 if batched else 1)
    assert n_cached < n_full / 3


def test_a_model_without_a_cache_falls_back_to_full_forwards(llamas, sp_tokenizer, caplog):
    class NoCache(torch.nn.Module):  # a model class whose forward takes no `cache`
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, logits_to_keep=0):
            return self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep)

    request = [Instance("generate_until", {}, ("the quick brown", {"until": [], "max_gen_toks": 8}), 0)]
    want = EnsembleLM([(llamas[0], sp_tokenizer)], kv_cache=False).generate_until(request)
    ens = EnsembleLM([(NoCache(llamas[0]), sp_tokenizer)])
    with caplog.at_level("WARNING", logger="baselines.ensemble"):
        assert ens.generate_until(request) == want
    assert not ens.members[0].kv_ok
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["ensemble member member0: no KV cache for generation"]


def test_scored_by_lm_eval_from_model_args(llama_pool, tiny_gpt2_dir, shared_data, tmp_path):
    """A local multiple-choice task (rows from the shared ARC-Easy copy) through lm_eval.simple_evaluate,
    the ensemble built from lm-eval model_args, members given as HF folders."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [json.loads(line) for line in (shared_data / "commonsense" / "arc_easy_test.llmfoundry.jsonl")
            .read_text().splitlines()[:4]]
    data = tmp_path / "arc4.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "arc4.yaml").write_text(f"""task: fuselab_arc4
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{query}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
""")
    lm = EnsembleLM.create_from_arg_string(
        f"members={llama_pool['a']}|{llama_pool['b']}|{tiny_gpt2_dir},combiner=weighted,weights=1|1|2,vocab_map=em")
    assert [m.shares_pivot for m in lm.members] == [True, True, False]
    out = lm_eval.simple_evaluate(model=lm, tasks=["fuselab_arc4"],
                                  task_manager=TaskManager(include_path=str(tmp_path)),
                                  num_fewshot=0, random_seed=0, bootstrap_iters=0)
    samples = sorted(out["samples"]["fuselab_arc4"], key=lambda x: x["doc_id"])
    assert len(samples) == 4
    # lm-eval scored our loglikelihoods: recompute them directly and redo the accuracy by hand
    correct = 0
    for sample, row in zip(samples, rows):
        reqs = [Instance("loglikelihood", {}, (f"Question: {row['query']}\nAnswer:", " " + c), j)
                for j, c in enumerate(row["choices"])]
        own = [ll for ll, _ in lm.loglikelihood(reqs)]
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(own, abs=1e-5)
        correct += int(np.argmax(own) == row["gold"])
    assert out["results"]["fuselab_arc4"]["acc,none"] == pytest.approx(correct / 4)


def test_bad_arguments_name_the_problem(llamas, sp_tokenizer, tmp_path):
    members = [(m, sp_tokenizer) for m in llamas]
    with pytest.raises(ValueError, match="pivot=2 but there are 2 members"):
        EnsembleLM(members, pivot=2)
    with pytest.raises(ValueError, match="3 weights for 2 members"):
        EnsembleLM(members, combiner="weighted", weights=[1, 1, 1])
    with pytest.raises(KeyError, match="unknown ensemble combiner 'median'.*mean"):
        EnsembleLM(members, combiner="median")
    with pytest.raises(KeyError, match="unknown alignment 'magic'"):
        EnsembleLM(members, alignment="magic")
    with pytest.raises(ValueError, match="no config.json"):
        EnsembleLM([str(tmp_path)])


def test_mince_generation_follows_the_member_with_the_lowest_running_ce(llamas, sp_tokenizer):
    context = "hello world, hello"
    ctx = sp_tokenizer(context, add_special_tokens=False)["input_ids"]
    rolled = [sp_tokenizer.bos_token_id] + ctx
    # history: each member's CE on the context (as a rolling text), then on every token generated
    nll = torch.stack([-own_logprobs(m, rolled)[torch.arange(len(ctx)), torch.tensor(ctx)].sum() for m in llamas])
    count, generated, chosen_members = len(ctx), [], []
    for _ in range(6):
        chosen = int(torch.argmin(nll / count))
        rows = torch.stack([own_logprobs(m, ctx + generated)[-1] for m in llamas])
        nxt = int(rows[chosen].argmax())
        chosen_members.append(chosen)
        if nxt == sp_tokenizer.eos_token_id:
            break
        generated.append(nxt)
        nll, count = nll - rows[:, nxt], count + 1
    want = sp_tokenizer.decode(ctx + generated, skip_special_tokens=True)[
        len(sp_tokenizer.decode(ctx, skip_special_tokens=True)):]
    ens = EnsembleLM([(m, sp_tokenizer) for m in llamas], combiner="mince")
    (got,) = ens.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 6}), 0)])
    assert got == want and len(got) > 0
    assert 1 in chosen_members   # not the "first member" fallback: the history decided


def test_windowed_perplexity_of_one_member_equals_the_models_own(llamas, sp_tokenizer):
    from harness.evaluation.perplexity import lm_perplexity_by_domain, perplexity_by_domain

    texts = {"prose": TEXTS, "code": [PAIRS[2][0] + PAIRS[2][1]]}
    ens = EnsembleLM([(llamas[0], sp_tokenizer)], batch_size=3)
    for window, stride in [(6, 3), (5, 5), (512, 256)]:
        got = lm_perplexity_by_domain(ens, texts, window=window, stride=stride)
        want = perplexity_by_domain(llamas[0], sp_tokenizer, texts, window=window, stride=stride)
        assert list(got["n_tokens"]) == list(want["n_tokens"]) and list(got["n_bytes"]) == list(want["n_bytes"])
        assert np.allclose(got["nll_nats"], want["nll_nats"], rtol=0, atol=1e-4), (window, stride)
    # short windows cost context: the same text scores worse than with the whole text in one window
    short = lm_perplexity_by_domain(ens, texts, window=5, stride=5)
    assert (short["nll_nats"] != got["nll_nats"]).all()


def test_windowed_perplexity_of_shared_tokenizer_members_is_the_mixture(llamas, sp_tokenizer):
    from harness.evaluation.perplexity import lm_perplexity_by_domain

    ens = EnsembleLM([(m, sp_tokenizer) for m in llamas])
    got = lm_perplexity_by_domain(ens, {"d": TEXTS}, window=512, stride=256)
    want = direct_scores(llamas, sp_tokenizer, [("", t) for t in TEXTS], lambda lp: torch.log(lp.exp().mean(dim=0)))
    nll = -sum(w for w, _ in want)
    assert float(got["nll_nats"][0]) == pytest.approx(nll, abs=1e-4)
    assert float(got["bits_per_byte"][0]) == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in TEXTS))


def test_windowed_perplexity_with_lm_eval_windows_is_the_ensembles_loglikelihood_rolling(llamas, gpt2, sp_tokenizer,
                                                                                        bpe_tokenizer):
    """One window plan (fusion.windows) for both: perplexity with convention lm_eval_rolling at the ensemble's
    max_length scores each text as the ensemble's own loglikelihood_rolling does, across tokenizers too."""
    from harness.evaluation.perplexity import lm_perplexity_by_domain, perplexity_by_domain

    texts = TEXTS + [PAIRS[2][0] + PAIRS[2][1]]
    for members in ([(llamas[0], sp_tokenizer)], [(llamas[0], sp_tokenizer), (gpt2, bpe_tokenizer)]):
        ens = EnsembleLM(members, vocab_map="mined", top_k=5, max_length=5, batch_size=2)  # 5: several windows
        _, docs = lm_perplexity_by_domain(ens, {"d": texts}, window=5, per_document=True,
                                          convention="lm_eval_rolling")
        rolled = ens.loglikelihood_rolling(rolling_requests(texts))
        assert np.allclose(docs.nll_nats, [-r for r in rolled], rtol=0, atol=1e-5)  # rolling sums in float32
    # one member: the model's own perplexity under the same windows
    ens = EnsembleLM([(llamas[0], sp_tokenizer)], batch_size=3)
    got = lm_perplexity_by_domain(ens, {"d": texts}, window=6, convention="lm_eval_rolling")
    want = perplexity_by_domain(llamas[0], sp_tokenizer, {"d": texts}, window=6, convention="lm_eval_rolling")
    assert float(got.nll_nats[0]) == pytest.approx(float(want.nll_nats[0]), abs=1e-4)
