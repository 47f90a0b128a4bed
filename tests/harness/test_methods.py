"""Adding a method through the public extension points only (harness.methods.register_method, Graph.train /
Graph.fuse, harness.contestants): it appears in the plan, the run, the results, MLflow and the report.
Also the shipped recipes' config checks (KD needs the target's tokenizer; unknown methods fail at load)."""
from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict

import tests.tiny as tiny
from harness.config import ConfigError, validate_config
from harness.contestants import Contestant, StageModel
from harness.methods import METHODS, register_method
from harness.pipeline import build_plan, run_experiment
from harness.tracking import Tracker

HALF = "FuseLLM lam=0.5"


class HalfParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = 0.5


if "fusellm_half" not in METHODS:
    @register_method("fusellm_half", params=HalfParams)
    def fusellm_half(graph, params: HalfParams) -> list[Contestant]:
        """The target trained on the FuseLLM fused set with another lambda, as its own contestant."""
        st = graph.train("train/fusellm-half", graph.fuse(), params.lam)
        return [Contestant("fusellm-half", HALF, StageModel("fusellm-half", st), made_by=[st], losses_from=st)]


def _config(wd, tiny_llama_dir, tiny_gpt2_dir, methods):
    notes = wd / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(tiny.TRAIN_TEXT[:8])))
    return validate_config({
        "name": "toy-method", "workdir": str(wd / "work"),
        "target": {"name": "tl", "ref": str(tiny_llama_dir)},
        "sources": [{"name": "tl", "ref": str(tiny_llama_dir)}, {"name": "tg", "ref": str(tiny_gpt2_dir)}],
        "corpus": {"kind": "jsonl", "paths": [str(notes)], "validation_fraction": 0.25},
        "fusion": {"top_k": 4, "extraction_batch_size": 4},
        "training": {"block_size": 24, "per_device_batch_size": 2, "max_steps": 2, "logging_steps": 1},
        "baselines": {"clm": False, "ensemble": {"enabled": False}},
        "evaluation": {"suites": [], "perplexity": {"window": 16, "stride": 8, "max_docs_per_domain": 2}},
        "methods": methods,
    })


@pytest.mark.slow
def test_a_registered_method_is_planned_run_tracked_and_reported(tmp_path, tiny_llama_dir, tiny_gpt2_dir,
                                                                  monkeypatch):
    from studies.report import report_main

    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    cfg = _config(tmp_path, tiny_llama_dir, tiny_gpt2_dir,
                  {"fusellm_half": {"lam": 0.5}, "kd": {"teacher": {"name": "teacher", "ref": str(tiny_llama_dir)}}})
    plan = build_plan(cfg)
    assert {"train/fusellm-half", "eval/fusellm-half", "teacher_set/teacher", "train/kd", "eval/kd"} <= set(plan.stages)
    assert plan.stages["train/fusellm-half"].lam == 0.5 and plan.stages["train/kd"].lam == cfg.fusion.lam
    assert [c.label for c in plan.contestants] == ["tl", "tg", "fusellm", "fusellm-half", "kd"]
    tracker = Tracker(None, "toy-method", tmp_path / "work")
    result = run_experiment(cfg, tracker=tracker, progress=False)
    rows = result.results.set_index("model")
    assert rows.loc["fusellm-half", "method"] == HALF and rows.loc["kd", "method"] == "KD"
    assert rows.loc["fusellm-half", "bpb_avg"] > 0 and "fusellm-half" in result.losses
    # lam = 0.5 trains another model than lam = 0.9: its scores differ from FuseLLM's
    assert rows.loc["fusellm-half", "bpb_avg"] != rows.loc["fusellm", "bpb_avg"]
    client = MlflowClient(tracker.uri)
    parent = client.search_runs([tracker.experiment_id], "tags.`fuselab.kind` = 'experiment'")[0]
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_model = {r.data.tags["fuselab.model"]: r for r in children}
    assert by_model["fusellm-half"].data.tags["fuselab.method"] == HALF
    assert by_model["fusellm-half"].data.metrics["bpb_avg"] == rows.loc["fusellm-half", "bpb_avg"]
    md = report_main(parent.info.run_id, tmp_path / "work", tmp_path / "report").read_text()
    assert re.search(r"\| fusellm-half +\| FuseLLM lam=0\.5 +\|", md) and re.search(r"\| kd +\| KD +\|", md)


