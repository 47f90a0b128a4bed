"""The pipeline end to end on the micro world, at a small budget: every stage, caching, kill -9 resume,
determinism from the seed, and `fuselab plan`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.config import load_config
from harness.pipeline import build_plan, run_experiment

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"

# Small but complete: every stage and baseline runs; sizes cut so one run takes about a minute on 2 cores.
SMALL = [
    "corpus.max_docs_per_domain=10",
    "training.max_steps=6",
    "training.per_device_batch_size=4",
    "baselines.domain_pool.max_steps=3",
    "evaluation.settings.limit=6",
    "evaluation.settings.max_gen_toks=8",
    "evaluation.perplexity.max_docs_per_domain=3",
]


def small_config(workdir: Path, *extra: str):
    return load_config(QUICKSTART, [f"workdir={workdir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, micro_world):
    wd = tmp_path_factory.mktemp("pipeline-a")
    return wd, run_experiment(small_config(wd), progress=False)


def test_every_method_gets_a_row(first_run):
    _, res = first_run
    models = list(res.results["model"])
    assert models[:3] == ["llama-docs", "neox-code", "mpt-arithmetic"]
    assert {"clm", "fusellm", "ensemble", "merge:linear", "merge:ties"} <= set(models)
    assert {m for m in models if m.startswith("expert:")} == {"expert:arithmetic", "expert:code", "expert:docs"}
    methods = dict(zip(res.results["model"], res.results["method"]))
    assert methods["llama-docs"] == "target" and methods["neox-code"] == "source" and methods["fusellm"] == "FuseLLM"
    assert {"micro", "bpb_docs", "bpb_code", "bpb_arithmetic", "bpb_avg"} <= set(res.results.columns)
    # the ensemble gets task scores and bits per byte (scored on the target's tokenization, same windows)
    ens = res.results.set_index("model").loc["ensemble"]
    assert 0.0 <= ens["micro"] <= 1.0
    assert all(0.0 < ens[c] < 20.0 for c in ("bpb_docs", "bpb_code", "bpb_arithmetic", "bpb_avg"))
    assert res.metrics["fusellm/bpb_avg"] == pytest.approx(res.results.set_index("model").loc["fusellm", "bpb_avg"])
    assert len(res.losses["fusellm"]) >= 1 and len(res.losses["clm"]) >= 1


def test_every_score_has_an_interval_and_paired_tests(first_run):
    """The micro run keeps per-item and per-document scores: each results column gets a bootstrap interval
    around exactly its value, with n = items (6 tasks x limit 6) or documents (3 per domain); every model is
    tested against the target and CLM-only on the same units."""
    wd, res = first_run
    iv = res.intervals.set_index(["model", "score"])
    table = res.results.set_index("model")
    for model, row in table.iterrows():
        for col in ("micro", "bpb_docs", "bpb_code", "bpb_arithmetic", "bpb_avg"):
            got = iv.loc[(model, col)]
            assert got["estimate"] == pytest.approx(row[col], rel=1e-9), (model, col)
            assert got["lo"] <= row[col] + 1e-12 and row[col] - 1e-12 <= got["hi"]
            assert got["n"] == (36 if col == "micro" else 9 if col == "bpb_avg" else 3)
    cmp = res.comparisons
    fl = cmp[(cmp.model == "fusellm") & (cmp.score == "bpb_code")].set_index("reference")
    assert set(fl.index) == {"target", "CLM-only"} and set(fl.reference_model) == {"llama-docs", "clm"}
    for ref, ref_model in (("target", "llama-docs"), ("CLM-only", "clm")):
        assert fl.loc[ref, "difference"] == pytest.approx(table.loc["fusellm", "bpb_code"]
                                                          - table.loc[ref_model, "bpb_code"], rel=1e-9)
        assert 0 < fl.loc[ref, "p_value"] <= 1 and fl.loc[ref, "exact"]  # 3 documents: enumerated
    assert not len(cmp[(cmp.model == "llama-docs") & (cmp.reference == "target")])
    assert (res.run_dir / "intervals.csv").is_file() and (res.run_dir / "comparisons.csv").is_file()


def test_rerun_is_fully_cached(first_run):
    wd, res = first_run
    again = run_experiment(small_config(wd), progress=False)
    assert again.stages_run == 0
    pd.testing.assert_frame_equal(again.results, res.results)
    # cached stages report the time they took when they were built
    first = res.stage_times.set_index("stage")
    later = again.stage_times.set_index("stage")
    assert later["cached"].all() and not first["cached"].any()
    assert list(later.index) == list(first.index) and "train/fusellm" in later.index
    # (recorded before the stage's files are synced and renamed, so a little under this run's own timing)
    gap = first["seconds"] - later["seconds"]
    assert (gap >= 0).all() and gap.max() < 0.5 and later["seconds"].min() > 0


def test_changing_lambda_retrains_without_reextracting(first_run):
    wd, _ = first_run
    plan = build_plan(small_config(wd, "fusion.lam=0.5"))
    will_run = sorted(n for n in plan.stages if not plan.cached(n))
    assert will_run == ["eval/fusellm", "train/fusellm"]


def test_same_seed_from_empty_cache_gives_identical_metrics(first_run, tmp_path):
    _, res = first_run
    other = run_experiment(small_config(tmp_path / "b"), progress=False)
    assert other.stages_run > 0 and other.metrics == res.metrics


def test_killed_run_resumes_to_the_same_outputs(first_run, tmp_path):
    _, res = first_run
    wd = tmp_path / "killed"
    args = [sys.executable, "-m", "harness.cli", "run", str(QUICKSTART), f"workdir={wd}", *SMALL, "--no-track"]
    import torch

    # the same intra-op threads as this process: a float reduction over another thread count differs in the last
    # bits, and the stages the killed process finishes (CLM-only trains before FuseLLM) must equal the first run's
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[run]    train/fusellm" in line:  # kill in the middle of training
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    plan = build_plan(small_config(wd))
    assert plan.cached("fused") and not plan.cached("train/fusellm")
    resumed = run_experiment(small_config(wd), progress=False, track=False)
    # the stages finished before the kill are not recomputed
    assert "fused" not in resumed.stage_timings and "train/fusellm" in resumed.stage_timings
    assert resumed.metrics == res.metrics


def test_plan_cli_shows_cached_and_pending_stages(first_run):
    wd, _ = first_run
    out = subprocess.run([sys.executable, "-m", "harness.cli", "plan", str(QUICKSTART), f"workdir={wd}", *SMALL,
                          "fusion.fusion=avgce"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    stage_table = out.stdout.split("\nestimates:")[0]
    lines = {ln.split()[0]: ln for ln in stage_table.splitlines()[1:] if ln.strip()}
    assert "cached" in lines["corpus"] and "cached" in lines["distributions/neox-code"]
    assert "will run" in lines["fused"] and "will run" in lines["train/fusellm"]
    assert "cached" in lines["train/clm"]


def test_reference_switches_reach_the_vocab_and_aligned_stages(tmp_path, micro_world):
    """`fusion.preset: reference` (with the switches the quickstart spells out set to their reference values too)
    keys and builds the vocab and aligned stages with every switch: the stage output equals FuseLab's functions
    called directly with those switches, the target's own top-k included (empty_rows: target)."""
    import datasets
    import numpy as np

    from fusion.aligned import align_distribution
    from fusion.align import dtw_align
    from fusion.distributions import topk_arrays
    from fusion.tokens import tokenize_document
    from fusion.vocab import build_vocab_map
    from harness.executor import Executor

    few = "corpus.max_docs_per_domain=3"
    ref = small_config(tmp_path, few, "fusion.preset=reference", "fusion.vocab_map=em", "fusion.alignment=dtw",
                       "fusion.fallback_onehot=current_token", "fusion.duplicate_ids=first")
    default = build_plan(small_config(tmp_path, few, "fusion.vocab_map=em"))
    plan = build_plan(ref)
    src, tgt = "neox-code", ref.target.label
    assert plan.stages[f"distributions/{src}"].key == default.stages[f"distributions/{src}"].key
    assert plan.stages[f"vocab/{src}"].key != default.stages[f"vocab/{src}"].key
    assert {k: plan.stages[f"vocab/{src}"].settings[k] for k in ("text", "special_tokens")} == \
        {"text": "reference", "special_tokens": "string"}
    assert {k: plan.stages[f"aligned/{src}"].settings[k] for k in ("position0", "empty_rows")} == \
        {"position0": "prepend_marker", "empty_rows": "target"}
    ex = Executor(plan, progress=False)
    rows = ex.env.corpus_rows(plan.stages["corpus"]) if ex.ensure(plan.stages["corpus"]) else None
    rows = rows["train"]
    vocab_dir = ex.ensure(plan.stages[f"vocab/{src}"])
    aligned = datasets.load_from_disk(str(ex.ensure(plan.stages[f"aligned/{src}"]) / "dataset"))

    src_tok, tgt_tok = (ex.env.tokenizer(ref.model_by_label(label)) for label in (src, tgt))
    vm = build_vocab_map("em", src_tok, tgt_tok, text="reference", special_tokens="string")
    np.testing.assert_array_equal(np.load(vocab_dir / "source_to_target.npy"), vm.source_to_target)
    np.testing.assert_array_equal(np.load(vocab_dir / "prefixed_to_target.npy"), vm.prefixed_to_target)
    text = {row["doc_id"]: row["text"] for row in rows}
    src_rows, tgt_rows = ({row["doc_id"]: row for row in datasets.load_from_disk(
        str(plan.path(f"distributions/{label}") / "dataset"))} for label in (src, tgt))
    assert len(aligned) == len(rows) > 0
    for row in aligned:
        doc = row["doc_id"]
        tt, st = tokenize_document(tgt_tok, text[doc]), tokenize_document(src_tok, text[doc])
        s_ids, s_lp, _ = topk_arrays(src_rows[doc], 10)
        t_ids, t_lp, _ = topk_arrays(tgt_rows[doc], 10)
        ids, probs = align_distribution(tt, st, s_ids, s_lp, dtw_align(tt, st), vm, fallback_onehot="current_token",
                                        duplicate_ids="first", position0="prepend_marker", empty_rows="target",
                                        target_ids=t_ids, target_logprobs=t_lp)
        np.testing.assert_array_equal(np.asarray(row["ids"]).reshape(len(tt), -1), ids)
        np.testing.assert_array_equal(np.asarray(row["probs"], dtype=np.float32).reshape(len(tt), -1), probs)


