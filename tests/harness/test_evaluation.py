"""evaluate() through real lm-eval: hand-computed accuracy, offline failure, the shared-data suites, task YAML."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import yaml

import tiny
from harness.evaluation import DataUnavailableError, EvalSettings, evaluate, suite_tasks
from harness.evaluation.data import BBH_TASKS
from harness.evaluation.suites import primary_metric_key, results_to_frame
from harness.evaluation.taskgen import parse_cot_prompt, write_suite_tasks

# Two cores shared by several sessions: one thread per forward pass is ~10x faster than oversubscribing.
torch.set_num_threads(1)

MC_DOCS = [
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "early bird", "worm"], "gold": 0},
    {"question": "a stitch in time saves", "choices": ["nine", "the worm", "hello world"], "gold": 0},
    {"question": "two plus three equals", "choices": ["five", "seven", "forty two"], "gold": 0},
    {"question": "def add(a, b):", "choices": ["return a + b", "print(i)", "range(10)"], "gold": 0},
    {"question": "hello world, hello", "choices": ["fox", "fusion", "merging"], "gold": 1},
    {"question": "the early bird catches the", "choices": ["dog", "time", "worm"], "gold": 2},
]


@pytest.fixture()
def mc_task_dir(tmp_path):
    folder = tmp_path / "tinymc"
    folder.mkdir()
    data = folder / "tinymc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "tinymc.yaml").write_text(yaml.safe_dump({
        "task": "tinymc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    # lm-eval's causal split: encode context+continuation, the continuation is what follows the context's tokens.
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    continuation_ids = whole[len(context_ids):]
    inputs = torch.tensor([(context_ids + continuation_ids)[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=inputs).logits[0].float(), dim=-1)
    start = len(context_ids) - 1
    return float(sum(logprobs[start + i, tok] for i, tok in enumerate(continuation_ids)))


def test_multiple_choice_accuracy_equals_hand_computed(tiny_llama_dir, sp_tokenizer, mc_task_dir):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)   # the same weights as tiny_llama_dir
    acc, acc_norm = [], []
    for doc in MC_DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = np.array([_loglikelihood(model, sp_tokenizer, context, " " + c) for c in doc["choices"]])
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        acc.append(float(np.argmax(lls) == doc["gold"]))
        acc_norm.append(float(np.argmax(lls / lengths) == doc["gold"]))

    settings = EvalSettings(multipl_e_languages=())
    frame = evaluate(tiny_llama_dir, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="tiny")
    values = {row.metric: row.value for row in frame.itertuples()}
    assert values["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert values["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert set(frame["n"]) == {len(MC_DOCS)}
    assert set(frame["model"]) == {"tiny"} and set(frame["suite"]) == {"tinymc"}
    stderr = frame.set_index("metric")["stderr"]["acc"]
    assert stderr == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)), abs=1e-12)
    # Deterministic: a second run gives the identical frame.
    again = evaluate(tiny_llama_dir, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="tiny")
    assert again.equals(frame)


def test_unknown_suite_names_include_paths(tiny_llama_dir, mc_task_dir):
    with pytest.raises(ValueError, match="nosuchtask.*include_paths"):
        evaluate(tiny_llama_dir, ["nosuchtask"], EvalSettings(multipl_e_languages=()), include_paths=[mc_task_dir])


def test_offline_without_data_fails_fast_naming_files(tmp_path, monkeypatch, tiny_llama_dir):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("FUSELAB_DATA", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-ds-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    empty = tmp_path / "no-data"
    empty.mkdir()
    for suite, expected in [("bbh", ["<data_dir>/bbh/boolean_expressions.json", "<data_dir>/bbh/word_sorting.json",
                                     "<data_dir>/bbh/cot-prompts/navigate.txt"]),
                            ("commonsense", ["<data_dir>/commonsense/arc_easy_test.llmfoundry.jsonl",
                                             "<data_dir>/commonsense/hellaswag_validation.ai2olmo.jsonl.gz"]),
                            ("multipl_e", ["<data_dir>/multipl-e/humaneval-python.jsonl"])]:
        start = time.monotonic()
        with pytest.raises(DataUnavailableError) as err:
            evaluate(tiny_llama_dir, [suite], EvalSettings(multipl_e_languages=("python",)), data_dir=empty)
        assert time.monotonic() - start < 5
        message = str(err.value)
        for path in expected:
            assert path in message
        assert str(empty) in message


def test_shared_data_suites_run_with_a_limit_per_suite(tiny_llama_dir, shared_data, tmp_path):
    settings = EvalSettings(limit={"bbh": 1, "commonsense": 3, "multipl_e": 2}, max_gen_toks=8,
                            multipl_e_languages=("python", "js", "nosuchlang"))
    frame = evaluate(tiny_llama_dir, ["bbh", "commonsense", "multipl_e"], settings, data_dir=shared_data,
                     log_samples_dir=tmp_path / "samples")
    bbh = frame[frame.suite == "bbh"]
    assert list(bbh.task[:-1]) == suite_tasks("bbh", settings) and len(bbh) == 28
    assert bbh.iloc[-1].task == "fuselab_bbh" and bbh.iloc[-1].n == 27
    assert (bbh.n.iloc[:-1] == 1).all() and bbh.value.between(0, 1).all()

    commonsense = frame[frame.suite == "commonsense"]
    assert set(commonsense.metric) == {"acc", "acc_norm"}
    assert (commonsense[commonsense.task != "fuselab_commonsense"].n == 3).all()
    assert set(commonsense.task) == set(suite_tasks("commonsense", settings)) | {"fuselab_commonsense"}
    per_task = commonsense[(commonsense.task != "fuselab_commonsense") & (commonsense.metric == "acc")]
    group_acc = commonsense[(commonsense.task == "fuselab_commonsense") & (commonsense.metric == "acc")].value.item()
    assert group_acc == pytest.approx(per_task.value.mean())       # macro average over the 5 tasks

    code = frame[frame.suite == "multipl_e"].set_index("task")
    assert code.loc["fuselab_multipl_e_python", "n"] == 2 and code.loc["fuselab_multipl_e_js", "n"] == 2
    assert code.loc["fuselab_multipl_e_python", "value"] in (0.0, 0.5, 1.0)
    assert math.isnan(code.loc["fuselab_multipl_e_nosuchlang", "value"])
    assert code.loc["fuselab_multipl_e_nosuchlang", "note"].startswith("not run")
    assert (tmp_path / "samples" / "multipl_e" / "fuselab_multipl_e_js.jsonl").is_file()


def test_bbh_task_yaml_direct_and_cot(shared_data, tmp_path):
    description, exemplars = parse_cot_prompt((shared_data / "bbh/cot-prompts/boolean_expressions.txt").read_text())
    assert description == "Evaluate the result of a random Boolean expression."
    assert [e["answer"] for e in exemplars] == ["False", "False", "True"]
    assert exemplars[0]["input"] == "not ( ( not not True ) ) is"

    folder, group, names = write_suite_tasks("bbh", shared_data, tmp_path, bbh_variant="direct")
    assert group == "fuselab_bbh" and len(names) == len(BBH_TASKS) == 27
    direct = yaml.safe_load((folder / "fuselab_bbh_boolean_expressions.yaml").read_text())
    assert direct["fewshot_config"]["samples"][2] == {"input": "not not ( not ( False ) ) is", "target": "True"}
    assert direct["num_fewshot"] == 3 and direct["dataset_kwargs"]["field"] == "examples"

    folder, group, names = write_suite_tasks("bbh", shared_data, tmp_path, bbh_variant="cot", num_fewshot=1)
    cot = yaml.safe_load((folder / "fuselab_bbh_cot_boolean_expressions.yaml").read_text())
    assert group == "fuselab_bbh_cot" and cot["num_fewshot"] == 1
    assert cot["fewshot_config"]["samples"][0]["target"].endswith("So the answer is False.")
    assert cot["fewshot_config"]["samples"][0]["target"].startswith("Remember that (i)")
    assert cot["filter_list"][0]["filter"][0]["regex_pattern"] == r"(?<=the answer is )(.*)(?=.)"


def test_results_to_frame_names_metrics():
    results = {
        "results": {"t1": {"alias": "t1", "exact_match,get-answer": 0.5, "exact_match_stderr,get-answer": 0.1},
                    "g": {"alias": "g", "acc,none": 0.25, "acc_stderr,none": "N/A"}},
        "group_subtasks": {"g": ["t1"]},
        "n-samples": {"t1": {"original": 10, "effective": 4}},
    }
    frame = results_to_frame(results, "s", "m")
    assert list(frame.metric) == ["exact_match_get-answer", "acc"]
    assert list(frame.n) == [4, 4]
    assert frame.stderr.iloc[0] == 0.1 and math.isnan(frame.stderr.iloc[1])


def test_primary_metric_key_rule():
    """First metric of the task's metric_list, under the first filter of its filter_list ("none" without one)."""
    mc = {"metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    assert primary_metric_key(mc, ["acc,none", "acc_norm,none"]) == "acc,none"
    assert primary_metric_key({"metric_list": [{"metric": "acc_norm"}, {"metric": "acc"}]},
                              ["acc,none", "acc_norm,none"]) == "acc_norm,none"
    gen = {"metric_list": [{"metric": "exact_match"}], "filter_list": [{"name": "strip", "filter": []}]}
    assert primary_metric_key(gen, ["exact_match,strip"]) == "exact_match,strip"
    gsm8k_like = {"metric_list": [{"metric": "exact_match"}],
                  "filter_list": [{"name": "strict-match"}, {"name": "flexible-extract"}]}
    keys = ["exact_match,flexible-extract", "exact_match,strict-match"]  # report order does not decide
    assert primary_metric_key(gsm8k_like, keys) == "exact_match,strict-match"
    # no config (results from elsewhere): acc, exact_match, pass@1, acc_norm, a filtered metric counting
    assert primary_metric_key(None, ["acc_norm,none", "exact_match,get-answer"]) == "exact_match,get-answer"
    assert primary_metric_key(None, ["bleu,none"]) == "bleu,none" and primary_metric_key(None, []) is None


def test_primary_metric_of_generation_filtered_and_cot_tasks_in_a_real_run(tiny_llama_dir, mc_task_dir):
    """lm-eval's own configs mark the primary rows; the suite average is the mean over all three tasks."""
    from harness.evaluation.suites import primary_scores
    from harness.pipeline import summarize

    docs = [{"question": d["question"], "answer": d["choices"][d["gold"]]} for d in MC_DOCS]
    data = mc_task_dir / "gen.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "output_type": "generate_until", "doc_to_target": "answer",
              "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (mc_task_dir / "tinygen.yaml").write_text(yaml.safe_dump({
        "task": "tinygen", **common, "doc_to_text": "{{question}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]}))
    (mc_task_dir / "tinycot.yaml").write_text(yaml.safe_dump({
        "task": "tinycot", **common, "doc_to_text": "Q: {{question}}\nA: Let's think step by step.\n",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 3, "do_sample": False},
        "filter_list": [{"name": "get-answer", "filter": [{"function": "regex",
                                                           "regex_pattern": "(?<=the answer is )(.*)(?=.)"},
                                                          {"function": "take_first"}]},
                        {"name": "flexible", "filter": [{"function": "take_first"}]}]}))
    (mc_task_dir / "_tinysuite.yaml").write_text(yaml.safe_dump({
        "group": "tinysuite", "task": ["tinymc", "tinygen", "tinycot"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]}))
    frame = evaluate(tiny_llama_dir, ["tinysuite"], EvalSettings(multipl_e_languages=()),
                     include_paths=[mc_task_dir], model_name="m")
    primary = frame[frame.primary]
    assert dict(zip(primary.task, primary.metric)) == {
        "tinymc": "acc", "tinygen": "exact_match_strip", "tinycot": "exact_match_get-answer"}
    assert set(frame.metric[frame.task == "tinycot"]) == {"exact_match_get-answer", "exact_match_flexible"}
    assert list(frame.level[frame.task == "tinysuite"]) == ["group"]
    assert sorted(primary_scores(frame).task) == ["tinycot", "tinygen", "tinymc"]  # the group row left out
    by_task = dict(zip(primary.task, primary.value))
    expected = (by_task["tinymc"] + by_task["tinygen"] + by_task["tinycot"]) / 3
    assert summarize(frame, ["m"]).loc[0, "tinysuite"] == pytest.approx(expected, rel=1e-12)


