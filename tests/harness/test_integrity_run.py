"""Verified artifacts and content identity through whole runs (issue 19, items 1, 3, 6) on tiny local models:
a truncated or edited cached file is found (sizes on every read, content for evaluation results, for every
stage a build reads, and on `fuselab verify`) and rebuilt instead of failing or skewing results; new weights
of the same size rerun exactly the stages that read them; two concurrent runs of one config build each stage
once."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tiny
from harness.config import load_config
from harness.pipeline import build_plan, run_experiment
from local_models import save_model, write_config, write_corpus

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    target = save_model(root / "llama", "llama", tiny.sentencepiece_style(), 0)
    source = save_model(root / "gpt2", "gpt2", tiny.byte_level(), 1)
    cfg_path = write_config(root / "exp.yaml", root / "wd", target, [("tgt", target), ("src", source)],
                            write_corpus(root / "corpus"))
    first = run_experiment(load_config(cfg_path), progress=False, track=False)
    return {"root": root, "cfg": cfg_path, "source": source, "first": first}


def rerun(setup):
    return run_experiment(load_config(setup["cfg"]), progress=False, track=False)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=timeout)


def stage_dir(setup, name: str) -> Path:
    return build_plan(load_config(setup["cfg"])).path(name)


def built(result) -> list[str]:
    return sorted(result.stage_times.loc[~result.stage_times["cached"].astype(bool), "stage"])


def test_first_run_then_everything_cached(setup):
    first = setup["first"]
    assert first.stages_run == 11 and set(first.results["model"]) == {"tgt", "src", "fusellm"}
    again = rerun(setup)
    assert again.stages_run == 0 and again.metrics == first.metrics


def test_truncated_arrow_file_is_rebuilt_not_a_traceback(setup):
    """Before: a truncated Arrow file was a traceback naming no stage, on every rerun."""
    arrow = sorted((stage_dir(setup, "distributions/src") / "dataset").glob("data-*.arrow"))[0]
    os.truncate(arrow, arrow.stat().st_size // 2)
    again = rerun(setup)
    # rebuilt identically, so the stages built from it stay valid (their recorded input digest matches)
    assert built(again) == ["distributions/src"] and again.metrics == setup["first"].metrics


def test_edited_evaluation_value_is_rebuilt_on_the_next_run(setup):
    """Before: one edited value in a cached eval_long.csv changed the results table."""
    csv = stage_dir(setup, "eval/tgt") / "eval_long.csv"
    text = csv.read_text()
    column = text.splitlines()[0].split(",").index("value")
    row = text.splitlines()[1]
    value = row.split(",")[column]
    digit = value[-1]
    edited = row.replace(value, value[:-1] + ("1" if digit != "1" else "2"))
    csv.write_text(text.replace(row, edited))  # same size, one digit
    assert csv.stat().st_size == len(text.encode())
    again = rerun(setup)  # evaluation results are hashed on every read
    assert built(again) == ["eval/tgt"]
    pd.testing.assert_frame_equal(again.results, setup["first"].results)


def test_corrupted_fused_probabilities_found_by_verify_and_rebuilt(setup):
    """Before: random values in 25% of the fused probabilities changed FuseLLM's score silently."""
    arrow = sorted((stage_dir(setup, "fused") / "dataset").glob("data-*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    tail = len(data) // 2
    data[tail:tail + 64] = bytes((b + 1) % 256 for b in data[tail:tail + 64])  # same size, other values
    arrow.write_bytes(bytes(data))
    assert build_plan(load_config(setup["cfg"])).cached("fused")  # sizes alone cannot see it
    out = cli("verify", str(setup["cfg"]))
    assert out.returncode == 1, out.stdout + out.stderr
    corrupt = [ln for ln in out.stdout.splitlines() if "CORRUPT" in ln]
    assert len(corrupt) == 1 and corrupt[0].split()[:2] == ["CORRUPT", "fused"]
    assert (f"file dataset/{arrow.name}: content differs from the manifest (sha256 mismatch; edited or damaged); "
            f"removed: `fuselab run` rebuilds it") in corrupt[0]
    again = rerun(setup)
    assert built(again) == ["fused"] and again.metrics == setup["first"].metrics
    clean = cli("verify", str(setup["cfg"]))
    assert clean.returncode == 0 and clean.stdout.strip().splitlines()[-1].startswith("11 ok, 0 corrupt")


def test_same_size_new_weights_rerun_exactly_the_stages_that_read_them(setup):
    """Before: saving new same-size weights changed 0 of the stage keys; `fuselab plan` showed all cached."""
    src = setup["source"]
    original = setup["root"] / "gpt2-original"
    shutil.copytree(src, original)
    try:
        save_model(src, "gpt2", tiny.byte_level(), 5)
        assert (src / "model.safetensors").stat().st_size == (original / "model.safetensors").stat().st_size
        out = cli("plan", str(setup["cfg"]))
        assert out.returncode == 0, out.stderr
        status = {ln.split()[0]: ln for ln in out.stdout.split("\nestimates:")[0].splitlines()[2:] if ln.strip()}
        pending = sorted(n for n, ln in status.items() if "will run" in ln)
        assert pending == ["aligned/src", "diagnostics", "distributions/src", "eval/fusellm", "eval/src", "fused",
                           "train/fusellm"]
        assert "cached" in status["corpus"] and "cached" in status["vocab/src"] and "cached" in status["eval/tgt"]
        again = rerun(setup)
        assert built(again) == pending
    finally:  # the original bytes back (new file, new mtime): content identity finds every stage cached
        shutil.rmtree(src)
        shutil.copytree(original, src)
    assert rerun(setup).stages_run == 0


def test_two_concurrent_runs_build_each_stage_once(tmp_path):
    target = save_model(tmp_path / "llama", "llama", tiny.sentencepiece_style(), 0)
    source = save_model(tmp_path / "gpt2", "gpt2", tiny.byte_level(), 1)
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "wd", target, [("tgt", target), ("src", source)],
                       write_corpus(tmp_path / "corpus"))
    args = [sys.executable, "-m", "harness.cli", "run", str(cfg), "--no-track"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    runs = [ln.split()[1] for o in outs for ln in o.splitlines() if ln.strip().startswith("[run]")]
    assert sorted(runs) == sorted(set(runs)) and len(runs) == 11  # every stage built once, by one of the two
    tables = [o.split("Results (suite averages")[1] for o in outs]
    assert tables[0] == tables[1]
