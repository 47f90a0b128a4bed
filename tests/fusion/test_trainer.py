import json
import math

import datasets
import numpy as np
import pytest
import torch
import transformers

import tiny
from fusion.align import offsets_align
from fusion.aligned import align_distribution
from fusion.data import FusionCollator, prepare_train_dataset
from fusion.distributions import extract_distributions, topk_arrays
from fusion.fuse import Candidate, avgce
from fusion.trainer import DEEPSPEED_PRESETS, TrainSettings, train_target, training_arguments
from fusion.tokens import tokenize_document
from fusion.vocab import build_vocab_map

TEXTS = sorted(set(tiny.TRAIN_TEXT))
K = 4


@pytest.fixture(scope="module")
def fused_dataset(sp_tokenizer, bpe_tokenizer):
    """Target tiny Llama ("▁" tokenizer) fused with a tiny GPT-2 source ("Ġ" byte-level), via the real pipeline."""
    target = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    source = tiny.tiny_model("gpt2", bpe_tokenizer, seed=1)
    doc_ids = list(range(len(TEXTS)))
    t_dist, _ = extract_distributions(target, sp_tokenizer, TEXTS, doc_ids, k=K, progress=False)
    s_dist, _ = extract_distributions(source, bpe_tokenizer, TEXTS, doc_ids, k=K, progress=False)
    vocab_map = build_vocab_map("mined", bpe_tokenizer, sp_tokenizer)
    rows = []
    for text, t_row, s_row in zip(TEXTS, t_dist, s_dist):
        t_tok, s_tok = tokenize_document(sp_tokenizer, text), tokenize_document(bpe_tokenizer, text)
        t_ids, t_lp, _ = topk_arrays(t_row, K)
        s_ids, s_lp, _ = topk_arrays(s_row, K)
        a_ids, a_probs = align_distribution(t_tok, s_tok, s_ids, s_lp, offsets_align(t_tok, s_tok), vocab_map)
        ids, probs = avgce([Candidate(t_ids, np.exp(t_lp), t_row["ce"]), Candidate(a_ids, a_probs, s_row["ce"])], K)
        rows.append({"doc_id": t_row["doc_id"], "input_ids": t_tok.ids.tolist(), "fused_ids": ids.ravel().tolist(),
                     "fused_probs": probs.ravel().tolist(), "k": K})
    return datasets.Dataset.from_list(rows)


def settings(**kw):
    base = dict(block_size=32, per_device_batch_size=8, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                max_steps=3, weight_decay=0.0, seed=0)
    return TrainSettings(**{**base, **kw})


def test_fusion_training_decreases_loss_and_saves(fused_dataset, sp_tokenizer, tmp_path):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    blocks = prepare_train_dataset(fused_dataset, 32)
    assert len(blocks) <= 8            # every step sees the whole data set, so the loss must go down
    result = train_target(model, sp_tokenizer, fused_dataset, tmp_path / "out", settings(), lam=0.9)
    losses = [result.losses[s] for s in (1, 2, 3)]
    assert all(math.isfinite(x) for x in losses) and losses[0] > losses[1] > losses[2]
    for step in (1, 2, 3):
        mixed = 0.9 * result.clm_losses[step] + 0.1 * result.fusion_losses[step]
        assert result.losses[step] == pytest.approx(mixed, abs=1e-4)
    assert result.tokens == 3 * sum(len(b) for b in blocks["input_ids"])
    assert result.tokens_per_s > 0 and result.flops_per_s == pytest.approx(
        6 * (sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()) * result.tokens
        / result.train_runtime)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_lam_one_is_the_plain_hf_clm_trainer(fused_dataset, sp_tokenizer, tmp_path):
    clm_data = fused_dataset.select_columns(["input_ids"])           # the CLM-only baseline needs nothing else
    s = settings(per_device_batch_size=2, grad_accum=2)
    ours = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=4), sp_tokenizer, clm_data, tmp_path / "a", s,
                        lam=1.0)
    plain = transformers.Trainer(model=tiny.tiny_model("llama", sp_tokenizer, seed=4),
                                 args=training_arguments(str(tmp_path / "b"), s),
                                 train_dataset=prepare_train_dataset(clm_data, 32, fusion=False),
                                 data_collator=FusionCollator(sp_tokenizer.pad_token_id))
    plain.train()
    plain_losses = {e["step"]: e["loss"] for e in plain.state.log_history if "loss" in e}
    assert ours.losses == plain_losses and len(plain_losses) == 3
    assert ours.fusion_losses == {}


def test_gradient_accumulation_normalises_over_the_whole_batch(fused_dataset, sp_tokenizer, tmp_path):
    # Blocks of equal length (no padding): one step of 2 x 1 accumulated == one step of batch 2.
    data = fused_dataset.select(range(4))
    accumulated = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "a",
                               settings(block_size=8, per_device_batch_size=1, grad_accum=2, max_steps=1), lam=0.5)
    batched = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "b",
                           settings(block_size=8, per_device_batch_size=2, grad_accum=1, max_steps=1), lam=0.5)
    assert accumulated.clm_losses[1] == pytest.approx(batched.clm_losses[1], abs=1e-5)
    assert accumulated.fusion_losses[1] == pytest.approx(batched.fusion_losses[1], abs=1e-5)
    assert accumulated.losses[1] == pytest.approx(batched.losses[1], abs=1e-4)


