"""Bad models refused at the door (issue 19, item 5): before any stage runs, one line naming the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny
from harness.config import ModelSpec
from harness.models import check_model
from local_models import save_model, write_config, write_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizers():
    return {"sp": tiny.sentencepiece_style(), "bpe": tiny.byte_level()}


@pytest.fixture(scope="module")
def good_source(tmp_path_factory, tokenizers):
    return save_model(tmp_path_factory.mktemp("good") / "gpt2", "gpt2", tokenizers["bpe"], 1)


@pytest.fixture
def llama(tmp_path, tokenizers):
    return save_model(tmp_path / "broken-llama", "llama", tokenizers["sp"], 0)


def problems(folder: Path, **spec) -> list[str]:
    return check_model(ModelSpec(name="bad", ref=str(folder), **spec))


def run_cli(tmp_path: Path, target: Path, source: Path, command: str = "run"):
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "wd", target, [("tgt", target), ("src", source)],
                       write_corpus(tmp_path / "corpus"))
    args = [sys.executable, "-m", "harness.cli", command, str(cfg)] + (["--no-track"] if command == "run" else [])
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out, time.perf_counter() - t0


def assert_refused_before_any_stage(out: subprocess.CompletedProcess, tmp_path: Path, line: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [f"fuselab: error: {line}"]
    cache = tmp_path / "wd" / "cache"
    assert not [d for d in cache.iterdir() if not d.name.startswith("_")] if cache.exists() else True


def test_good_models_have_no_problems(llama, good_source):
    assert problems(llama) == [] and problems(good_source) == []


def test_pickle_only_model_is_refused_in_seconds(tmp_path, llama, good_source):
    """Before: refused only after 162 s of work (corpus, then the first stage that loads weights)."""
    model = tiny.tiny_model("llama", tiny.sentencepiece_style(), seed=0)
    (llama / "model.safetensors").unlink()
    torch.save(model.state_dict(), llama / "pytorch_model.bin")
    t0 = time.perf_counter()
    found = problems(llama)
    assert time.perf_counter() - t0 < 10
    assert found == [f"model bad: {llama} holds only pickle weights (*.bin); convert them to safetensors or set "
                     f"`allow_pickle: true` for this model if you trust the files"]
    out, seconds = run_cli(tmp_path, llama, good_source)
    assert_refused_before_any_stage(out, tmp_path, found[0].replace("model bad:", "model tgt:"))
    assert seconds < 10  # the whole `fuselab run` process: file checks come before torch is imported


def test_vocabulary_larger_than_the_embedding_is_one_line(tmp_path, tokenizers, llama, good_source):
    """Before: a 74-line traceback from inside the embedding lookup, naming no model."""
    tokenizers["bpe"].save_pretrained(llama)  # 300 tokens for a 199-row embedding
    out, _ = run_cli(tmp_path, llama, good_source)
    assert_refused_before_any_stage(
        out, tmp_path, f"model tgt: the tokenizer has 300 tokens but the embedding has 199 rows (config.json "
                       f"vocab_size): token ids >= 199 index past it; the tokenizer and weights in {llama} do not "
                       f"belong together")


def test_nan_weights_are_named(llama):
    from safetensors.torch import load_file, save_file

    f = llama / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    assert problems(llama) == [f"model bad: weights hold non-finite values (NaN/inf) in 1 tensor(s), first "
                               f"model.layers.1.mlp.up_proj.weight in {f}: the checkpoint is broken (retrain, "
                               f"re-save or re-download it)"]


def test_truncated_weights_are_named(llama):
    f = llama / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    (found,) = problems(llama)
    assert found.startswith(f"model bad: weight file {f} is truncated or not a safetensors file (")


def test_weights_that_do_not_fit_the_config_are_named(llama):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the files hold 64-wide MLPs
    (llama / "config.json").write_text(json.dumps(cfg))
    assert problems(llama) == [f"model bad: tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has "
                               f"shape [64, 32] but config.json builds [48, 32]; the weights in {llama} do not fit "
                               f"its config"]


def test_weights_of_another_architecture_are_named(llama, good_source):
    import shutil

    shutil.copy(good_source / "model.safetensors", llama / "model.safetensors")  # GPT-2 tensors, Llama config
    (found,) = problems(llama)
    assert found == (f"model bad: only 0 of the 21 tensors config.json builds are in the weight files of {llama}: "
                     f"the weights belong to another architecture")


def test_missing_config_and_shard_are_named(llama):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (llama / "model.safetensors.index.json").write_text(json.dumps(index))
    assert problems(llama) == [f"model bad: shard model-00002-of-00002.safetensors listed in "
                               f"model.safetensors.index.json is missing from {llama}"]
    (llama / "config.json").unlink()
    assert problems(llama) == [f"model bad: {llama} is not a Hugging Face model folder (no config.json)"]


def test_plan_lists_problems_and_still_shows_the_stages(tmp_path, llama, good_source):
    (llama / "model.safetensors").unlink()
    torch.save({}, llama / "pytorch_model.bin")
    out, _ = run_cli(tmp_path, llama, good_source, command="plan")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "distributions/tgt" in out.stdout
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("fuselab:")] == [
        f"fuselab: problem: model tgt: {llama} holds only pickle weights (*.bin); convert them to safetensors or "
        f"set `allow_pickle: true` for this model if you trust the files"]


def test_overflowing_distributions_are_refused_naming_the_model(tmp_path, tokenizers, llama, good_source):
    """Finite weights whose float16 logits overflow: NaN log-probabilities are never cached (before: they
    failed five minutes later as "candidate 1 has a non-finite score nan")."""
    from safetensors.torch import load_file, save_file

    from harness.config import validate_config
    from harness.models import NonFiniteError
    from harness.pipeline import build_plan, run_experiment
    from local_models import config_data

    f = llama / "model.safetensors"
    state = load_file(f)
    state["lm_head.weight"] = state["lm_head.weight"] * 1e7  # beyond float16 (65504) once loaded as float16
    save_file(state, f, metadata={"format": "pt"})
    data = config_data(tmp_path / "wd", llama, [("tgt", llama), ("src", good_source)],
                       write_corpus(tmp_path / "corpus"))
    data["target"]["dtype"] = data["sources"][0]["dtype"] = "float16"
    cfg = validate_config(data)
    assert problems(llama, dtype="float16") == []  # the weights themselves are finite
    with pytest.raises(NonFiniteError, match=r"^distributions/tgt: model tgt gives non-finite log-probabilities "
                                             r"\(NaN/inf weights, or an overflow in float16: try dtype float32\): "
                                             r"\d+ of \d+ values in column topk_logprobs are NaN/inf"):
        run_experiment(cfg, progress=False, track=False)
    plan = build_plan(cfg)
    assert plan.cached("corpus") and not plan.cached("distributions/tgt")
