"""CLM-only baseline (the fusion trainer at lam = 1) and the domain-expert pool built with it."""
from __future__ import annotations

import math

import datasets
import pytest
import torch
import tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baselines.clm import clm_dataset, train_clm
from baselines.domain_pool import train_domain_experts
from baselines.merging import check_mergeable, merge_models
from fusion.data import FusionCollator, prepare_train_dataset
from fusion.trainer import FusionTrainer, TrainSettings, training_arguments

torch.set_num_threads(1)

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"]
PROSE = ["the quick brown fox jumps over the lazy dog",
         "a stitch in time saves nine and the early bird catches the worm"]


def settings(**kw):
    base = dict(block_size=32, per_device_batch_size=4, lr=5e-3, warmup_ratio=0.0, lr_scheduler="constant",
                max_steps=6, weight_decay=0.0, seed=0)
    return TrainSettings(**{**base, **kw})


def test_clm_dataset_tokenizes_like_the_fused_dataset(sp_tokenizer):
    ds = clm_dataset(sp_tokenizer, CODE)
    assert ds.column_names == ["doc_id", "input_ids"] and ds["doc_id"] == [0, 1]
    ids = sp_tokenizer(CODE[0], add_special_tokens=False)["input_ids"] + [sp_tokenizer.eos_token_id]
    assert ds[0]["input_ids"] == ids   # no BOS, EOS appended (reference FuseLLM)


def test_clm_batch_loss_is_the_hf_models_own_loss(sp_tokenizer, tmp_path):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    data = clm_dataset(sp_tokenizer, CODE + PROSE)
    # the batch exactly as train_clm builds it: packing into blocks, FusionCollator, FusionTrainer at lam=1
    blocks = prepare_train_dataset(data, 16, fusion=False)
    batch = FusionCollator(sp_tokenizer.pad_token_id)([blocks[i] for i in range(len(blocks))])
    assert (batch["labels"] == -100).any()   # a padded last block: ignored labels take part in the check
    trainer = FusionTrainer(model=model, args=training_arguments(str(tmp_path), settings()), lam=1.0)
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - hf.item()) < 1e-6


def test_train_clm_loss_decreases_and_saves(sp_tokenizer, tmp_path):
    model = tiny.tiny_model("llama", sp_tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a fused dataset works too: its fused columns are simply not used at lam = 1
    data = clm_dataset(sp_tokenizer, CODE + PROSE)
    fused = data.add_column("k", [2] * len(data)).add_column(
        "fused_ids", [[0] * 2 * len(r) for r in data["input_ids"]]).add_column(
        "fused_probs", [[0.0] * 2 * len(r) for r in data["input_ids"]])
    result = train_clm(model, sp_tokenizer, fused, tmp_path / "clm", settings())
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    assert result.fusion_losses == {}
    assert result.clm_losses == pytest.approx(result.losses, abs=1e-6)   # logged rounded to 1e-6
    saved = load_file(str(tmp_path / "clm" / "model.safetensors"))
    assert not torch.equal(saved["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="no input_ids column.*clm_dataset"):
        train_clm(model, sp_tokenizer, datasets.Dataset.from_dict({"text": ["x"]}), tmp_path / "bad", settings())


@torch.no_grad()
def mean_nll(model, tokenizer, texts):
    data = clm_dataset(tokenizer, texts)
    total, count = 0.0, 0
    for ids in data["input_ids"]:
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
        total += out.loss.item() * (len(ids) - 1)
        count += len(ids) - 1
    return total / count


def test_domain_experts_are_mergeable_and_best_on_their_domain(tiny_llama_dir, sp_tokenizer, tmp_path):
    experts = train_domain_experts(tiny_llama_dir, {"code": CODE, "prose": PROSE}, tmp_path / "experts",
                                   settings(max_steps=8), sp_tokenizer)
    assert set(experts) == {"code", "prose"}
    for path in experts.values():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list((tmp_path / "experts").glob(".*tmp*"))
    check_mergeable([tiny_llama_dir, *experts.values()])    # structurally identical to the base

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    code_w, prose_w = (load_file(str(experts[d] / "model.safetensors")) for d in ("code", "prose"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(code_w[key], base[key]) and not torch.equal(code_w[key], prose_w[key])

    code, prose = (AutoModelForCausalLM.from_pretrained(experts[d]).eval() for d in ("code", "prose"))
    assert mean_nll(code, sp_tokenizer, CODE) < mean_nll(prose, sp_tokenizer, CODE)
    assert mean_nll(prose, sp_tokenizer, PROSE) < mean_nll(code, sp_tokenizer, PROSE)

    # a second call reuses the finished experts instead of retraining them
    mtime = (experts["code"] / "model.safetensors").stat().st_mtime_ns
    again = train_domain_experts(tiny_llama_dir, {"code": CODE}, tmp_path / "experts", settings(), sp_tokenizer)
    assert (again["code"] / "model.safetensors").stat().st_mtime_ns == mtime

    # the pool feeds the other baselines: task arithmetic of both experts over the base
    merged = merge_models(list(experts.values()), "task_arithmetic", tmp_path / "merged", base_model=tiny_llama_dir,
                          params={"weight": 0.5})
    assert (merged / "model.safetensors").is_file()


def test_domain_names_and_inputs_are_checked(tiny_llama_dir, sp_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="domain name 'a/b'"):
        train_domain_experts(tiny_llama_dir, {"a/b": CODE}, tmp_path, settings(), sp_tokenizer)
    with pytest.raises(ValueError, match="domain 'empty' has no training texts"):
        train_domain_experts(tiny_llama_dir, {"empty": []}, tmp_path, settings(), sp_tokenizer)
    with pytest.raises(ValueError, match="no config.json"):
        train_domain_experts(tmp_path, {"code": CODE}, tmp_path / "x", settings(), sp_tokenizer)
