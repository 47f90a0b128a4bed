"""Offline cost estimates: the paper's 7B study by hand, parameter counts from config.json, local corpora."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.config import load_config, validate_config
from harness.estimate import A100_8X, Hardware, estimate, format_estimate, model_params, params_from_config

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "studies" / "paper_llama2_openllama_mpt_7b.yaml"


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config(PAPER, check_paths=False)


def test_paper_config_is_the_papers_setup(paper_cfg):
    c = paper_cfg
    assert c.target.ref == "meta-llama/Llama-2-7b-hf"
    assert [s.ref for s in c.sources] == ["meta-llama/Llama-2-7b-hf", "openlm-research/open_llama_7b_v2", "mosaicml/mpt-7b"]
    assert not any(s.trust_remote_code for s in c.sources)
    t = c.training
    assert (t.block_size, t.per_device_batch_size * t.grad_accum * 8, t.lr, t.warmup_ratio) == (2048, 128, 1e-5, 0.008)
    assert (t.weight_decay, t.max_grad_norm, t.bf16, t.deepspeed, t.num_epochs) == (0.1, 1.0, True, "zero2", 1.0)
    f = c.fusion
    assert (f.lam, f.top_k, f.vocab_map, f.fusion) == (0.9, 10, "mined", "mince")
    assert c.evaluation.suites == ["bbh", "commonsense", "multipl_e"]


def test_paper_estimate_by_hand(paper_cfg):
    est = estimate(paper_cfg)
    llama, mpt, T = 6_738_415_616, 6_649_286_656, 1_800_000_000
    d = est["distributions/llama2-7b"]
    assert d["tokens"] == T and d["params"] == llama
    assert d["flops"] == 2.0 * llama * T
    assert d["gpu_hours"] == pytest.approx(2.0 * llama * T / (0.4 * 312e12) / 3600, rel=1e-12)
    assert d["gpu_hours"] == pytest.approx(54.0, abs=0.05)
    assert d["cache_gb"] == pytest.approx(60 * T / 1e9)  # 108 GB per model at 60 bytes/token
    assert est["distributions/mpt-7b"]["flops"] == 2.0 * mpt * T
    train = est["train/fusellm"]
    assert train["flops"] == 6.0 * llama * T and train["wall_hours"] == pytest.approx(train["gpu_hours"] / 8)
    assert math.ceil(T / (128 * 2048)) == 6867 and "6867 steps" in train["note"]
    assert est["train/clm"]["flops"] == train["flops"]
    total = est["total"]
    assert total["flops"] == pytest.approx(2.0 * T * (2 * llama + mpt) + 2 * 6.0 * llama * T)
    assert "40% utilisation" in total["note"]
    text = format_estimate(est)
    assert "distributions/openllama-7b-v2" in text and "24,258.3" in text


def test_estimate_keys_are_plan_stages(paper_cfg, tmp_path, monkeypatch):
    from harness.pipeline import build_plan

    monkeypatch.setenv("FUSELAB_WORKDIR", str(tmp_path))
    plan = build_plan(paper_cfg)  # offline: hub ids are only named, nothing is fetched
    assert set(estimate(paper_cfg)) - {"total"} <= set(plan.stages)


def test_hardware_and_token_overrides(paper_cfg):
    h100 = Hardware(name="H100", peak_flops=989e12, utilisation=0.5, gpus=4)
    est = estimate(paper_cfg, hardware=h100, tokens=1_000_000)
    train = est["train/fusellm"]
    assert train["tokens"] == 1_000_000
    assert train["gpu_hours"] == pytest.approx(6.0 * 6_738_415_616 * 1e6 / (0.5 * 989e12) / 3600)
    assert "4/device x 4 accum x 4 GPUs" in train["note"]
    assert A100_8X.gpus == 8


def test_params_from_local_config_match_the_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    assert params_from_config(tiny_llama_dir / "config.json") == real


def test_local_corpus_and_model(tiny_llama_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("x" * 4000)
    cfg = validate_config({
        "name": "local", "target": {"ref": str(tiny_llama_dir)}, "sources": [{"ref": str(tiny_llama_dir)}],
        "corpus": {"kind": "text_files", "paths": [str(text)], "validation_fraction": 0.1},
        "training": {"block_size": 8, "per_device_batch_size": 2},
        "baselines": {"clm": False},
    })
    est = estimate(cfg, hardware=Hardware(gpus=1))
    n = model_params(cfg.target)
    assert est["distributions/" + cfg.target.label]["tokens"] == 900  # 4000 bytes / 4 per token x 0.9 train
    assert est["train/fusellm"]["flops"] == 6.0 * n * 900
    assert "train/clm" not in est
    assert "57 steps" in est["train/fusellm"]["note"]  # ceil(900 / (2 x 8))
    capped = validate_config({**cfg.model_dump(mode="json"),
                              "corpus": {**cfg.corpus.model_dump(mode="json"), "max_docs_per_domain": 1}})
    # one ~2,000-character document per domain: 2000 bytes / 4 x 0.9
    assert estimate(capped)["fused"]["tokens"] == 450