def test_quiet_training_prints_nothing_and_keeps_the_history(fused_dataset, sp_tokenizer, tmp_path, capsys):
    data = fused_dataset.select(range(4))
    s = settings(block_size=8, per_device_batch_size=2, grad_accum=1, max_steps=2, logging_steps=1)
    loud = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "a", s, lam=0.5)
    assert "train  step 2/2  loss" in capsys.readouterr().out    # fusion.trainer.TrainingProgress lines
    quiet = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, data, tmp_path / "b", s,
                         lam=0.5, verbose=False)
    assert "loss" not in capsys.readouterr().out
    assert sorted(quiet.losses) == [1, 2] and quiet.losses == pytest.approx(loud.losses, abs=1e-6)


def test_document_isolation_and_errors(fused_dataset, sp_tokenizer, tmp_path):
    result = train_target(tiny.tiny_model("llama", sp_tokenizer, seed=0), sp_tokenizer, fused_dataset,
                          tmp_path / "reset", settings(max_steps=1, cross_document_attention=False, add_bos=True),
                          lam=0.9)
    assert math.isfinite(result.losses[1])
    mpt = tiny.tiny_model("mpt", sp_tokenizer)
    with pytest.raises(ValueError, match="MptForCausalLM takes no position_ids"):
        train_target(mpt, sp_tokenizer, fused_dataset, tmp_path / "x", settings(cross_document_attention=False), 0.9)
    with pytest.raises(ValueError, match="lam < 1 needs a fused dataset"):
        train_target(tiny.tiny_model("llama", sp_tokenizer), sp_tokenizer, fused_dataset.select_columns(["input_ids"]),
                     tmp_path / "y", settings(), lam=0.9)
    with pytest.raises(FileNotFoundError, match="zero4"):
        train_target(tiny.tiny_model("llama", sp_tokenizer), sp_tokenizer, fused_dataset, tmp_path / "z",
                     settings(deepspeed="zero4"), lam=0.9)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_deepspeed_configs_leave_every_choice_to_the_trainer(preset, sp_tokenizer, tmp_path):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    raw = json.loads(DEEPSPEED_PRESETS[preset].read_text())
    assert "optimizer" not in raw and "scheduler" not in raw      # the Trainer's AdamW and cosine schedule stay
    assert raw["zero_optimization"]["stage"] == int(preset[-1])
    s = settings(per_device_batch_size=3, grad_accum=5, max_grad_norm=0.7)
    args = training_arguments(str(tmp_path), s)
    model = tiny.tiny_model("llama", sp_tokenizer)     # before the config: a live ZeRO-3 config wraps model init
    config = HfTrainerDeepSpeedConfig(str(DEEPSPEED_PRESETS[preset]))
    try:
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, model, num_training_steps=10)
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(config.config)
    assert config.config["train_micro_batch_size_per_gpu"] == 3 and config.config["gradient_accumulation_steps"] == 5
    assert config.config["train_batch_size"] == 15 and config.config["gradient_clipping"] == 0.7
    assert config.config["bf16"]["enabled"] is False


DEEPSPEED_RUN = r'''
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import datasets, tiny
from fusion.trainer import TrainSettings, train_target
out, data = sys.argv[2], datasets.load_from_disk(sys.argv[3])
tok = tiny.sentencepiece_style()
losses = {}
for preset in (None, "zero2", "zero3"):
    s = TrainSettings(block_size=32, per_device_batch_size=8, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                      max_steps=3, weight_decay=0.0, seed=0, deepspeed=preset)
    result = train_target(tiny.tiny_model("llama", tok, seed=0), tok, data, os.path.join(out, str(preset)), s, 0.9)
    losses[str(preset)] = [result.losses[i] for i in (1, 2, 3)]
json.dump(losses, open(os.path.join(out, "losses.json"), "w"))
'''


def test_deepspeed_zero2_and_zero3_train_like_plain(fused_dataset, tmp_path):
    """Real DeepSpeed (single process, gloo): same losses as without it; the model is saved as safetensors.
    Its own process: DeepSpeed keeps global state. The first run on a machine compiles a DeepSpeed op (~2 min)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fused_dataset.save_to_disk(str(tmp_path / "data"))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    run = subprocess.run([sys.executable, "-c", DEEPSPEED_RUN, str(repo), str(tmp_path), str(tmp_path / "data")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert all(math.isfinite(x) for x in losses["None"])
    for preset in ("zero2", "zero3"):
        assert losses[preset] == pytest.approx(losses["None"], abs=1e-4), preset
        assert (tmp_path / preset / "model.safetensors").is_file()
