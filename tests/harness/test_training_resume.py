"""A training stage killed with SIGKILL resumes from its last checkpoint: `fuselab run` killed mid-training, run
again, recomputes fewer steps than a restart and ends with the losses and weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import tiny
from harness.config import ConfigError, ModelSpec, load_config
from harness.launch import run_job, write_job

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"
STEPS = 24
SMALL = ["corpus.max_docs_per_domain=10", "training.per_device_batch_size=4", f"training.max_steps={STEPS}",
         "training.logging_steps=2", "training.checkpoint_steps=4", "baselines.clm=false",
         "baselines.ensemble.enabled=false", "baselines.domain_pool.enabled=false", "baselines.merges=[]",
         "evaluation.settings.limit=2", "evaluation.settings.max_gen_toks=4", "evaluation.perplexity.enabled=false"]


def test_checkpoint_steps_must_fall_on_logging_steps_and_leave_every_hash_alone():
    with pytest.raises(ConfigError, match=r"checkpoint_steps \(6\) must be a multiple of logging_steps \(4\)"):
        load_config(QUICKSTART, ["training.logging_steps=4", "training.checkpoint_steps=6"])
    base = load_config(QUICKSTART)
    other = load_config(QUICKSTART, ["training.checkpoint_steps=10"])
    assert other.training.checkpoint_steps == 10 and base.training.checkpoint_steps is None
    assert other.content_hash() == base.content_hash()  # how often a run saves changes none of its results

    from harness.pipeline import build_plan

    assert {n: s.key for n, s in build_plan(other).stages.items()} == \
        {n: s.key for n, s in build_plan(base).stages.items()}


def _run(wd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness.cli", "run", str(QUICKSTART), f"workdir={wd}", *SMALL, "--no-track",
           "--quiet"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=1800)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_killed_training_stage_resumes_with_the_uninterrupted_losses_and_weights(tmp_path, micro_world):
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    proc = _run(killed)
    marker = None
    deadline = time.monotonic() + 1500
    while marker is None:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "no training checkpoint within 1500 s"
        marker = next(iter((killed / "cache" / "_checkpoints").glob("train-fusellm-*/checkpoint-*/"
                                                                    "fuselab_checkpoint.json")), None)
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 mid-training: nothing gets to clean up
    proc.wait(60)
    ckpt_root = marker.parent.parent
    key = ckpt_root.name.removeprefix("train-fusellm-")
    stage = killed / "cache" / "train" / key
    assert not (stage / "_COMPLETE").exists()
    stopped_at = max(json.loads(m.read_text())["step"] for m in ckpt_root.glob("checkpoint-*/fuselab_checkpoint.json"))
    assert 0 < stopped_at < STEPS
    # the uninterrupted reference: the same stages up to the fused data (copied), training from step 0
    shutil.copytree(killed / "cache", fresh / "cache",
                    ignore=shutil.ignore_patterns("_checkpoints", "_locks", ".*.tmp-*"))

    out = _finish(_run(killed))
    assert "[run]    train/fusellm" in out and "[cached] fused" in out, out
    assert "step " not in out and "%|" not in out, out  # --quiet: one line per stage, no steps, no bars
    resumed = json.loads((stage / "train_result.json").read_text())
    assert resumed["resumed_from_step"] == stopped_at
    assert resumed["steps_run"] == STEPS - resumed["resumed_from_step"] < STEPS   # fewer steps than a restart
    assert not ckpt_root.exists()  # checkpoints go once the stage is published

    _finish(_run(fresh))
    reference = json.loads((fresh / "cache" / "train" / key / "train_result.json").read_text())
    assert reference["resumed_from_step"] == 0 and reference["steps_run"] == STEPS
    assert resumed["losses"] == reference["losses"] and len(reference["losses"]) == STEPS // 2
    assert resumed["clm_losses"] == reference["clm_losses"]
    assert resumed["fusion_losses"] == reference["fusion_losses"]
    a = load_file(str(stage / "model" / "model.safetensors"))
    b = load_file(str(fresh / "cache" / "train" / key / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_launched_job_keeps_checkpoints_and_a_second_start_resumes(tiny_llama_dir, sp_tokenizer, tmp_path):
    """The `fuselab train` path: the worker writes checkpoints where the job says; started again (as after a
    kill), it continues from the newest one instead of step 0."""
    texts = sorted(set(tiny.TRAIN_TEXT))
    ids = [sp_tokenizer(t, add_special_tokens=False)["input_ids"] + [sp_tokenizer.eos_token_id] for t in texts]
    datasets.Dataset.from_dict({"doc_id": list(range(len(ids))), "input_ids": ids}).save_to_disk(str(tmp_path / "d"))
    settings = {"block_size": 16, "per_device_batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0, "max_steps": 6,
                "logging_steps": 2, "checkpoint_steps": 2, "seed": 0}
    ckpt = tmp_path / "ckpt"
    job = write_job(tmp_path / "job", stage="train/clm", model=ModelSpec(ref=str(tiny_llama_dir)).model_dump(mode="json"),
                    dataset=tmp_path / "d", settings=settings, lam=1.0, checkpoint_dir=ckpt)
    assert json.loads(job.read_text())["checkpoint_dir"] == str(ckpt)
    first = run_job(job, None, 1, timeout_s=900, threads=1)
    assert first["resumed_from_step"] == 0 and first["steps_run"] == 6
    # the last checkpoint before the end (step 4) stays until the caller publishes the model
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint-4"]
    again = run_job(write_job(tmp_path / "job", stage="train/clm", model=json.loads(job.read_text())["model"],
                              dataset=tmp_path / "d", settings=settings, lam=1.0, checkpoint_dir=ckpt),
                    None, 1, timeout_s=900, threads=1)
    assert again["resumed_from_step"] == 4 and again["steps_run"] == 2
    assert again["losses"] == first["losses"]