def test_per_item_scores_average_to_the_task_scores(tiny_llama_dir, sp_tokenizer, mc_task_dir):
    """return_items: one row per (task, metric, document); acc of an item is 1 when the gold choice has the
    highest loglikelihood (computed by hand); the mean over items is lm-eval's task value."""
    settings = EvalSettings(multipl_e_languages=())
    frame, items = evaluate(tiny_llama_dir, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m",
                            return_items=True)
    assert frame.equals(evaluate(tiny_llama_dir, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m"))
    acc = items[items.metric == "acc"].sort_values("doc_id")
    assert list(acc.doc_id) == list(range(len(MC_DOCS)))
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    by_hand = []
    for doc in MC_DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [_loglikelihood(model, sp_tokenizer, context, " " + c) for c in doc["choices"]]
        by_hand.append(float(int(np.argmax(lls)) == doc["gold"]))
    assert list(acc.value) == by_hand
    for metric in ("acc", "acc_norm"):
        task_value = frame.loc[frame.metric == metric, "value"].iloc[0]
        assert items.loc[items.metric == metric, "value"].mean() == pytest.approx(task_value, rel=1e-12)


def test_an_lm_instance_scores_like_the_model_folder(tiny_llama_dir, sp_tokenizer, mc_task_dir):
    from lm_eval.models.huggingface import HFLM

    settings = EvalSettings(multipl_e_languages=())
    from_folder = evaluate(tiny_llama_dir, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m")
    instance = HFLM(pretrained=tiny.tiny_model("llama", sp_tokenizer, seed=0), tokenizer=sp_tokenizer, batch_size=1)
    from_instance = evaluate(instance, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m")
    assert from_instance.equals(from_folder)
    assert evaluate(instance, ["tinymc"], settings, include_paths=[mc_task_dir]).model.iloc[0] == "HFLM"


def test_truncation_warnings_are_summarised_in_one_line(tiny_llama_dir, sp_tokenizer, mc_task_dir, caplog):
    """lm-eval warns once per request longer than the context; evaluate() prints one count per suite instead.
    The count is lm-eval's rule, by hand: context + continuation tokens > max_length + 1, once per distinct
    model input (lm-eval runs choices whose input, all tokens but the last, is the same in one forward pass)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    max_length = 8
    too_long = set()
    for doc in MC_DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        for choice in doc["choices"]:
            whole = sp_tokenizer.encode(context + " " + choice, add_special_tokens=False)  # context + continuation
            if len(whole) > max_length + 1:
                too_long.add(tuple(whole[:-1]))
    expected = len(too_long)
    assert expected == 14  # of 18 requests: 4 single-token choices share their input with another choice
    lm = HFLM(pretrained=tiny.tiny_model("llama", sp_tokenizer, seed=0), tokenizer=sp_tokenizer, batch_size=1,
              max_length=max_length)
    with caplog.at_level(logging.WARNING):
        evaluate(lm, ["tinymc"], EvalSettings(multipl_e_languages=()), include_paths=[mc_task_dir], model_name="short")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Truncating" in m or "Left truncation" in m]
    assert [m for m in messages if "truncated" in m] == [
        f"short on tinymc: {expected} request(s) longer than the model's context were truncated from the left "
        "(lm-eval's per-request warnings, summarised)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):   # nothing truncated: nothing said
        evaluate(tiny_llama_dir, ["tinymc"], EvalSettings(multipl_e_languages=()), include_paths=[mc_task_dir])
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_progress_false_hides_request_bars_and_changes_nothing_else(sp_tokenizer, mc_task_dir, capfd):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny.tiny_model("llama", sp_tokenizer, seed=0), tokenizer=sp_tokenizer, batch_size=1)
    settings = EvalSettings(multipl_e_languages=())
    loud = evaluate(lm, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m")
    assert "Running loglikelihood requests" in capfd.readouterr().err
    quiet = evaluate(lm, ["tinymc"], settings, include_paths=[mc_task_dir], model_name="m", progress=False)
    assert "Running loglikelihood requests" not in capfd.readouterr().err
    assert quiet.equals(loud)
    assert "loglikelihood" not in vars(lm)  # the instance is given back as it came


def test_bbh_chain_of_thought_variant_runs(tiny_llama_dir, shared_data):
    settings = EvalSettings(limit=1, max_gen_toks=4, bbh_variant="cot", multipl_e_languages=())
    frame = evaluate(tiny_llama_dir, ["bbh"], settings, data_dir=shared_data)
    assert list(frame.task[:-1]) == suite_tasks("bbh", settings)
    assert frame.task.iloc[-1] == "fuselab_bbh_cot" and frame.n.iloc[-1] == 27
    assert set(frame.metric) == {"exact_match_get-answer"}


def test_data_resolution_order(shared_data, tmp_path, monkeypatch):
    from harness.evaluation.data import resolve_suite_data

    monkeypatch.setenv("FUSELAB_DATA", str(shared_data))
    empty = tmp_path / "empty"
    empty.mkdir()
    # An incomplete data_dir falls through to FUSELAB_DATA.
    assert resolve_suite_data("commonsense", empty).root == shared_data.resolve()
    assert resolve_suite_data("commonsense", shared_data).kind == "local"


def test_multipl_e_yaml_from_local_rows_and_from_the_hub(shared_data, tmp_path):
    folder, group, names = write_suite_tasks("multipl_e", shared_data, tmp_path / "local", languages=("js", "python"))
    assert names == ["fuselab_multipl_e_js", "fuselab_multipl_e_python"]
    js = yaml.safe_load((folder / "fuselab_multipl_e_js.yaml").read_text().replace("!function", ""))
    assert js["generation_kwargs"]["until"] == ["\nfunction ", "\n/*", "\n//", "\nconsole.log"]
    assert js["unsafe_code"] is True and js["process_results"] == "fuselab_hooks.multipl_e_js"
    assert "def multipl_e_python(doc, results)" in (folder / "fuselab_hooks.py").read_text()
    folder, _, _ = write_suite_tasks("multipl_e", None, tmp_path / "hub", languages=("rs",))
    rs = yaml.safe_load((folder / "fuselab_multipl_e_rs.yaml").read_text().replace("!function", ""))
    assert rs["dataset_path"] == "nuprl/MultiPL-E" and rs["dataset_name"] == "humaneval-rs"
    assert rs["generation_kwargs"]["until"] == ["\n}"]