def test_the_fusion_diagnostics_reach_the_results(first_run):
    _, res = first_run
    d = res.diagnostics
    assert list(d.columns) == ["source", "domain", "figure", "value", "n"]
    assert set(d["domain"]) == {"docs", "code", "arithmetic", "all"}
    # every source on the target's positions; every model's top-k mass and candidate choice
    assert set(d.loc[d["figure"] == "share_usable", "source"]) == {"neox-code", "mpt-arithmetic"}
    assert set(d.loc[d["figure"] == "topk_mass", "source"]) == {"llama-docs", "neox-code", "mpt-arithmetic"}
    assert (res.run_dir / "diagnostics.csv").is_file()


def test_the_test_split_rescores_the_same_models_on_the_worlds_test_documents(first_run, micro_world):
    from harness.stages.evaluate import held_out_rows

    wd, res = first_run
    test = run_experiment(small_config(wd, "evaluation.perplexity.split=test", "evaluation.suites=[]"),
                          progress=False)
    built = test.stage_times[~test.stage_times["cached"]]["stage"].tolist()
    assert built and all(s.startswith("eval/") for s in built)  # the trained models come from the cache
    val, tst = res.results.set_index("model"), test.results.set_index("model")
    assert "micro" not in tst.columns
    assert (val.loc["fusellm", "bpb_avg"] != tst.loc["fusellm", "bpb_avg"]) and 0 < tst.loc["fusellm", "bpb_avg"] < 20
    rows = test.eval_long[(test.eval_long.suite == "perplexity") & (test.eval_long.metric == "bits_per_byte")]
    assert rows["windows"].str.endswith("; test split").all()

    class Env:  # a micro corpus stage built before corpora had a test split: the world's test split is read
        world = micro_world

        @staticmethod
        def corpus_rows(stage):
            return {"train": [], "validation": []}

    stage = type("Stage", (), {"corpus": small_config(wd).corpus})
    kept, expected = {}, []  # corpus.max_docs_per_domain=10: the first 10 of each domain, in the world's order
    for r in micro_world.corpus("test"):
        kept[r["domain"]] = kept.get(r["domain"], 0) + 1
        if kept[r["domain"]] <= 10:
            expected.append(r["text"])
    assert [r["text"] for r in held_out_rows(Env, stage, "test")] == expected
    assert held_out_rows(Env, stage, "validation") == []
