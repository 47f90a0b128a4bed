"""Each stage kind's build on tiny inputs (two tiny local models, a small text corpus), one stage at a time
through the executor, without running the whole pipeline. Oracles come from what each stage is documented to
write (harness/stages/*.py, docs/ARCHITECTURE.md), not from re-running its code."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tests.tiny as tiny
from fusion.tokens import tokenize_document
from harness.config import validate_config
from harness.executor import Executor
from harness.plan import build_plan
from harness.results import LONG_COLUMNS

BLOCK = 24


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir):
    wd = tmp_path_factory.mktemp("stages")
    text, code = wd / "notes.jsonl", wd / "code.jsonl"  # one document per row, the domain is the file stem
    text.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(tiny.TRAIN_TEXT[:8])))
    code.write_text("".join(json.dumps({"text": f"{t}# {i}\n"}) + "\n"
                            for i, t in enumerate(tiny.TRAIN_TEXT[2:4] * 4)))
    cfg = validate_config({
        "name": "stages", "workdir": str(wd / "work"),
        "target": {"name": "tl", "ref": str(tiny_llama_dir)},
        "sources": [{"name": "tl", "ref": str(tiny_llama_dir)}, {"name": "tg", "ref": str(tiny_gpt2_dir)}],
        "corpus": {"kind": "jsonl", "paths": [str(text), str(code)], "validation_fraction": 0.25},
        "fusion": {"top_k": 4, "extraction_batch_size": 4},
        "training": {"block_size": BLOCK, "per_device_batch_size": 2, "max_steps": 2, "logging_steps": 1},
        "baselines": {"clm": True, "ensemble": {"enabled": False}, "domain_pool": {"enabled": True, "max_steps": 2},
                      "merges": [{"name": "half", "config": {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": "contestant:fusellm", "parameters": {"weight": 0.5}},
                       {"model": "contestant:target", "parameters": {"weight": 0.5}}]}}]},
        "evaluation": {"suites": [], "perplexity": {"window": 16, "stride": 8, "max_docs_per_domain": 2}},
        "methods": {"fuse_then_merge": {"merges": [{"method": "linear"}]}},
    })
    import os
    os.environ.pop("FUSELAB_WORKDIR", None)
    p = build_plan(cfg)
    return p, Executor(p, progress=False)


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_corpus_splits_documents_to_fit_every_tokenizer(plan, tiny_llama_dir, tiny_gpt2_dir):
    p, ex = plan
    from harness.stages.corpus import read_corpus

    rows = read_corpus(ex.ensure(p.stages["corpus"]))
    assert set(rows) == {"train", "validation"}
    assert [r["doc_id"] for r in rows["train"]] == list(range(len(rows["train"])))
    assert {r["domain"] for r in rows["train"]} == {"notes", "code"}
    for path in (tiny_llama_dir, tiny_gpt2_dir):
        tok = _tok(path)
        assert max(len(tokenize_document(tok, r["text"])) for r in rows["train"]) <= BLOCK


def test_distributions_one_row_per_document_with_its_tokens(plan, tiny_gpt2_dir):
    p, ex = plan
    ds = datasets.load_from_disk(str(ex.ensure(p.stages["distributions/tg"]) / "dataset"))
    rows = ex.env.corpus_rows(p.stages["corpus"])["train"]
    assert ds["doc_id"] == [r["doc_id"] for r in rows]
    tok = _tok(tiny_gpt2_dir)
    for row, doc in zip(ds, rows):
        n = len(tokenize_document(tok, doc["text"]))
        assert row["n_tokens"] == n and len(row["topk_ids"]) == len(row["topk_logprobs"]) == n * 4
        assert np.all(np.exp(np.asarray(row["topk_logprobs"], dtype=np.float32)).reshape(n, 4).sum(1) <= 1.001)


def test_vocab_map_covers_the_source_vocabulary(plan, tiny_gpt2_dir, tiny_llama_dir):
    p, ex = plan
    out = ex.ensure(p.stages["vocab/tg"])
    m = np.load(out / "source_to_target.npy")
    assert m.shape == (len(_tok(tiny_gpt2_dir)),) and m.dtype == np.int32
    assert m.max() < len(_tok(tiny_llama_dir)) and m.min() >= -1
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"method": "mined", "mapped": int((m >= 0).sum()), "source_vocab": len(m)}


def test_aligned_rows_are_on_the_target_tokenization(plan, tiny_llama_dir):
    p, ex = plan
    ds = datasets.load_from_disk(str(ex.ensure(p.stages["aligned/tg"]) / "dataset"))
    tok = _tok(tiny_llama_dir)
    for row, doc in zip(ds, ex.env.corpus_rows(p.stages["corpus"])["train"]):
        assert len(row["ids"]) == len(row["probs"]) == len(tokenize_document(tok, doc["text"])) * 4


def test_fused_mince_takes_the_lower_ce_model_per_document(plan):
    p, ex = plan
    out = ex.ensure(p.stages["fused"])
    tgt = datasets.load_from_disk(str(ex.env.path(p.stages["distributions/tl"]) / "dataset"))
    src = datasets.load_from_disk(str(ex.env.path(p.stages["distributions/tg"]) / "dataset"))
    n_target = sum(float(a) <= float(b) for a, b in zip(tgt["ce"], src["ce"]))  # MinCE ties keep the target
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == len(tgt)
    assert stats["mince_chosen"].get("tl", 0) == n_target and stats["mince_chosen"].get("tg", 0) == len(tgt) - n_target
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.column_names == ["doc_id", "input_ids", "fused_ids", "fused_probs", "k"]


def test_train_records_a_loss_per_step(plan):
    p, ex = plan
    out = ex.ensure(p.stages["train/fusellm"])
    rec = json.loads((out / "train_result.json").read_text())
    assert sorted(int(s) for s in rec["losses"]) == [1, 2] and rec["model_dir"] == "model"
    assert (out / "model" / "model.safetensors").is_file()


def test_linear_merge_is_the_mean_of_the_pairwise_fused_targets(plan):
    p, ex = plan
    # fuse-then-merge with one source: one fused target (fused/tg -> train/fuse-tg), merged linearly = itself
    merged = load_file(str(ex.ensure(p.stages["merge/fuse-then-linear"]) / "model" / "model.safetensors"))
    single = load_file(str(ex.env.path(p.stages["train/fuse-tg"]) / "model" / "model.safetensors"))
    for name, w in single.items():
        torch.testing.assert_close(merged[name], w, rtol=1e-6, atol=1e-7)


def test_eval_writes_the_long_format(plan):
    p, ex = plan
    from harness.stages.evaluate import read_eval

    long = read_eval(ex.ensure(p.stages["eval/tg"]))
    assert set(LONG_COLUMNS) <= set(long.columns) and set(long["model"]) == {"tg"}
    bpb = long[long["metric"] == "bits_per_byte"]
    assert sorted(bpb["task"]) == ["code", "notes"] and (bpb["value"] > 0).all()
    assert set(bpb["windows"]) == {"FuseLab strided windows (window 16, stride 8)"}  # the config's windows, named


def test_every_stage_key_changes_with_its_version(plan):
    from harness.stages.fused import FusedStage

    p, _ = plan
    fused = p.stages["fused"]
    before = fused.key
    FusedStage.version += 1
    try:
        fused.__dict__.pop("_key")
        assert fused.key != before
    finally:
        FusedStage.version -= 1
        fused.__dict__.pop("_key")
    assert fused.key == before


def test_a_mergekit_config_over_contestants_merges_their_models(plan, tiny_llama_dir):
    p, ex = plan
    # linear, weights 0.5 / 0.5 (mergekit normalises by their sum): every tensor is (fusellm + target) / 2
    assert "merge:half" in [c.label for c in p.contestants]
    assert p.stages["merge/half"].inputs() == {"models.0": p.stages["train/fusellm"]}
    merged = load_file(str(ex.ensure(p.stages["merge/half"]) / "model" / "model.safetensors"))
    fused = load_file(str(ex.env.path(p.stages["train/fusellm"]) / "model" / "model.safetensors"))
    target = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    for name, w in fused.items():
        torch.testing.assert_close(merged[name], (w + target[name]) / 2, rtol=0, atol=1e-6)


def test_diagnostics_shares_coverage_and_choices_per_source_and_domain(plan, tiny_llama_dir, tiny_gpt2_dir):
    from fusion.diagnostics import POSITION_CATEGORIES
    from harness.stages.diagnostics import read_diagnostics

    p, ex = plan
    fusellm = next(c for c in p.contestants if c.label == "fusellm")
    assert p.stages["diagnostics"] in fusellm.figures_from  # its figures reach FuseLLM's MLflow run live
    folder = ex.ensure(p.stages["diagnostics"])
    table = read_diagnostics(folder)
    assert list(table.columns) == ["source", "domain", "figure", "value", "n"]
    fig = table.set_index(["source", "domain", "figure"])
    rows = ex.env.corpus_rows(p.stages["corpus"])["train"]
    tl, tg = _tok(tiny_llama_dir), _tok(tiny_gpt2_dir)

    def in_domain(domain):
        return [r for r in rows if domain in (r["domain"], "all")]

    def positions(tok, domain):  # every token of a document predicts the next one but the last (EOS)
        return sum(len(tokenize_document(tok, r["text"])) - 1 for r in in_domain(domain))

    for domain in ("notes", "code", "all"):
        shares = [fig.loc[("tg", domain, f"share_{c}")] for c in POSITION_CATEGORIES]
        assert sum(s["value"] for s in shares) == pytest.approx(1.0)
        assert {int(s["n"]) for s in shares} == {positions(tl, domain)}
        carried = fig.loc[("tg", domain, "coverage"), "n"]
        assert carried == round(fig.loc[("tg", domain, "share_carried"), "value"] * positions(tl, domain)) > 0
        for name in ("coverage", "target_coverage", "mass_kept"):
            assert 0.0 <= fig.loc[("tg", domain, name), "value"] <= 1.0 and fig.loc[("tg", domain, name), "n"] == carried
        assert fig.loc[("tl", domain, "topk_mass"), "n"] == positions(tl, domain)
        assert fig.loc[("tg", domain, "topk_mass"), "n"] == positions(tg, domain)
        docs = len(in_domain(domain))
        assert sum(fig.loc[(m, domain, "picked"), "value"] for m in ("tl", "tg")) == docs
        assert sum(fig.loc[(m, domain, "mean_weight"), "value"] for m in ("tl", "tg")) == pytest.approx(1.0)
    # the picks over every document are the fused stage's MinCE choices
    chosen = json.loads((ex.env.path(p.stages["fused"]) / "stats.json").read_text())["mince_chosen"]
    assert {m: int(fig.loc[(m, "all", "picked"), "value"]) for m in ("tl", "tg")} == \
        {m: chosen.get(m, 0) for m in ("tl", "tg")}
    stats = p.stages["diagnostics"].figures(folder)  # what MLflow gets: the finite values, flat
    assert stats["tg/code/share_usable"] == fig.loc[("tg", "code", "share_usable"), "value"]
    assert len(stats) == int(np.isfinite(table["value"]).sum())


def test_a_merge_mergekit_cannot_run_is_one_line_naming_the_stage(plan, tmp_path):
    """A config mergekit accepts at load but cannot run (a model path without weights): MergeFailed naming the
    stage, which the CLI prints as one line (harness.cli.EXPECTED_ERRORS)."""
    from harness.cli import is_expected
    from harness.stages.merge import MergeFailed, MergeStage

    p, ex = plan
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    stage = MergeStage("merge/broken", [], None, {}, config={
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(empty), "parameters": {"weight": 0.5}},
                   {"model": "contestant:target", "parameters": {"weight": 0.5}}]},
        refs=[], specs={"target": p.cfg.target})
    with pytest.raises(MergeFailed, match=r"^merge/broken: mergekit could not merge \(linear\): ") as err:
        ex.ensure(stage)
    assert is_expected(err.value)


def test_diagnostics_figures_reach_the_fusellm_run_live(plan, tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.runlog import LiveLog
    from harness.stages.diagnostics import read_diagnostics
    from harness.tracking import ExperimentRuns, Tracker

    p, ex = plan
    stage = p.stages["diagnostics"]
    folder = ex.ensure(stage)
    tracker = Tracker(None, "live-diagnostics", tmp_path)
    with tracker.run("exp") as parent:
        live = ExperimentRuns(tracker, parent.info.run_id)
        LiveLog(live, p).on_stage(stage, folder, 0.5, False)  # what the executor calls when the stage is done
        run_id = live.child("fusellm")
        live.close("FINISHED")
    metrics = MlflowClient(tracker.uri).get_run(run_id).data.metrics
    table = read_diagnostics(folder).set_index(["source", "domain", "figure"])["value"]
    assert metrics["diagnostics/tg/code/share_usable"] == pytest.approx(table[("tg", "code", "share_usable")])
    assert metrics["diagnostics/tl/all/picked"] == table[("tl", "all", "picked")]


def test_domain_pool_trains_one_expert_per_domain_from_the_target(plan, tiny_llama_dir):
    p, ex = plan
    from harness.stages.domain_pool import read_experts

    experts = read_experts(ex.ensure(p.stages["domain_pool"]))
    assert sorted(experts) == ["code", "notes"]  # the corpus files' stems
    target = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    weights = {d: load_file(str(folder / "model.safetensors")) for d, folder in experts.items()}
    for w in weights.values():  # structurally identical to the target (mergeable), and trained away from it
        assert set(w) == set(target) and all(w[n].shape == target[n].shape for n in target)
        assert any(not torch.equal(w[n], target[n]) for n in target)
    assert any(not torch.equal(weights["code"][n], weights["notes"][n]) for n in target)