def test_kd_refuses_a_teacher_with_another_tokenizer(tmp_path, tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    from harness.executor import Executor
    from harness.recipes.kd import TokenizerMismatch

    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    cfg = _config(tmp_path, tiny_llama_dir, tiny_gpt2_dir, {"kd": {"teacher": {"name": "t2", "ref": str(tiny_gpt2_dir)}}})
    plan = build_plan(cfg)
    with pytest.raises(TokenizerMismatch, match=r"teacher_set/t2: teacher t2 has \d+ tokens in doc_id 0"):
        Executor(plan, progress=False).ensure(plan.stages["teacher_set/t2"])


@pytest.mark.parametrize("methods, message", [
    ({"no_such_method": {}}, r"methods: unknown method 'no_such_method'; registered: .*fuse_then_merge.*kd"),
    ({"kd": {"teachr": {"ref": "x"}}}, r"kd\.teacher: Field required|kd\.teachr"),
    ({"fuse_then_merge": {"merges": [{"method": "tie"}]}}, r"unknown merge method 'tie'"),
    ({"kd": {}}, r"kd\.: Value error, give the teacher|give the teacher: either teacher"),
    ({"kd": {"teacher": {"ref": "x"}, "micro_teacher": {}}}, r"give the teacher: either teacher"),
    ({"kd": {"micro_teacher": {"hiden": 64}}}, r"kd\.micro_teacher\.hiden"),
])
def test_method_typos_fail_when_the_config_loads(tmp_path, tiny_llama_dir, tiny_gpt2_dir, methods, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tiny_llama_dir, tiny_gpt2_dir, methods)


def test_the_micro_teacher_trains_on_the_targets_mix():
    """mix_of: the wider teacher draws the target's sample of the other domains, so it is trained on the same
    documents in the same order, hence gets the same tokenizer (MicroTeacherStage checks the files too)."""
    from dataclasses import replace

    from harness.micro import SOURCE_SPECS
    from harness.micro.sources import training_mix

    rows = [{"domain": d, "text": f"{d} document {i} " * 5} for d in ("docs", "code", "arithmetic") for i in range(40)]
    target = next(s for s in SOURCE_SPECS if s.name == "llama-docs")
    wide = replace(target, name="llama-docs-wide", hidden=128, layers=4)
    assert training_mix(wide, rows, 0, 0.8, mix_of="llama-docs") == training_mix(target, rows, 0, 0.8)
    assert training_mix(wide, rows, 0, 0.8) != training_mix(target, rows, 0, 0.8)  # its own name: another sample


def test_the_three_table7_experts_get_three_keys_and_three_distributions(tmp_path, micro_world, monkeypatch):
    """Issue 18 (Table 7): structurally identical experts (same architecture, tokenizer, file sizes) must not
    share a distributions cache entry: each is identified by the pool stage's key and its domain."""
    from pathlib import Path

    import datasets
    import numpy as np

    from harness.config import load_config
    from harness.executor import Executor

    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    base = Path(__file__).resolve().parents[2] / "studies" / "micro_table7_base.yaml"
    cfg = load_config(base, [f"workdir={tmp_path}", "corpus.max_docs_per_domain=3",
                             "baselines.domain_pool.max_steps=2", "training.block_size=64"])
    plan = build_plan(cfg)
    stages = [plan.stages[f"distributions/expert-{d}"] for d in ("docs", "code", "arithmetic")]
    assert len({st.key for st in stages}) == 3
    assert all(st.inputs()["requires.0"] is plan.stages["domain_pool"] for st in stages)
    ex = Executor(plan, progress=False)
    logprobs = [np.concatenate([np.asarray(r, dtype=np.float32) for r in datasets.load_from_disk(
        str(ex.ensure(st) / "dataset"))["topk_logprobs"]]) for st in stages]
    assert all(not np.array_equal(logprobs[i], logprobs[j]) for i in range(3) for j in range(i + 1, 3))


def test_the_micro_teacher_leaves_the_process_as_it_found_it():
    """train_source sets one thread, deterministic kernels and seeds: the stages after a teacher built in this
    process must compute as they would with the teacher cached."""
    import random

    import torch

    from harness.recipes.kd import _process_state_kept

    threads, state = torch.get_num_threads(), torch.get_rng_state()
    random.seed(5)
    expected = random.random()
    random.seed(5)
    with _process_state_kept():
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(123)
        random.seed(123)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), state) and random.random() == expected
