"""Study specs: shipped specs load, grids are the exact cross products, bad specs name file and field."""
from __future__ import annotations

import pytest
from conftest import QUICKSTART, REPO

from harness.config import ConfigError
from studies.spec import encode_choice, keep_sources, load_spec


@pytest.mark.parametrize("name, size, first", [
    ("micro_alignment_x_fusion", 12, {"fusion.vocab_map": "em", "fusion.fusion": "mince", "seed": 0}),
    ("micro_num_sources", 9, {"sources": "llama-docs", "seed": 0}),
    ("micro_lambda", 18, {"fusion.lam": 0.5, "seed": 0}),
])
def test_shipped_specs_load_with_relative_base(name, size, first):
    spec = load_spec(REPO / "studies" / f"{name}.yaml")
    assert spec.study_name == name
    assert spec.base_path == QUICKSTART.resolve()
    grid = spec.grid()
    assert len(grid) == size and grid[0] == first
    assert len({tuple(sorted(p.items())) for p in grid}) == size  # no duplicate point


def test_alignment_x_fusion_grid_is_the_2x2x3_cross_product():
    spec = load_spec(REPO / "studies" / "micro_alignment_x_fusion.yaml")
    got = [(p["fusion.vocab_map"], p["fusion.fusion"], p["seed"]) for p in spec.grid()]
    assert got == [(v, f, s) for v in ("em", "mined") for f in ("mince", "avgce") for s in (0, 1, 2)]
    cfg = spec.config_for({"fusion.vocab_map": "em", "fusion.fusion": "avgce"}, seed=2)
    assert (cfg.fusion.vocab_map, cfg.fusion.fusion, cfg.seed) == ("em", "avgce", 2)
    assert cfg.baselines.ensemble.enabled is False and cfg.baselines.merges == []


def test_lambda_steps_are_exact_decimals():
    spec = load_spec(REPO / "studies" / "micro_lambda.yaml")
    assert spec.encoded_values("fusion.lam") == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert spec.config_for({"fusion.lam": 0.7}, seed=0).fusion.lam == 0.7


def test_sources_choice_keeps_only_those_sources():
    spec = load_spec(REPO / "studies" / "micro_num_sources.yaml")
    assert spec.encoded_values("sources") == ["llama-docs", "llama-docs+neox-code",
                                               "llama-docs+neox-code+mpt-arithmetic"]
    cfg = spec.config_for({"sources": "llama-docs+neox-code", "seed": 1})
    assert [s.label for s in cfg.sources] == ["llama-docs", "neox-code"] and cfg.seed == 1
    assert spec.decode("sources", "llama-docs+neox-code") == ["llama-docs", "neox-code"]


def test_keep_sources_trims_ensemble_members():
    data = {"sources": [{"ref": "micro:a"}, {"ref": "micro:b", "name": "bee"}],
            "baselines": {"ensemble": {"members": ["a", "bee"]}}}
    out = keep_sources(data, ["bee"])
    assert out["sources"] == [{"ref": "micro:b", "name": "bee"}]
    assert out["baselines"]["ensemble"]["members"] == ["bee"]
    with pytest.raises(ConfigError, match="unknown source 'c'; the base experiment has \\['a', 'bee'\\]"):
        keep_sources(data, ["c"])


def test_encode_choice():
    assert encode_choice("em") == "em" and encode_choice(0.5) == 0.5 and encode_choice(None) is None
    assert encode_choice(["a", "b"]) == "a+b"
    assert encode_choice({"method": "ties"}) == '{"method": "ties"}'


def test_overrides_reach_spec_fields_and_experiment(write_spec, tmp_path):
    path = write_spec("ov", seeds=[0, 1])
    spec = load_spec(path, ["study.seeds=[5]", f"workdir={tmp_path / 'wd'}", "training.max_steps=3"])
    assert spec.seeds == [5]
    assert spec.storage_url() == f"sqlite:///{(tmp_path / 'wd').resolve()}/optuna.db"
    assert spec.config_for({"fusion.fusion": "avgce"}, seed=5).training.max_steps == 3


@pytest.mark.parametrize("fields, message", [
    ({"search_spac": {}}, "e.yaml: search_spac: unknown key"),
    ({"search_space": {"fusion.lam": {"type": "float", "low": 0.1, "high": 0.9}}},
     "e.yaml: search_space.fusion.lam: a grid needs discrete values: give `step`"),
    ({"sampler": "tpe"}, "e.yaml: n_trials: sampler 'tpe' needs n_trials"),
    ({"search_space": {"fusion.lam": {"type": "float", "low": 0.9, "high": 0.1, "step": 0.1}}},
     "e.yaml: search_space.fusion.lam.float: low \\(0.9\\) must be <= high \\(0.1\\)"),
    ({"search_space": {"fusion.fusion": {"type": "categorical", "choices": ["mince", "nope"]}}},
     "e.yaml: search_space \\(setting fusion.fusion=nope\\): fusion.fusion: unknown fusion function 'nope'"),
    ({"search_space": {"fusion.fusionn": {"type": "categorical", "choices": ["mince"]}}},
     "e.yaml: search_space \\(setting fusion.fusionn=mince\\): fusion.fusionn: unknown key"),
    ({"search_space": {"sources": {"type": "categorical", "choices": [["llama-docs", "mpt-x"]]}}},
     "e.yaml: search_space.sources: unknown source 'mpt-x'"),
    ({"base": "missing.yaml"}, "e.yaml: base: experiment file .*missing.yaml not found"),
    ({"seeds": [1, 1]}, "e.yaml: seeds: repeated values in \\[1, 1\\]"),
])
def test_bad_specs_name_the_file_and_field(write_spec, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec("e", **fields))
