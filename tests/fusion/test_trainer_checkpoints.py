"""Checkpoints, resume after kill -9, progress lines and log forwarding of `fusion.trainer.train_target`."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny
from fusion.data import prepare_train_dataset
from fusion.trainer import (CHECKPOINT_MARKER, TrainSettings, checkpoint_interval, last_checkpoint,
                            train_target)

REPO = Path(__file__).resolve().parents[2]
K = 3


def test_checkpoint_interval_is_a_multiple_of_logging_steps():
    # None: about 5 checkpoints per run, rounded up to whole logging intervals
    assert checkpoint_interval(None, 60, 5) == 15      # ceil(60 / 5) = 12 -> 15
    assert checkpoint_interval(None, 18, 2) == 4       # ceil(18 / 5) = 4
    assert checkpoint_interval(None, 3, 1) == 1
    assert checkpoint_interval(None, 1, 1) == 0        # one step: nothing to resume
    assert checkpoint_interval(0, 60, 5) == 0
    assert checkpoint_interval(10, 60, 5) == 10
    with pytest.raises(ValueError, match=r"checkpoint_steps=7 must be 0 or a positive multiple of logging_steps=5"):
        checkpoint_interval(7, 60, 5)


def test_last_checkpoint_ignores_folders_without_the_marker(tmp_path):
    assert last_checkpoint(tmp_path / "absent") is None
    for step, complete in ((4, True), (8, True), (12, False)):   # 12: killed while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / CHECKPOINT_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-8"


def _fused_rows(tokenizer, seed: int = 0) -> datasets.Dataset:
    """Documents in the target tokenization with a fused top-K distribution per position (random ids and
    probabilities, seeded): the columns `train_target` reads, so that both loss terms train."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, text in enumerate(sorted(set(tiny.TRAIN_TEXT)) * 3):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        fused_ids = rng.integers(0, len(tokenizer), size=(len(ids), K)).astype(np.int32)
        probs = rng.random((len(ids), K)).astype(np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        rows.append({"doc_id": i, "input_ids": ids, "fused_ids": fused_ids.ravel().tolist(),
                     "fused_probs": probs.ravel().tolist(), "k": K})
    return datasets.Dataset.from_list(rows)


# The training job, run as its own process: `mode` plain (no checkpoints), or ckpt (checkpoints every 4 steps
# into <out>/ckpt, resuming from one when it is there). PACE seconds of sleep per step keep the process alive
# long enough for the test to kill it between checkpoints; sleeping changes no number.
JOB = textwrap.dedent("""
    import json, sys, time
    sys.path[:0] = [{tests!r}, {repo!r}]
    import datasets, transformers
    import tiny
    import fusion.trainer as ft

    mode, data, out, pace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    tok = tiny.sentencepiece_style()

    class Pace(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(pace)

    real = ft.CheckpointCallback
    ft.CheckpointCallback = lambda steps, trainer: (trainer.add_callback(Pace()), real(steps, trainer))[1]
    settings = ft.TrainSettings(block_size=16, per_device_batch_size=2, lr=1e-2, warmup_ratio=0.1,
                                lr_scheduler="cosine", num_epochs=2, weight_decay=0.1, seed=3, logging_steps=2,
                                checkpoint_steps=4 if mode == "ckpt" else 0)
    seen = []
    result = ft.train_target(tiny.tiny_model("llama", tok, seed=0), tok, datasets.load_from_disk(data),
                             out + "/model", settings, lam=0.9, verbose=False, label="fusellm",
                             checkpoint_dir=out + "/ckpt",
                             on_log=lambda step, logs: seen.append(step) if "loss" in logs else None)
    print("RESULT " + json.dumps({{"losses": result.losses, "clm": result.clm_losses, "fusion": result.fusion_losses,
                                   "resumed": result.resumed_from_step, "steps_run": result.steps_run,
                                   "tokens": result.tokens, "forwarded": seen}}), flush=True)
""")


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB.format(tests=str(REPO / "tests"), repo=str(REPO)))
    return path


