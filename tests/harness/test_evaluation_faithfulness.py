"""FuseLab's suites side by side with lm-eval 0.4.13's built-in tasks of the same name (their YAML, installed):
BBH prompts, exemplars, stop sequences, exact match and group weighting; BoolQ; CommonSense few-shot splits;
MultiPL-E problems under a limit."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

from harness.evaluation import EvalSettings, evaluate
from harness.evaluation.data import BBH_TASKS
from harness.evaluation.taskgen import boolq_docs, parse_cot_prompt, write_suite_tasks

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


def _ours(folder: Path, name: str) -> dict:
    return yaml.safe_load((folder / f"{name}.yaml").read_text().replace("!function", ""))


@pytest.mark.parametrize("variant,lm_eval_folder,prefix", [("direct", "fewshot", "bbh_fewshot"),
                                                          ("cot", "cot_fewshot", "bbh_cot_fewshot")])
def test_bbh_tasks_are_lm_evals_builtins(shared_data, tmp_path, variant, lm_eval_folder, prefix):
    """Per task: description, prompt, the 3 exemplars, target delimiter, answer filter, stop sequences, metric
    (exact match on raw strings) and version equal lm-eval's; the group is weighted by size as lm-eval's."""
    folder, group, names = write_suite_tasks("bbh", shared_data, tmp_path, bbh_variant=variant)
    for task, name in zip(BBH_TASKS, names):
        theirs = load_yaml(LM_EVAL_TASKS / "bbh" / lm_eval_folder / f"{task}.yaml", resolve_func=False, recursive=True)
        ours = _ours(folder, name)
        for key in ("description", "doc_to_text", "doc_to_target", "num_fewshot", "metric_list", "filter_list"):
            assert ours.get(key) == theirs.get(key), (task, key)
        assert ours.get("target_delimiter", " ") == theirs.get("target_delimiter", " ")
        assert ours["fewshot_config"] == theirs["fewshot_config"], task
        assert {k: ours["generation_kwargs"][k] for k in ("until", "do_sample", "temperature")} == \
            {k: theirs["generation_kwargs"][k] for k in ("until", "do_sample", "temperature")}
        assert ours["metadata"]["version"] == theirs["metadata"]["version"]
    their_group = load_yaml(LM_EVAL_TASKS / "bbh" / lm_eval_folder / f"_{prefix}.yaml", resolve_func=False)
    our_group = _ours(folder, f"_{group}")
    assert [a["weight_by_size"] for a in our_group["aggregate_metric_list"]] == \
        [a["weight_by_size"] for a in their_group["aggregate_metric_list"]] == [True]


def test_cot_exemplars_start_without_whitespace(shared_data):
    _, exemplars = parse_cot_prompt((shared_data / "bbh/cot-prompts/sports_understanding.txt").read_text())
    assert exemplars[0]["reasoning"] == ("Bam Adebayo is an American basketball player. Scoring a reverse layup in "
                                         "the Western Conference Finals is part of the NBA Finals. So the answer is "
                                         "yes.")


def test_strip_whitespace_is_a_named_option(shared_data, tmp_path):
    folder, _, names = write_suite_tasks("bbh", shared_data, tmp_path, bbh_strip_whitespace=True)
    metric = _ours(folder, names[0])["metric_list"][0]
    assert metric["regexes_to_ignore"] == [r"^\s+", r"\s+$"]


class ScriptedLM(LM):
    """Answers every generation request with the same text: scores then follow from the targets alone."""

    def __init__(self, answer: str):
        super().__init__()
        self.answer = answer
        self.until = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.until += [tuple(r.args[1]["until"]) for r in requests]
        return [self.answer for _ in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.fixture()
def small_bbh(shared_data, tmp_path):
    """A BBH data folder: boolean_expressions keeps its first 3 examples whose target is "True", every other
    task its first example (29 examples); the exemplar files are the real ones."""
    root = tmp_path / "data"
    (root / "bbh").mkdir(parents=True)
    shutil.copytree(shared_data / "bbh" / "cot-prompts", root / "bbh" / "cot-prompts")
    targets = {}
    for task in BBH_TASKS:
        examples = json.loads((shared_data / "bbh" / f"{task}.json").read_text())["examples"]
        kept = [e for e in examples if e["target"] == "True"][:3] if task == "boolean_expressions" else examples[:1]
        (root / "bbh" / f"{task}.json").write_text(json.dumps({"examples": kept}))
        targets[task] = [e["target"] for e in kept]
    return root, targets


def test_bbh_exact_match_on_raw_strings_and_size_weighted_group(small_bbh):
    """A model that answers " True" (the space a model writes after "A:") scores 0 everywhere under lm-eval's rule;
    with bbh_strip_whitespace each task scores its share of "True" targets; the group is the mean over all 29
    examples (lm-eval's weight_by_size), not the mean of the 27 task means."""
    root, targets = small_bbh
    raw_lm, strip_lm = ScriptedLM(" True"), ScriptedLM(" True")
    raw = evaluate(raw_lm, ["bbh"], EvalSettings(multipl_e_languages=()), data_dir=root)
    assert set(raw.value) == {0.0}
    assert set(raw_lm.until) == {("</s>", "Q", "\n\n")}
    stripped = evaluate(strip_lm, ["bbh"], EvalSettings(multipl_e_languages=(), bbh_strip_whitespace=True),
                        data_dir=root).set_index("task")
    hits = {task: sum(t == "True" for t in ts) for task, ts in targets.items()}
    for task in BBH_TASKS:
        assert stripped.loc[f"fuselab_bbh_{task}", "value"] == hits[task] / len(targets[task])
    group = stripped.loc["fuselab_bbh"]
    assert group["n"] == 29 and group["value"] == pytest.approx(sum(hits.values()) / 29, abs=1e-12)
    assert group["value"] != pytest.approx(sum(hits[t] / len(targets[t]) for t in BBH_TASKS) / 27)


def test_boolq_matches_super_glue_boolq(shared_data, tmp_path):
    from datasets import Dataset

    folder, _, _ = write_suite_tasks("commonsense", shared_data, tmp_path)
    ours = _ours(folder, "fuselab_boolq")
    theirs = load_yaml(LM_EVAL_TASKS / "super_glue" / "boolq" / "default.yaml", resolve_func=False)
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]] == ["acc"]
    assert ours["metadata"]["version"] == theirs["metadata"]["version"] == 2.0
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        assert ours[key] == theirs[key]
    rows = Dataset.from_list([{"question": "q", "answer": True, "passage": "P.", "title": "Persian language"},
                              {"question": "q", "answer": False, "passage": "P.", "title": ""}])
    assert [(r["passage"], r["label"]) for r in boolq_docs(rows)] == [("Persian language -- P.", 1), ("P.", 0)]


