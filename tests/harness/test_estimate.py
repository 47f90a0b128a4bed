"""Offline cost estimates: the paper's 7B study by hand (no data, no weights), the micro quickstart (no NaN, no 0),
named and detected hardware, parameter counts from config.json and declared micro architectures, corpora."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import load_config, validate_config
from harness.estimate import (Hardware, detect_hardware, estimate, format_estimate, gpu_hardware, hardware_profile,
                              micro_params, model_params, params_from_config)

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "studies" / "paper_llama2_openllama_mpt_7b.yaml"
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"
A100X8 = hardware_profile("a100x8")
SLOW_CPU = Hardware("test CPU", peak_flops=50e9, utilisation=0.2)
LLAMA2_7B = 6_738_415_616


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config(PAPER, check_paths=False)


def test_paper_config_is_the_papers_setup(paper_cfg):
    c = paper_cfg
    assert c.target.ref == "meta-llama/Llama-2-7b-hf"
    assert [s.ref for s in c.sources] == ["meta-llama/Llama-2-7b-hf", "openlm-research/open_llama_7b_v2", "mosaicml/mpt-7b"]
    assert not any(s.trust_remote_code for s in c.sources)
    assert (c.corpus.kind, c.corpus.dataset.path) == ("datasets", "JeanKaddour/minipile")
    assert c.corpus.dataset.split == "train"
    t = c.training
    assert (t.block_size, t.per_device_batch_size * t.grad_accum * 8, t.lr, t.warmup_ratio) == (2048, 128, 1e-5, 0.008)
    assert (t.weight_decay, t.max_grad_norm, t.bf16, t.deepspeed, t.num_epochs) == (0.1, 1.0, True, "zero2", 1.0)
    f = c.fusion
    assert (f.lam, f.top_k, f.vocab_map, f.fusion) == (0.9, 10, "mined", "mince")
    assert c.evaluation.suites == ["bbh", "commonsense", "multipl_e"]


def test_paper_estimate_by_hand(paper_cfg):
    est = estimate(paper_cfg, hardware=A100X8)
    mpt, T = 6_649_286_656, 1_798_200_000  # declared 1.8B tokens x 0.999 train split
    d = est["distributions/llama2-7b"]
    assert d["tokens"] == T and d["params"] == LLAMA2_7B
    assert d["flops"] == 2.0 * LLAMA2_7B * T
    assert d["device_hours"] == pytest.approx(2.0 * LLAMA2_7B * T / (0.4 * 312e12) / 3600, rel=1e-12)
    assert d["device_hours"] == pytest.approx(53.9, abs=0.05)
    assert d["cache_bytes"] == pytest.approx(60 * T)  # 108 GB per model at 60 bytes/token
    assert "declared corpus.expected_tokens (data not read); train split 0.999" in d["note"]
    assert est["distributions/mpt-7b"]["flops"] == 2.0 * mpt * T
    train = est["train/fusellm"]
    assert train["flops"] == 6.0 * LLAMA2_7B * T and train["wall_hours"] == pytest.approx(train["device_hours"] / 8)
    assert math.ceil(T / (128 * 2048)) == 6860 and "6860 steps" in train["note"]
    assert est["train/clm"]["flops"] == train["flops"]
    assert est["total"]["flops"] == pytest.approx(2.0 * T * (2 * LLAMA2_7B + mpt) + 2 * 6.0 * LLAMA2_7B * T)
    assert est["total"]["note"].startswith("on 8 x NVIDIA A100, peak 312 TFLOP/s each, 40% of it achieved "
                                           "(profile a100x8)")
    text = format_estimate(est)
    # 53.9 h of one GPU = 2.2 days; 8 GPUs in parallel: 6.7 hours
    assert "distributions/openllama-7b-v2" in text and "2.2 d" in text and "6.7 h" in text and "107.9 GB" in text


def test_fuselab_plan_of_the_7b_config_offline_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSELAB_WORKDIR", str(tmp_path))
    assert main(["plan", str(PAPER), "--hardware", "a100x8"]) == 0
    out, err = capsys.readouterr()
    assert "train/fusellm" in out and "1,798,200,000" in out and "6,738,415,616" in out
    assert "on 8 x NVIDIA A100" in out and "nan" not in out.lower()
    # what `fuselab run` would stop at, named here without failing the plan
    assert "fuselab: problem: corpus.dataset: JeanKaddour/minipile cannot be loaded offline" in err


def test_micro_quickstart_estimates_have_no_nan_and_no_zero():
    est = estimate(load_config(QUICKSTART, check_paths=False), hardware=SLOW_CPU)
    computed = [n for n in est if n.startswith(("world", "distributions/", "train/", "domain_pool"))]
    assert len(computed) == 7  # world, 3 distributions, fusellm, clm, domain_pool
    for name in computed + ["total"]:
        row = est[name]
        assert row["flops"] > 0 and row["device_hours"] > 0 and row["wall_hours"] == row["device_hours"], name
    for name in [n for n in est if n.startswith(("aligned/", "fused", "distributions/", "train/"))]:
        assert est[name]["tokens"] > 0 and est[name]["cache_bytes"] > 0, name
    # declared world: 3 x 360,000 train characters / 2.13 bytes per token
    assert est["train/fusellm"]["tokens"] == int(1_080_000 / 2.13) == 507_042
    assert est["train/fusellm"]["params"] == 515_232
    # 248 steps of 8 x 256 tokens; 6NT FLOPs at 20% of 50 GFLOP/s
    assert "248 steps" in est["train/fusellm"]["note"]
    assert est["train/fusellm"]["device_hours"] == pytest.approx(6.0 * 515_232 * 507_042 / 10e9 / 3600)
    assert est["domain_pool"]["tokens"] == 3 * 40 * 8 * 256
    text = format_estimate(est)
    assert "nan" not in text.lower() and "on 1 x test CPU, peak 50 GFLOP/s each, 20% of it achieved" in text


def test_fuselab_plan_of_the_quickstart_names_the_detected_hardware(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSELAB_WORKDIR", str(tmp_path))
    assert main(["plan", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    estimates = out[out.index("estimates:"):]
    assert "nan" not in estimates.lower() and "A100" not in estimates
    assert "(detected" in estimates


def test_micro_params_from_the_declared_architectures():
    # llama-docs: vocab 1024, hidden 96, 3 layers, MLP 240, untied: 2 x 1024 x 96 embeddings and head,
    # per layer 4 x 96^2 attention + 3 x 96 x 240 MLP + 2 x 96 norms, final norm 96
    assert micro_params("llama-docs") == 2 * 1024 * 96 + 3 * (4 * 96 * 96 + 3 * 96 * 240 + 2 * 96) + 96 == 515_232
    assert micro_params("nope") is None


def test_the_micro_worlds_models_have_the_declared_sizes(micro_world):
    for name in ("llama-docs", "neox-code", "mpt-arithmetic"):
        assert params_from_config(micro_world.root / "models" / name / "config.json") == micro_params(name)


def test_hardware_profiles_and_detection():
    assert (A100X8.name, A100X8.peak_flops, A100X8.devices, A100X8.utilisation) == ("NVIDIA A100", 312e12, 8, 0.4)
    assert (hardware_profile("H100-PCIe").peak_flops, hardware_profile("rtx4090x2").devices) == (756e12, 2)
    with pytest.raises(ValueError, match=r"^unknown hardware profile 'tpu': use cpu, or a GPU name"):
        hardware_profile("tpu")
    here = detect_hardware()  # this test machine: no GPU
    assert here.name.startswith("CPU with ") and here.peak_flops > 0 and here.devices == 1
    assert here.source.startswith("detected: no CUDA GPU visible")


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10G", 125e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla V100-SXM2-16GB", 125e12),
])
def test_detected_gpus_by_their_cuda_names(device_name, peak):
    hw = gpu_hardware(device_name, 2)
    assert (hw.name, hw.peak_flops, hw.devices, hw.source) == (device_name, peak, 2, "detected")


def test_an_unknown_gpu_is_not_guessed():
    assert gpu_hardware("Some Future GPU", 1) is None  # detect_hardware then measures its matmul peak


def test_hardware_and_token_overrides(paper_cfg):
    h100 = Hardware(name="H100", peak_flops=989e12, utilisation=0.5, devices=4)
    train = estimate(paper_cfg, hardware=h100, tokens=1_000_000)["train/fusellm"]
    assert train["tokens"] == 1_000_000
    assert train["device_hours"] == pytest.approx(6.0 * LLAMA2_7B * 1e6 / (0.5 * 989e12) / 3600)
    assert "4/device x 4 accum x 4 devices" in train["note"]


def test_hub_dataset_sizes_caps_and_unknown_datasets(paper_cfg):
    data = paper_cfg.model_dump(mode="json")
    corpus = {k: v for k, v in data["corpus"].items() if k != "expected_tokens"}

    def tokens(**fields):
        cfg = validate_config({**data, "corpus": {**corpus, **fields}})
        return estimate(cfg, hardware=A100X8)["train/fusellm"]

    known = tokens()
    assert known["tokens"] == int(1_800_000_000 * 0.999)
    assert "known size of hub dataset JeanKaddour/minipile (data not read)" in estimate(
        validate_config({**data, "corpus": corpus}), hardware=A100X8)["distributions/llama2-7b"]["note"]
    assert tokens(max_docs=100_000)["tokens"] == int(180_000_000 * 0.999)  # a tenth of the 1M documents
    assert tokens(max_tokens=1_000_000)["tokens"] == 999_000
    unknown = validate_config({**data, "corpus": {**corpus, "dataset": {"path": "someone/unknown"}}})
    row = estimate(unknown, hardware=A100X8)["distributions/llama2-7b"]
    assert row["tokens"] is None and row["flops"] is None
    assert row["note"].endswith("dataset someone/unknown: size unknown offline; declare corpus.expected_tokens")


def test_estimate_keys_are_plan_stages(paper_cfg, tmp_path, monkeypatch):
    from harness.pipeline import build_plan

    monkeypatch.setenv("FUSELAB_WORKDIR", str(tmp_path))
    cfg = load_config(QUICKSTART, check_paths=False)
    for c in (paper_cfg, cfg):
        assert set(estimate(c, hardware=A100X8)) - {"total"} <= set(build_plan(c).stages)


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
    est = estimate(cfg, hardware=Hardware("one GPU", 1e12, 0.5))
    n = model_params(cfg.target)
    assert est["distributions/" + cfg.target.label]["tokens"] == 900  # 4000 bytes / 4 per token x 0.9 train
    assert est["train/fusellm"]["flops"] == 6.0 * n * 900
    assert "train/clm" not in est
    assert "57 steps" in est["train/fusellm"]["note"]  # ceil(900 / (2 x 8))
    capped = validate_config({**cfg.model_dump(mode="json"),
                              "corpus": {**cfg.corpus.model_dump(mode="json"), "max_docs_per_domain": 1}})
    # one ~2,000-character document per domain: 2000 bytes / 4 x 0.9
    assert estimate(capped, hardware=SLOW_CPU)["fused"]["tokens"] == 450


def test_local_datasets_files_are_measured(tiny_llama_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "y" * 3988}) + "\n")  # 4,000 bytes
    cfg = validate_config({
        "name": "local", "target": {"ref": str(tiny_llama_dir)}, "sources": [{"ref": str(tiny_llama_dir)}],
        "corpus": {"kind": "datasets", "dataset": {"path": "json", "data_files": str(rows)}},
    })
    # 4000 bytes x 0.9 (JSON keys and quoting) / 4 bytes per token = 900, x 0.9 train split = 810
    assert estimate(cfg, hardware=SLOW_CPU)["fused"]["tokens"] == 810


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "studies").glob("*.yaml")))
def test_fuselab_plan_works_offline_for_every_shipped_config(config, tmp_path, monkeypatch, capsys):
    """Experiment configs and study specs (planned as one trial of their base) alike, data or not."""
    monkeypatch.setenv("FUSELAB_WORKDIR", str(tmp_path))
    assert main(["plan", str(REPO / "studies" / config), "--hardware", "h100x4"]) == 0
    out = capsys.readouterr().out
    estimates = out[out.index("\nestimates:"):]
    assert "train/fusellm" in estimates and "on 4 x NVIDIA H100 SXM" in estimates and "nan" not in estimates.lower()
    if "search_space" in yaml.safe_load((REPO / "studies" / config).read_text()):  # a study spec
        assert out.startswith(f"study {config.removesuffix('.yaml')}: ")
    else:
        assert out.startswith("experiment ")
