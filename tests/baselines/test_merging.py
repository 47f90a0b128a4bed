"""Weight merging through mergekit on tiny Llamas: each method's output loads and equals what the
method's definition gives on the input tensors."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baselines.merging import (
    MERGE_METHODS,
    UnmergeableModelsError,
    build_merge_config,
    check_mergeable,
    merge_models,
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