def _run(job: Path, mode: str, data: Path, out: Path, pace: float = 0.0) -> dict:
    proc = subprocess.run([sys.executable, str(job), mode, str(data), str(out), str(pace)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_killed_training_resumes_with_the_uninterrupted_weights_and_losses(sp_tokenizer, tmp_path):
    data = tmp_path / "data"
    _fused_rows(sp_tokenizer).save_to_disk(str(data))
    job = _job(tmp_path)

    blocks = prepare_train_dataset(datasets.load_from_disk(str(data)), 16)
    total = 2 * math.ceil(len(blocks) / 2)                                 # 2 epochs of batches of 2 blocks

    plain = _run(job, "plain", data, tmp_path / "plain")
    assert plain["resumed"] == 0 and plain["steps_run"] == total and max(map(int, plain["losses"])) == total

    # kill -9 as soon as a complete checkpoint exists (the first is at step 4), long before step 18
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(job), "ckpt", str(data), str(killed), "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while last_checkpoint(killed / "ckpt") is None:
        assert proc.poll() is None, f"the job ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert b"RESULT" not in proc.stdout.read()
    stopped_at = int(last_checkpoint(killed / "ckpt").name.split("-")[1])
    assert 0 < stopped_at < total and not (killed / "model" / "model.safetensors").exists()

    resumed = _run(job, "ckpt", data, killed)
    assert resumed["resumed"] == stopped_at
    assert resumed["steps_run"] == total - stopped_at < total            # fewer steps than a restart
    assert resumed["losses"] == plain["losses"]                          # every logged loss, bit for bit
    assert resumed["clm"] == plain["clm"] and resumed["fusion"] == plain["fusion"]
    assert resumed["tokens"] == plain["tokens"]
    # the forwarded curve is whole: steps restored from the checkpoint are replayed first
    assert resumed["forwarded"] == list(range(2, total + 1, 2))
    a = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only the newest complete checkpoint is kept while training runs
    assert [p.name for p in (killed / "ckpt").iterdir()] == [f"checkpoint-{(total - 1) // 4 * 4}"]


def test_progress_lines_show_step_total_loss_time_and_eta(sp_tokenizer, tmp_path, capsys):
    data = _fused_rows(sp_tokenizer).select(range(8))
    settings = TrainSettings(block_size=16, per_device_batch_size=2, lr=1e-2, warmup_ratio=0.0, max_steps=4,
                             logging_steps=2, seed=0, checkpoint_steps=0)
    logs = []
    result = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "m",
                          settings, lam=0.9, label="fusellm", on_log=lambda step, entry: logs.append((step, entry)))
    lines = [x for x in capsys.readouterr().out.splitlines() if "step" in x]
    pattern = (r"    fusellm  step (\d)/4  loss (\d+\.\d{4}) \(clm \d+\.\d{4}, fusion \d+\.\d{4}\)  lr \d\.\de-\d\d  "
               r"\d+:\d\d elapsed, ETA \d+:\d\d")
    assert len(lines) == 2 and all(re.fullmatch(pattern, x) for x in lines), lines
    assert [int(re.fullmatch(pattern, x).group(1)) for x in lines] == [2, 4]
    assert [float(re.fullmatch(pattern, x).group(2)) for x in lines] == [round(result.losses[s], 4) for s in (2, 4)]
    # the sink saw each logging step with both loss terms, then the run summary
    assert [s for s, e in logs if "loss" in e] == [2, 4]
    assert all({"clm_loss", "fusion_loss", "learning_rate"} <= set(e) for s, e in logs if "loss" in e)
    assert "train_runtime" in logs[-1][1]
    assert result.resumed_from_step == 0 and result.steps_run == 4 and math.isfinite(result.losses[4])


def test_a_failing_log_sink_never_stops_training(sp_tokenizer, tmp_path, capsys):
    def broken(step, logs):
        raise ConnectionError("tracking server gone")

    data = _fused_rows(sp_tokenizer).select(range(4))
    settings = TrainSettings(block_size=16, per_device_batch_size=2, max_steps=2, logging_steps=1, seed=0)
    result = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "m",
                          settings, lam=0.9, verbose=False, on_log=broken)
    assert sorted(result.losses) == [1, 2]
    out = capsys.readouterr().out
    assert out.count("training logs stop being forwarded (ConnectionError: tracking server gone)") == 1
