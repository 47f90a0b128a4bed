"""DeepSpeed ZeRO-2/3 training through the launcher gives the plain HF Trainer's losses (CPU, tiny Llama).

The first DeepSpeed run on a machine compiles a communication op (~145 s on 2 cores, cached in
~/.cache/torch_extensions); later runs take ~20-40 s each.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

import tiny
from fusion.trainer import DEEPSPEED_PRESETS, TrainSettings, train_target
from harness.config import ModelSpec
from harness.launch import CONFIGURED_STATE_ENV, LaunchError, launch_training, run_job, worker_command, write_job
from harness.models import load_model

K = 4
SETTINGS = TrainSettings(block_size=32, per_device_batch_size=2, grad_accum=1, lr=2e-3, warmup_ratio=0.0,
                         weight_decay=0.1, max_grad_norm=1.0, max_steps=3, seed=0, logging_steps=1,
                         lr_scheduler="linear")


@pytest.fixture(scope="module")
def fused_dataset_dir(tmp_path_factory, sp_tokenizer):
    """A fused dataset in the pipeline's format: target tokenization + a top-K distribution per position."""
    rng = np.random.default_rng(0)
    vocab = len(sp_tokenizer)
    rows = {"doc_id": [], "input_ids": [], "fused_ids": [], "fused_probs": [], "k": []}
    for doc_id, text in enumerate(tiny.TRAIN_TEXT[:24]):
        ids = sp_tokenizer(text, add_special_tokens=False)["input_ids"] + [sp_tokenizer.eos_token_id]
        n = len(ids)
        top = np.stack([rng.choice(vocab, size=K, replace=False) for _ in range(n)]).astype(np.int32)
        probs = rng.dirichlet(np.ones(K), size=n).astype(np.float32)
        rows["doc_id"].append(doc_id)
        rows["input_ids"].append(np.asarray(ids, dtype=np.int32))
        rows["fused_ids"].append(top.reshape(-1))
        rows["fused_probs"].append(probs.reshape(-1))
        rows["k"].append(K)
    path = tmp_path_factory.mktemp("fused") / "dataset"
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def plain_losses(tiny_llama_dir, fused_dataset_dir, tmp_path_factory):
    loaded = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    ds = datasets.load_from_disk(str(fused_dataset_dir))
    res = train_target(loaded.model, loaded.tokenizer, ds, tmp_path_factory.mktemp("plain") / "model", SETTINGS, lam=0.9)
    assert sorted(res.losses) == [1, 2, 3]
    return res


def test_shipped_zero_configs_take_every_value_from_the_trainer():
    for name, path in DEEPSPEED_PRESETS.items():
        cfg = json.loads(Path(path).read_text())
        # an "optimizer" or "scheduler" section would silently replace the Trainer's AdamW betas / cosine schedule
        assert "optimizer" not in cfg and "scheduler" not in cfg, name
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert cfg[key] == "auto", (name, key)
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
        assert cfg["zero_optimization"]["stage"] == int(name[-1])