def _queries(path: Path, key: str) -> set[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return {json.loads(line)[key] for line in fh if line.strip()}


def test_commonsense_few_shot_examples_come_from_validation_not_the_scored_split(shared_data, tmp_path,
                                                                                   tiny_llama_dir):
    folder, _, _ = write_suite_tasks("commonsense", shared_data, tmp_path / "tasks")
    arc = _ours(folder, "fuselab_arc_easy")
    assert arc["fewshot_split"] == "validation" and arc["test_split"] == "test"
    first = json.loads(Path(arc["dataset_kwargs"]["data_files"]["validation"]).read_text().splitlines()[0])
    assert first == {"query": "Question: Which technology was developed most recently?",
                     "choices": ["cellular telephone", "television", "refrigerator", "airplane"], "gold": 0}
    assert _ours(folder, "fuselab_openbookqa")["fewshot_split"] == "validation"
    assert _ours(folder, "fuselab_hellaswag")["fewshot_split"] == "test"  # only the scored split is local

    evaluate(tiny_llama_dir, ["commonsense"], EvalSettings(multipl_e_languages=(), num_fewshot=1, limit=1),
             data_dir=shared_data, log_samples_dir=tmp_path / "samples")
    sample = json.loads((tmp_path / "samples/commonsense/fuselab_arc_easy.jsonl").read_text().splitlines()[0])
    shot = sample["arguments"][0][0].split("\nAnswer:")[0]  # (context, continuation) of the first choice
    validation = {"Question: " + q for q in _queries(shared_data / "commonsense/arc_easy_validation.ai2olmo.jsonl.gz",
                                                     "question")}
    assert shot in validation and shot not in _queries(shared_data / "commonsense/arc_easy_test.llmfoundry.jsonl",
                                                       "query")


def test_multipl_e_limit_scores_the_same_problems_in_every_language(shared_data, tmp_path):
    from lm_eval.tasks import TaskManager

    numbers = {}
    for lang in ("python", "js"):
        rows = [json.loads(line) for line in (shared_data / f"multipl-e/humaneval-{lang}.jsonl").read_text().splitlines()]
        numbers[lang] = {int(re.search(r"(\d+)", r.get("name") or r["task_id"]).group(1)) for r in rows}
    common = sorted(numbers["python"] & numbers["js"])
    folder, _, names = write_suite_tasks("multipl_e", shared_data, tmp_path, languages=("python", "js"))
    tasks = TaskManager(include_path=[str(folder)], include_defaults=False).load(names)["tasks"]
    firsts = {}
    for name, task in tasks.items():
        docs = list(task.test_docs())
        firsts[name] = [int(re.search(r"(\d+)", d.get("name") or d["task_id"]).group(1)) for d in docs[:5]]
        assert len(docs) == len(numbers[name.rsplit("_", 1)[1]])  # a full run still scores every problem
    assert firsts["fuselab_multipl_e_python"] == firsts["fuselab_multipl_e_js"] == common[:5] == [0, 1, 2, 3, 4]
