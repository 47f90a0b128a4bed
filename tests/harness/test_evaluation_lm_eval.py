"""lm-eval names as evaluation suites: a built-in task on a local copy of its data, include-path tasks, the offline
error naming the missing dataset, name checks before any model is loaded, the config field."""
from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest
import torch
import yaml

import tiny
from harness.evaluation import DataUnavailableError, EvalSettings, evaluate
from harness.evaluation.suites import suite_problems

torch.set_num_threads(1)
NO_CODE = EvalSettings(multipl_e_languages=())


@pytest.fixture()
def empty_hf_caches(tmp_path, monkeypatch):
    """Offline, with Hugging Face caches that hold nothing (whatever this machine has cached)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-ds-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ids = context_ids + whole[len(context_ids):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
    return float(sum(logprobs[i - 1, ids[i]] for i in range(len(context_ids), len(ids))))


def _arc_rows(shared_data, n: int) -> list[dict]:
    with gzip.open(shared_data / "commonsense/arc_easy_validation.ai2olmo.jsonl.gz", "rt") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def test_builtin_arc_easy_on_a_local_copy_scores_as_by_hand(tiny_llama_dir, sp_tokenizer, shared_data, tmp_path,
                                                           empty_hf_caches):
    """lm-eval's own `arc_easy` (its prompt, choices, target, metrics), its dataset pointed at local JSON through an
    include-path group that overrides dataset_path/dataset_kwargs: lm-eval's documented override form."""
    rows = _arc_rows(shared_data, 5)
    data = tmp_path / "arc_local" / "arc_easy.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data.parent / "arc_easy_local.yaml").write_text(yaml.safe_dump({
        "group": "arc_easy_local",
        "task": [{"task": "arc_easy", "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {"train": str(data), "validation": str(data), "test": str(data)}}}]}))
    frame = evaluate(tiny_llama_dir, ["arc_easy_local"], NO_CODE, include_paths=[data.parent], model_name="tiny")

    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    acc, acc_norm = [], []
    for row in rows:  # lm-eval's arc_easy: "Question: {{question}}\nAnswer:", " " + choice, gold = answerKey's index
        lls = np.array([_loglikelihood(model, sp_tokenizer, f"Question: {row['question']}\nAnswer:", " " + c)
                        for c in row["choices"]["text"]])
        gold = row["choices"]["label"].index(row["answerKey"])
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in row["choices"]["text"]])) == gold))
    task = frame[frame.task == "arc_easy"].set_index("metric")
    assert task.loc["acc", "value"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert task.loc["acc_norm", "value"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert task.loc["acc", "n"] == 5 and set(frame.suite) == {"arc_easy_local"}
    assert task.loc["acc", "primary"]  # lm-eval's metric_list order: acc first


def test_builtin_task_offline_without_data_names_the_dataset_before_loading_the_model(tmp_path, empty_hf_caches):
    start = time.monotonic()
    with pytest.raises(DataUnavailableError) as err:
        evaluate(tmp_path / "no-model-here", ["arc_easy", "ai2_arc"], NO_CODE)  # a model path never read
    message = str(err.value)
    assert "offline" in message
    assert "lm-eval task 'arc_easy' reads the hub dataset 'allenai/ai2_arc' (config 'ARC-Easy')" in message
    assert "lm-eval task 'arc_challenge' reads the hub dataset 'allenai/ai2_arc' (config 'ARC-Challenge')" in message
    assert "dataset_path: json" in message  # how to point it at a local copy
    assert time.monotonic() - start < 60  # indexing lm-eval's tasks, no network wait


def test_include_path_task_with_a_missing_data_file_fails_before_the_model(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gone.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "c",
        "doc_to_target": "g"}))
    with pytest.raises(DataUnavailableError, match=f"lm-eval task 'mine': data file\\(s\\) not found: {tmp_path}/gone"):
        evaluate(tmp_path / "no-model-here", ["mine"], NO_CODE, include_paths=[folder])


def test_include_path_task_evaluates(tiny_llama_dir, tmp_path):
    """A task defined only in an include path (no built-in index needed) scores every item of its local data."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"q": "the quick brown fox jumps over the", "c": ["lazy dog", "worm"], "g": 0},
            {"q": "hello world, hello", "c": ["fox", "fusion"], "g": 1}]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mine.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "d.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "c",
        "doc_to_target": "g", "metric_list": [{"metric": "acc"}]}))
    frame = evaluate(tiny_llama_dir, ["mine"], NO_CODE, include_paths=[folder])
    assert list(frame.task) == ["mine"] and list(frame.metric) == ["acc"] and list(frame.n) == [2]


def test_suite_problems_name_unknown_names_and_missing_datasets(tmp_path, empty_hf_caches):
    problems = suite_problems(["bbh", "micro", "arc_easyy", "hellaswag"], extra_names=["micro"])
    assert problems[0] == ("evaluation.suites: 'arc_easyy' is neither a FuseLab suite (bbh, commonsense, multipl_e) "
                           "nor an lm-eval task, group or tag (built-in or in the include paths); did you mean "
                           "arc_easy, arc_eu_easy, arc_es?")  # difflib's 3 closest names, closest first
    assert len(problems) == 2 and "'hellaswag' reads the hub dataset 'Rowan/hellaswag'" in problems[1]
    assert suite_problems(["bbh", "commonsense", "micro"], extra_names=["micro"]) == []  # nothing to index
    assert suite_problems(["x"], include_paths=[tmp_path / "nope"]) == [
        f"evaluation.include_path: folder {tmp_path / 'nope'} does not exist"]


def test_config_include_path_must_exist(tmp_path):
    from harness.config import ConfigError, load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "t", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
                                        "sources": [{"ref": "micro:llama-docs"}]}))
    cfg = load_config(cfg_file, [f"evaluation.include_path=[{tmp_path}]", "evaluation.suites=[arc_easy,micro]"])
    assert cfg.evaluation.include_path == [str(tmp_path)] and cfg.evaluation.suites == ["arc_easy", "micro"]
    assert cfg.evaluation.settings.bbh_strip_whitespace is False
    with pytest.raises(ConfigError, match="evaluation.include_path.0: folder /no/such/tasks does not exist"):
        load_config(cfg_file, ["evaluation.include_path=[/no/such/tasks]"])
