"""Weight merging through mergekit on tiny Llamas: each method's output loads and equals what the
method's definition gives on the input tensors."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baselines.merging import (
    MERGE_METHODS,
    UnmergeableModelsError,
    build_merge_config,
    check_mergeable,
    contestant_refs,
    load_mergekit_config,
    merge_models,
    run_merge_config,
)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def loads_and_runs(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def A(llama_pool):
    return weights(llama_pool["a"])


@pytest.fixture(scope="module")
def B(llama_pool):
    return weights(llama_pool["b"])


def test_registry_names_exist_in_mergekit():
    from mergekit.merge_methods import get

    assert MERGE_METHODS.names() == sorted(
        ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "sce"])
    for name in MERGE_METHODS.names():
        assert get(name).spec.name == name


def test_linear_of_identical_models_is_that_model(llama_pool, A, tmp_path):
    out = merge_models([llama_pool["a"], llama_pool["a_copy"]], "linear", tmp_path / "m")
    merged = weights(out)
    assert set(merged) == set(A)
    for k in A:
        assert torch.equal(merged[k], A[k]), k
    loads_and_runs(out)
    # the tokenizer travels with the merge, so the folder is a complete model
    assert (out / "tokenizer.json").is_file()


def test_linear_half_half_is_the_mean(llama_pool, A, B, tmp_path):
    out = merge_models([llama_pool["a"], llama_pool["b"]], "linear", tmp_path / "m", params={"weight": [0.5, 0.5]})
    merged = weights(out)
    # halving is exact in binary floating point, so 0.5a + 0.5b rounds to exactly (a + b) / 2
    for k in A:
        assert torch.equal(merged[k], (A[k] + B[k]) / 2), k
    loads_and_runs(out)


def test_linear_unnormalised_weights(llama_pool, A, B, tmp_path):
    out = merge_models([llama_pool["a"], llama_pool["b"]], "linear", tmp_path / "m",
                       params={"weight": [0.75, 0.25]})
    merged = weights(out)
    for k in A:
        torch.testing.assert_close(merged[k], 0.75 * A[k] + 0.25 * B[k], rtol=0, atol=1e-7)
    assert not torch.equal(merged["model.embed_tokens.weight"], A["model.embed_tokens.weight"])


def test_task_arithmetic_single_model_weight_one_recovers_it(llama_pool, A, B, tmp_path):
    out = merge_models([llama_pool["a"]], "task_arithmetic", tmp_path / "m", base_model=llama_pool["b"])
    merged = weights(out)
    for k in A:
        # b + (a - b) is a up to one float32 rounding of the difference
        torch.testing.assert_close(merged[k], A[k], rtol=0, atol=1e-6)
        assert not torch.equal(merged[k], B[k]) or torch.equal(A[k], B[k])
    loads_and_runs(out)


def test_task_arithmetic_two_task_vectors(llama_pool, A, B, tmp_path):
    C = weights(llama_pool["c"])
    out = merge_models([llama_pool["a"], llama_pool["c"]], "task_arithmetic", tmp_path / "m",
                       base_model=llama_pool["b"], params={"weight": [0.5, 0.25]})
    merged = weights(out)
    for k in A:
        expected = B[k] + 0.5 * (A[k] - B[k]) + 0.25 * (C[k] - B[k])
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=2e-7)


def test_ties_keeps_the_largest_half_of_the_task_vector(llama_pool, A, B, tmp_path):
    out = merge_models([llama_pool["a"]], "ties", tmp_path / "m", base_model=llama_pool["b"])  # density 0.5
    merged = weights(out)
    checked = 0
    for k in A:
        delta = (A[k] - B[k]).flatten()
        if delta.numel() < 8 or torch.all(delta == 0):
            continue  # norm weights are all ones in both models: nothing to trim
        kept = (merged[k] - B[k]).flatten() != 0
        assert kept.sum().item() == int(0.5 * delta.numel()), k
        assert delta.abs()[kept].min() >= delta.abs()[~kept].max(), k
        torch.testing.assert_close(merged[k].flatten()[kept], A[k].flatten()[kept], rtol=0, atol=1e-6)
        assert torch.equal(merged[k].flatten()[~kept], B[k].flatten()[~kept])
        checked += 1
    assert checked >= 10
    loads_and_runs(out)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_drops_at_random_and_rescales_to_the_l1_norm(method, llama_pool, A, B, tmp_path):
    out = merge_models([llama_pool["a"]], method, tmp_path / "m", base_model=llama_pool["b"], seed=7)
    merged = weights(out)
    k = "model.layers.0.mlp.down_proj.weight"   # 32 x 64 = 2048 entries
    delta = A[k] - B[k]
    got = merged[k] - B[k]
    kept = got != 0
    frac = kept.float().mean().item()
    assert 0.4 < frac < 0.6, frac  # Bernoulli(0.5) over 2048 entries: 4.5 sigma either side
    scale = (delta.abs().sum() / delta[kept].abs().sum()).item()
    torch.testing.assert_close(got[kept], scale * delta[kept], rtol=1e-5, atol=1e-6)
    # same seed, same merge; another seed, another mask
    again = weights(merge_models([llama_pool["a"]], method, tmp_path / "m2", base_model=llama_pool["b"], seed=7))
    assert torch.equal(again[k], merged[k])
    other = weights(merge_models([llama_pool["a"]], method, tmp_path / "m3", base_model=llama_pool["b"], seed=8))
    assert not torch.equal(other[k], merged[k])
    loads_and_runs(out)


def _slerp(t, v0, v1):
    """Spherical interpolation of two whole tensors (flattened), in float64."""
    a, b = v0.double().flatten(), v1.double().flatten()
    theta = torch.acos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(v0.shape).float()


def test_slerp_endpoints_and_midpoint(llama_pool, A, B, tmp_path):
    at0 = weights(merge_models([llama_pool["a"]], "slerp", tmp_path / "t0", base_model=llama_pool["b"],
                               params={"t": 0.0}))
    for k in B:
        assert torch.equal(at0[k], B[k]), k
    mid_path = merge_models([llama_pool["a"], llama_pool["b"]], "slerp", tmp_path / "t5",
                            base_model=llama_pool["b"], params={"t": 0.5})
    mid = weights(mid_path)
    for k in A:
        if torch.equal(A[k], B[k]):
            assert torch.equal(mid[k], A[k]), k  # collinear (norm weights): slerp falls back to lerp
            continue
        torch.testing.assert_close(mid[k], _slerp(0.5, B[k], A[k]), rtol=0, atol=1e-7)
        # on the arc, not the chord: the midpoint keeps more norm than linear interpolation
        assert mid[k].norm() > ((A[k] + B[k]) / 2).norm(), k
    loads_and_runs(mid_path)


def test_sce_single_model_recovers_it_and_two_models_match_the_formula(llama_pool, A, B, tmp_path):
    one = weights(merge_models([llama_pool["a"]], "sce", tmp_path / "one", base_model=llama_pool["b"]))
    for k in A:
        torch.testing.assert_close(one[k], A[k], rtol=0, atol=1e-6)
    C = weights(llama_pool["c"])
    two_path = merge_models([llama_pool["a"], llama_pool["c"]], "sce", tmp_path / "two",
                            base_model=llama_pool["b"])
    two = weights(two_path)
    k = "model.layers.0.self_attn.o_proj.weight"
    tv = torch.stack([A[k] - B[k], C[k] - B[k]]).double()
    w = tv.square().mean(dim=(1, 2))
    w = (w / w.sum())[:, None, None]
    majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (tv.sign() == majority).double()
    expected = B[k].double() + (tv * w * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-6)
    torch.testing.assert_close(two[k], expected.float(), rtol=1e-5, atol=1e-6)
    loads_and_runs(two_path)


def test_unmergeable_architectures_fail_fast_naming_both(llama_pool, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "never"
    start = time.perf_counter()
    with pytest.raises(UnmergeableModelsError) as err:
        merge_models([llama_pool["a"], tiny_gpt2_dir], "linear", out)
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert str(llama_pool["a"]) in msg and str(tiny_gpt2_dir) in msg and "architectures differ" in msg
    assert not out.exists() and not list(tmp_path.glob(".never.tmp-*"))


def test_unmergeable_shapes_and_vocabularies(llama_pool, wide_llama_dir, other_vocab_llama_dir):
    wide = r"tensor lm_head\.weight has shape \[\d+, 32\] vs \[\d+, 64\]"
    with pytest.raises(UnmergeableModelsError, match=wide) as err:
        check_mergeable([llama_pool["a"], wide_llama_dir])
    assert str(wide_llama_dir) in str(err.value)
    with pytest.raises(UnmergeableModelsError, match="tokenizer vocabularies differ") as err:
        check_mergeable([llama_pool["a"], llama_pool["b"], other_vocab_llama_dir])
    assert str(other_vocab_llama_dir) in str(err.value)
    check_mergeable([llama_pool["a"], llama_pool["b"], llama_pool["c"]])  # a real pool passes


def test_bad_requests_name_the_problem(llama_pool, tmp_path):
    with pytest.raises(KeyError, match="unknown merge method 'frankenmerge'.*linear"):
        merge_models([llama_pool["a"]], "frankenmerge", tmp_path / "x")
    with pytest.raises(ValueError, match="base_model"):
        merge_models([llama_pool["a"]], "ties", tmp_path / "x")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['temperature'\].*weight"):
        build_merge_config([llama_pool["a"], llama_pool["b"]], "linear", base_model=None, params={"temperature": 1})
    with pytest.raises(ValueError, match="3 values for 2 models"):
        build_merge_config([llama_pool["a"], llama_pool["b"]], "linear", base_model=None,
                           params={"weight": [1, 2, 3]})
    with pytest.raises(ValueError, match="exactly 1 model"):
        build_merge_config([llama_pool["a"], llama_pool["c"]], "slerp", base_model=llama_pool["b"], params={})
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        merge_models([llama_pool["a"]], "linear", tmp_path / "exists")


def test_config_is_plain_data(llama_pool):
    cfg = build_merge_config([llama_pool["a"], llama_pool["c"]], "ties", base_model=llama_pool["b"],
                             params={"weight": [0.6, 0.4]})
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == str(llama_pool["b"])
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 0.6, "density": 0.5},
                                                       {"weight": 0.4, "density": 0.5}]
    assert np.isclose(sum(m["parameters"]["weight"] for m in cfg["models"]), 1.0)


# ----------------------------------------------------------------------------------------------
# mergekit configs as mergekit-yaml takes them


def all_weights(path):
    """Every tensor of a merged folder (one file or shards), by name."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ties_yaml(a, c, base) -> str:
    """TIES with explicit per-model weights and densities over two models and a base, as a user writes it."""
    return (f"merge_method: ties\n"
            f"base_model: {base}\n"
            f"models:\n"
            f"  - model: {a}\n"
            f"    parameters: {{weight: 0.7, density: 0.5}}\n"
            f"  - model: {c}\n"
            f"    parameters: {{weight: 0.3, density: 0.8}}\n"
            f"parameters: {{normalize: false}}\n"
            f"dtype: float32\n")


