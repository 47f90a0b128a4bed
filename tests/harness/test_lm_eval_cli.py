"""`fuselab lm-eval`: lm-eval's own CLI with `fuselab-ensemble` registered, arguments passed unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.evaluation.lm_eval_cli import with_default_device

REPO = Path(__file__).resolve().parents[2]
DOCS = [{"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "early bird"], "gold": 0},
        {"question": "a stitch in time saves", "choices": ["nine", "the worm"], "gold": 0},
        {"question": "hello world, hello", "choices": ["fox", "fusion"], "gold": 1},
        {"question": "two plus three equals", "choices": ["five", "seven"], "gold": 0}]


def test_a_device_is_added_only_to_evaluations_that_name_none(tmp_path):
    run = ["--model", "hf", "--tasks", "x"]
    added = with_default_device(run)
    assert added[:-2] == run and added[-2] == "--device" and added[-1] in ("cpu", "cuda:0")
    assert with_default_device(["run", "--device", "cuda:1", "--tasks", "x"]) == ["run", "--device", "cuda:1",
                                                                                 "--tasks", "x"]
    assert with_default_device(["--device=cpu", "--tasks", "x"]) == ["--device=cpu", "--tasks", "x"]
    assert with_default_device(["ls", "tasks"]) == ["ls", "tasks"]
    assert with_default_device(["run", "--help"]) == ["run", "--help"]
    with_device, without = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with_device.write_text(yaml.safe_dump({"device": "cuda:0", "tasks": ["x"]}))
    without.write_text(yaml.safe_dump({"tasks": ["x"]}))
    assert with_default_device(["--config", str(with_device)]) == ["--config", str(with_device)]
    assert with_default_device(["-C", str(without)])[-2] == "--device"


@pytest.fixture()
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tinymc.yaml").write_text(yaml.safe_dump({
        "task": "tinymc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


def test_fuselab_lm_eval_runs_the_ensemble_from_the_command_line(tiny_llama_dir, tiny_gpt2_dir, task_dir, tmp_path):
    """The `fuselab` console script, lm-eval's legacy argument form, no --device: the ensemble of two tiny models
    with different tokenizers scores the same accuracy as the same ensemble evaluated in this process."""
    from baselines.ensemble import EnsembleLM
    from harness.evaluation import EvalSettings, evaluate

    torch.set_num_threads(1)
    members = f"{tiny_llama_dir}|{tiny_gpt2_dir}"
    fuselab = Path(sys.executable).parent / "fuselab"
    command = [str(fuselab), "lm-eval", "--model", "fuselab-ensemble",
               "--model_args", f"members={members},pivot=0,batch_size=1", "--tasks", "tinymc",
               "--include_path", str(task_dir), "--limit", "3", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fuselab-ensemble" in done.stdout and "tinymc" in done.stdout  # lm-eval's own summary table
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["device"] == "cpu" and results["n-samples"]["tinymc"]["effective"] == 3

    lm = EnsembleLM(members=[str(tiny_llama_dir), str(tiny_gpt2_dir)], pivot=0, batch_size=1)
    here = evaluate(lm, ["tinymc"], EvalSettings(limit=3, multipl_e_languages=()), include_paths=[task_dir])
    assert results["results"]["tinymc"]["acc,none"] == here.set_index("metric").loc["acc", "value"]


def test_fuselab_lm_eval_passes_lm_evals_exit_status(capsys):
    from harness.cli import main

    assert main(["lm-eval", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out  # lm-eval's own parser answered