def test_worker_command_per_launcher(tmp_path):
    job = tmp_path / "job.json"
    assert worker_command(job, "torchrun", 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node=2", "-m"]
    assert worker_command(job, None, 1)[1:] == ["-m", "harness.launch", str(job)]
    ds_cmd = worker_command(job, "deepspeed", 8)
    assert ds_cmd[0].endswith("deepspeed") and "--num_gpus=8" in ds_cmd and ds_cmd[-2:] == ["harness.launch", str(job)]
    with pytest.raises(ValueError, match="launcher none runs one process"):
        worker_command(job, "none", 2)
    with pytest.raises(ValueError, match="launcher must be one of"):
        worker_command(job, "mpirun", 1)


def _run(tiny_llama_dir, fused_dataset_dir, tmp_path, launcher, nproc, **changes):
    settings = replace(SETTINGS, **changes)
    model = ModelSpec(ref=str(tiny_llama_dir)).model_dump(mode="json")
    job = write_job(tmp_path / "job", stage="train/fusellm", model=model, dataset=fused_dataset_dir,
                    settings=asdict(settings), lam=0.9)
    result = run_job(job, launcher, nproc, timeout_s=900, threads=1)
    assert result["deepspeed_initialized"] == (settings.deepspeed is not None)
    assert (tmp_path / "job" / "output" / "model" / "model.safetensors").is_file()
    return {int(k): v for k, v in result["losses"].items()}, result


def _assert_same(losses: dict[int, float], plain) -> None:
    assert sorted(losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(losses[step] - plain.losses[step]) < 1e-4, (step, losses, plain.losses)
    assert plain.losses[3] != plain.losses[1]  # the steps really trained


@pytest.mark.slow
def test_zero2_under_torchrun_matches_plain_trainer(tiny_llama_dir, fused_dataset_dir, plain_losses, tmp_path):
    losses, result = _run(tiny_llama_dir, fused_dataset_dir, tmp_path, "torchrun", 1, deepspeed="zero2")
    _assert_same(losses, plain_losses)
    assert result["settings"]["deepspeed"] == "zero2" and result["world_size"] == 1
    fused = {int(k): v for k, v in result["fusion_losses"].items()}
    assert all(abs(fused[s] - plain_losses.fusion_losses[s]) < 1e-4 for s in (1, 2, 3))


@pytest.mark.slow
def test_zero3_under_torchrun_matches_plain_trainer(tiny_llama_dir, fused_dataset_dir, plain_losses, tmp_path):
    losses, result = _run(tiny_llama_dir, fused_dataset_dir, tmp_path, "torchrun", 1, deepspeed="zero3")
    _assert_same(losses, plain_losses)
    # ZeRO-3 partitions parameters: the saved model must still be whole (gathered on save)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "job" / "output" / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert [p.shape for p in saved.parameters()] == [p.shape for p in original.parameters()]
    assert any((a - b).abs().max() > 0 for a, b in zip(saved.parameters(), original.parameters()))


@pytest.mark.slow
def test_zero2_without_launcher_sets_single_process_env(tiny_llama_dir, fused_dataset_dir, plain_losses, tmp_path):
    losses, _ = _run(tiny_llama_dir, fused_dataset_dir, tmp_path, None, 1, deepspeed="zero2")
    _assert_same(losses, plain_losses)


def test_launcher_and_trainer_agree_on_configured_state_flag():
    # the worker sets it, the trainer reads it (fusion never imports harness, so the name lives in both);
    # what it does is checked by the two-process ZeRO-2 test below
    import fusion.trainer

    assert fusion.trainer.CONFIGURED_STATE_ENV == CONFIGURED_STATE_ENV == "FUSELAB_CONFIGURED_STATE"


@pytest.mark.slow
def test_zero2_two_processes_match_one_process_with_accumulation(tiny_llama_dir, fused_dataset_dir, tmp_path):
    # 2 ranks x 2 sequences = 1 process x 2 sequences x 2 accumulation steps: same batches, same update
    loaded = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    accum = replace(SETTINGS, grad_accum=2, max_steps=2)
    plain = train_target(loaded.model, loaded.tokenizer, datasets.load_from_disk(str(fused_dataset_dir)),
                         tmp_path / "plain", accum, lam=0.9)
    losses, result = _run(tiny_llama_dir, fused_dataset_dir, tmp_path, "torchrun", 2, deepspeed="zero2", max_steps=2)
    assert result["world_size"] == 2 and sorted(losses) == [1, 2]
    for step in (1, 2):
        assert abs(losses[step] - plain.losses[step]) < 1e-4, (step, losses, plain.losses)


def test_failed_job_names_stage_and_log(tiny_llama_dir, tmp_path):
    model = ModelSpec(ref=str(tiny_llama_dir)).model_dump(mode="json")
    job = write_job(tmp_path / "job", stage="train/clm", model=model, dataset=tmp_path / "no-such-dataset",
                    settings=asdict(SETTINGS), lam=1.0)
    with pytest.raises(LaunchError, match=r"train/clm: training under none with 1 process\(es\) failed.*launch\.log"):
        run_job(job, None, 1, timeout_s=300)


@pytest.mark.slow
def test_fuselab_train_runs_the_pipeline_then_zero2_and_caches_the_model(tiny_llama_dir, tiny_gpt2_dir, tmp_path,
                                                                         monkeypatch):
    from harness.config import load_config
    from harness.pipeline import build_plan

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(tiny.TRAIN_TEXT[:6] * 3))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "launch-e2e", "workdir": str(tmp_path / "work"),
        "target": {"name": "tl", "ref": str(tiny_llama_dir)},
        "sources": [{"name": "tl", "ref": str(tiny_llama_dir)}, {"name": "tg", "ref": str(tiny_gpt2_dir)}],
        "corpus": {"kind": "text_files", "paths": [str(text)], "validation_fraction": 0.2},
        "fusion": {"top_k": 4, "extraction_batch_size": 4},
        "training": {"block_size": 32, "per_device_batch_size": 2, "max_steps": 2, "logging_steps": 1,
                     "deepspeed": "zero2"},
        "baselines": {"clm": False, "ensemble": {"enabled": False}},
    }))
    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    assert launch_training(config, [], launcher="none", nproc=1, progress=False, timeout_s=900) == 0
    plan = build_plan(load_config(config))
    assert plan.cached("fused") and plan.cached("train/fusellm")
    out = plan.path("train/fusellm")
    result = json.loads((out / "train_result.json").read_text())
    assert sorted(int(s) for s in result["losses"]) == [1, 2] and result["deepspeed_initialized"]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    # a second call finds everything cached and launches nothing
    assert launch_training(config, [], launcher="none", nproc=1, progress=False) == 0
    assert json.loads((out / "train_result.json").read_text()) == result