@pytest.fixture(scope="module")
def cli_ties(llama_pool, tmp_path_factory):
    """mergekit's own `mergekit-yaml` CLI run on the TIES file: (file, output folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("cli-ties")
    config = root / "ties.yaml"
    config.write_text(ties_yaml(llama_pool["a"], llama_pool["c"], llama_pool["b"]))
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(config), str(root / "out")], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return config, root / "out"


def test_mergekit_yaml_gives_the_cli_tensors_exactly(cli_ties, tmp_path):
    config, cli_out = cli_ties
    out = run_merge_config(load_mergekit_config(config), tmp_path / "m", resolve=_no_contestants)
    ours, theirs = all_weights(out), all_weights(cli_out)
    assert set(ours) == set(theirs) and len(ours) > 10
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert diff == 0.0
    loads_and_runs(out)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".m.tmp-*"))


def _no_contestants(ref):
    raise AssertionError(f"no contestant expected, asked for {ref}")


def test_contestant_references_resolve_to_the_contestants_folders(cli_ties, llama_pool, tmp_path):
    config = ties_yaml("contestant:expert:code", "contestant:source:c", "contestant:target")
    data = yaml.safe_load(config)
    assert contestant_refs(data) == ["target", "expert:code", "source:c"]
    folders = {"expert:code": llama_pool["a"], "source:c": llama_pool["c"], "target": llama_pool["b"]}
    asked = []
    out = run_merge_config(data, tmp_path / "m", resolve=lambda ref: asked.append(ref) or str(folders[ref]))
    assert sorted(asked) == sorted(folders)
    theirs = all_weights(cli_ties[1])
    for k, v in all_weights(out).items():
        assert torch.equal(v, theirs[k]), k
    assert data["base_model"] == "contestant:target"  # the caller's config is left as it was
    with pytest.raises(FileNotFoundError, match=r"contestant:target resolved to /nowhere"):
        run_merge_config(data, tmp_path / "m2", resolve=lambda ref: "/nowhere")


def test_slices_per_model_weights_dtype_and_tokenizer_source(llama_pool, A, B, tmp_path):
    # one slice over both layers of a and b, weighted half-half (exact in binary floating point)
    data = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "contestant:source:a",
            "slices": [{"sources": [
                {"model": str(llama_pool["a"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                {"model": str(llama_pool["b"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}]}
    out = run_merge_config(data, tmp_path / "m", resolve=lambda ref: str(llama_pool[ref.split(":")[1]]))
    merged = all_weights(out)
    assert set(merged) == set(A)
    for k in A:
        assert torch.equal(merged[k], (A[k] + B[k]) / 2), k
    loads_and_runs(out)


def _experiment(merges, **baselines) -> dict:
    return {"name": "t", "world": {"kind": "micro"}, "target": {"ref": "micro:a"},
            "sources": [{"ref": "micro:a"}, {"ref": "micro:b"}],
            "baselines": {"domain_pool": {"enabled": True}, "merges": merges, **baselines}}


def test_mergekit_configs_are_checked_at_load():
    from harness.config import ConfigError, validate_config

    three = {"merge_method": "slerp", "base_model": "contestant:target", "parameters": {"t": 0.5},
             "models": [{"model": "contestant:expert:code"}, {"model": "contestant:expert:docs"},
                        {"model": "contestant:target"}]}
    cases = [
        ({**three}, r"baselines\.merges\.0: config: merge_method 'slerp': Merge method requires exactly 2 inputs "
                    r"for models; got 3"),
        ({**three, "merge_method": "linearr"},
         r"baselines\.merges\.0: config: merge_method 'linearr' is not a mergekit merge method \(did you mean "
         r"'linear'\?\)"),
        ({**three, "merge_method": "ties", "parameters": {},
          "models": [{"model": "a", "parameters": {"desnity": 0.5}}]},
         r"config: models\.0\.parameters: merge method 'ties' has no parameter\(s\) \['desnity'\]"),
        ({**three, "base_modle": "x"}, r"config: unknown mergekit config key\(s\) \['base_modle'\]"),
        ({**three, "models": [{"model": "contestant:sources:a"}, {"model": "contestant:target"}]},
         r"config: contestant:sources:a names no contestant"),
        ({**three, "models": [{"model": "contestant:expert:poetry"}, {"model": "contestant:target"}]},
         r"baselines\.merges\.0: contestant:expert:poetry: no domain 'poetry'; the corpus domains are"),
        ({**three, "models": [{"model": "contestant:source:z"}, {"model": "contestant:target"}]},
         r"baselines\.merges\.0: contestant:source:z: no source 'z'; sources are \['a', 'b'\]"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_config(_experiment([{"config": config}]))
    two = {**three, "models": [{"model": "contestant:expert:code"}, {"model": "contestant:target"}]}
    cfg = validate_config(_experiment([{"config": two}, {"method": "ties"}]))
    assert [m.label for m in cfg.baselines.merges] == ["slerp", "ties"]
    assert cfg.baselines.merges[0].contestant_refs() == ["target", "expert:code"]
    assert cfg.baselines.merges[1].contestant_refs() == ["domain_pool", "target"]
    with pytest.raises(ConfigError, match=r"two merges are both named slerp .* set baselines\.merges\.N\.name"):
        validate_config(_experiment([{"config": two}, {"config": two}]))
    with pytest.raises(ConfigError, match=r"baselines\.merges: merging needs structurally identical models"):
        validate_config({**_experiment([{"config": two}]), "baselines": {"merges": [{"config": two}]}})
    with pytest.raises(ConfigError, match=r"baselines\.merges\.0: give either method .* or config"):
        validate_config(_experiment([{"method": "ties", "config": two}]))


def test_mergekit_yaml_file_entry(tmp_path, monkeypatch):
    from harness.config import ConfigError, validate_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "merges").mkdir()
    (tmp_path / "merges" / "code_plus_source.yaml").write_text(
        ties_yaml("contestant:expert:code", "contestant:source:b", "contestant:target"))
    cfg = validate_config(_experiment([{"config": "merges/code_plus_source.yaml"}], clm=False))
    merge = cfg.baselines.merges[0]
    assert merge.label == "code_plus_source"
    assert merge.contestant_refs() == ["target", "expert:code", "source:b"]
    assert merge.mergekit_config()["models"][1] == {"model": "contestant:source:b",
                                                    "parameters": {"weight": 0.3, "density": 0.8}}
    assert merge.model_dump(mode="json") == {"config": "merges/code_plus_source.yaml"}
    assert validate_config(_experiment([{"method": "ties"}])).baselines.merges[0].model_dump() == {
        "method": "ties", "params": {}}  # the method form dumps (and hashes) as before
    with pytest.raises(ConfigError, match=r"config \(merges/nope\.yaml\): mergekit config file merges/nope\.yaml "
                                          r"not found"):
        validate_config(_experiment([{"config": "merges/nope.yaml"}]))
    (tmp_path / "merges" / "clm.yaml").write_text(
        ties_yaml("contestant:clm", "contestant:fusellm", "contestant:target"))
    with pytest.raises(ConfigError, match=r"contestant:clm: CLM-only is off \(baselines\.clm: false\)"):
        validate_config(_experiment([{"config": "merges/clm.yaml"}], clm=False))


def test_missing_local_model_of_a_mergekit_config_fails_at_load(tmp_path, llama_pool):
    from harness.config import ConfigError, load_config

    config = yaml.safe_load(ties_yaml("contestant:expert:code", "./no/such/model", llama_pool["b"]))
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_experiment([{"config": config}])))
    with pytest.raises(ConfigError, match=r"^exp\.yaml: baselines\.merges\.0\.config: model path \./no/such/model "
                                          r"does not exist$"):
        load_config(exp)
    assert load_config(exp, check_paths=False).baselines.merges[0].label == "ties"  # plan needs no files
    config["models"][1]["model"] = str(llama_pool["c"])
    exp.write_text(yaml.safe_dump(_experiment([{"config": config}])))
    assert load_config(exp).baselines.merges[0].contestant_refs() == ["expert:code"]
