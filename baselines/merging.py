"""Weight merging baselines through mergekit's Python API (mergekit 0.1.5).

Merging only makes sense for structurally identical models (the paper's Table 7 domain experts):
`check_mergeable` refuses any other pool before mergekit reads a single tensor, naming the models
and what differs, so a heterogeneous pool is sent to the ensemble or FuseLLM instead of failing
half-way through a merge.

Methods are data: `MERGE_METHODS` maps a FuseLab name (the mergekit name) to a `MergeMethodSpec`
that says whether a base model is needed, how many models the method takes, which parameters are
given per model, and the defaults FuseLab uses where mergekit's default would make the method a
no-op (e.g. `density=1.0` turns TIES/DARE into plain task arithmetic).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.registry import Registry

PER_MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")


@dataclass(frozen=True)
class MergeMethodSpec:
    """How FuseLab drives one mergekit merge method.

    needs_base: the method works on task vectors (model - base) or interpolates from the base.
    n_models: exact number of non-base models, or None for any number >= 1.
    per_model_defaults / global_defaults: FuseLab's defaults (override mergekit's where noted).
    randomized: the method samples (DARE); the merge seed makes it reproducible.
    """

    name: str
    needs_base: bool
    n_models: int | None = None
    per_model_defaults: dict[str, Any] = field(default_factory=dict)
    global_defaults: dict[str, Any] = field(default_factory=dict)
    randomized: bool = False
    reference_url: str = ""


MERGE_METHODS: Registry = Registry("merge method")


def _register(spec: MergeMethodSpec) -> None:
    MERGE_METHODS.register(spec.name, reference_url=spec.reference_url)(spec)


# weight=1.0 with linear's normalize=True is the uniform average, the usual "model soup".
_register(MergeMethodSpec("linear", needs_base=False, per_model_defaults={"weight": 1.0},
                          reference_url="https://arxiv.org/abs/2203.05482"))
_register(MergeMethodSpec("task_arithmetic", needs_base=True, per_model_defaults={"weight": 1.0},
                          reference_url="https://arxiv.org/abs/2212.04089"))
# density 0.5: mergekit defaults density to 1.0, which keeps every delta (no trimming at all).
_register(MergeMethodSpec("ties", needs_base=True, per_model_defaults={"weight": 1.0, "density": 0.5},
                          reference_url="https://arxiv.org/abs/2306.01708"))
_register(MergeMethodSpec("dare_ties", needs_base=True, per_model_defaults={"weight": 1.0, "density": 0.5},
                          randomized=True, reference_url="https://arxiv.org/abs/2311.03099"))
_register(MergeMethodSpec("dare_linear", needs_base=True, per_model_defaults={"weight": 1.0, "density": 0.5},
                          randomized=True, reference_url="https://arxiv.org/abs/2311.03099"))
_register(MergeMethodSpec("slerp", needs_base=True, n_models=1, global_defaults={"t": 0.5},
                          reference_url="https://en.wikipedia.org/wiki/Slerp"))
_register(MergeMethodSpec("sce", needs_base=True, global_defaults={"select_topk": 1.0},
                          reference_url="https://arxiv.org/abs/2408.07990"))


class UnmergeableModelsError(ValueError):
    """The pool is not structurally identical; the message names the models and the difference."""


# ----------------------------------------------------------------------------------------------
# Fail-fast structural check (reads config.json, safetensors headers and tokenizer.json only)


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers, without reading any weights."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UnmergeableModelsError(
            f"model {model_dir} has no model.safetensors (or sharded index); mergekit and this check "
            f"need safetensors: re-save it with save_pretrained(..., safe_serialization=True)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _vocabulary(model_dir: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id map (added tokens included), or None without a tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    vocab = dict(data.get("model", {}).get("vocab", {}) or {})
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def check_mergeable(model_paths: list[Path]) -> None:
    """Raise `UnmergeableModelsError` unless every model has the same architecture, tensor names
    and shapes, and vocabulary as the first one.

    model_paths: local HF folders (config.json + safetensors). Reads headers only (milliseconds),
    so a heterogeneous pool fails before any merge work. The message names both models and the
    first difference, and points to the ensemble / FuseLLM baselines, which handle such pools.
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise UnmergeableModelsError("check_mergeable: model_paths is empty; give at least one model folder")
    for p in paths:
        if not (p / "config.json").is_file():
            raise UnmergeableModelsError(f"model {p} is not a HF model folder (no config.json); "
                                         f"pass the folder written by save_pretrained")
    hint = ("weight merging needs structurally identical models (same architecture, shapes and "
            "tokenizer); compare such pools with the output ensemble or FuseLLM instead")
    ref = paths[0]
    ref_cfg = _read_json(ref / "config.json")
    ref_arch = (ref_cfg.get("model_type"), tuple(ref_cfg.get("architectures") or ()))
    ref_shapes = _tensor_shapes(ref)
    ref_vocab = _vocabulary(ref)
    for other in paths[1:]:
        cfg = _read_json(other / "config.json")
        arch = (cfg.get("model_type"), tuple(cfg.get("architectures") or ()))
        if arch != ref_arch:
            raise UnmergeableModelsError(
                f"cannot merge {ref} and {other}: architectures differ ({ref_arch[0]} {list(ref_arch[1])} vs "
                f"{arch[0]} {list(arch[1])}); {hint}")
        shapes = _tensor_shapes(other)
        if set(shapes) != set(ref_shapes):
            only_ref = sorted(set(ref_shapes) - set(shapes))[:3]
            only_other = sorted(set(shapes) - set(ref_shapes))[:3]
            raise UnmergeableModelsError(
                f"cannot merge {ref} and {other}: tensor names differ (only in the first: {only_ref}, only in "
                f"the second: {only_other}); {hint}")
        for key, shape in ref_shapes.items():
            if shapes[key] != shape:
                raise UnmergeableModelsError(
                    f"cannot merge {ref} and {other}: tensor {key} has shape {list(shape)} vs "
                    f"{list(shapes[key])}; {hint}")
        vocab = _vocabulary(other)
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            differing = sorted(set(ref_vocab.items()) ^ set(vocab.items()))[:3]
            raise UnmergeableModelsError(
                f"cannot merge {ref} and {other}: tokenizer vocabularies differ (same sizes do not mean same "
                f"token ids; e.g. {differing}); {hint}")


# ----------------------------------------------------------------------------------------------
# Merge


def _per_model_values(method: str, key: str, value: Any, n: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"merge method {method!r}: params[{key!r}] has {len(value)} values for {n} models; "
                             f"give one value per model (in model_paths order) or a single scalar")
        return list(value)
    return [value] * n


def check_merge_request(method: str, params: dict, n_models: int | None = None) -> MergeMethodSpec:
    """Validate a merge before any model exists: `method` is registered, every name in `params` is one of
    mergekit's parameters for it, and, when `n_models` (models merged besides the base) is known, the method
    takes that many. Raises ValueError naming the method and what would fix it; returns the method's spec."""
    from mergekit.merge_methods import get as get_mergekit_method

    spec: MergeMethodSpec = MERGE_METHODS.get(method)
    allowed = {p.name for p in get_mergekit_method(method).spec.parameters}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"merge method {method!r} has no parameter(s) {sorted(unknown)}; "
                         f"its parameters: {sorted(allowed)}")
    if spec.n_models is not None and n_models is not None and n_models != spec.n_models:
        raise ValueError(f"merge method {method!r} merges exactly {spec.n_models} model(s) into the base; "
                         f"the pool has {n_models}")
    return spec


def build_merge_config(model_paths: list[Path], method: str, *, base_model: Path | None, params: dict,
                       dtype: str = "float32") -> dict:
    """The mergekit configuration dict (`MergeConfiguration.model_validate` input) for a merge.

    Per-model parameters (weight, density, gamma, epsilon) take a scalar for every model or a list
    with one value per entry of `model_paths`; the others are method-wide. Unknown names raise,
    listing the method's parameters (from mergekit's own method spec).
    """
    spec = check_merge_request(method, params)
    paths = [Path(p) for p in model_paths]
    base = Path(base_model) if base_model is not None else None
    if spec.needs_base and base is None:
        raise ValueError(f"merge method {method!r} works on differences from a base model: pass base_model=")
    if not spec.needs_base and base is not None:
        raise ValueError(f"merge method {method!r} takes no base model; drop base_model= or use task_arithmetic")
    # The base is an input of its own in mergekit; listing it among the models too is a no-op we allow.
    merged = [p for p in paths if base is None or p.resolve() != base.resolve()]
    if not merged:
        raise ValueError(f"merge method {method!r}: no models to merge besides the base {base}")
    if spec.n_models is not None and len(merged) != spec.n_models:
        raise ValueError(f"merge method {method!r} merges exactly {spec.n_models} model(s) into the base; "
                         f"got {len(merged)}: {[str(p) for p in merged]}")
    values = {**spec.per_model_defaults, **spec.global_defaults, **params}
    per_model = {k: _per_model_values(method, k, v, len(merged)) for k, v in values.items() if k in PER_MODEL_PARAMS}
    shared = {k: v for k, v in values.items() if k not in PER_MODEL_PARAMS}

    models = []
    for i, p in enumerate(merged):
        entry: dict[str, Any] = {"model": str(p)}
        if per_model:
            entry["parameters"] = {k: v[i] for k, v in per_model.items()}
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": method, "models": models, "dtype": dtype, "out_dtype": dtype}
    if base is not None:
        cfg["base_model"] = str(base)
    if shared:
        cfg["parameters"] = shared
    return cfg


def merge_models(model_paths: list[Path], method: str, out_path: Path, *, base_model: Path | None = None,
                 params: dict | None = None, dtype: str = "float32", seed: int = 0, device: str = "cpu") -> Path:
    """Merge structurally identical HF models with mergekit's `method`; returns `out_path`.

    model_paths: the models to merge (local HF folders; the base may be listed or not).
    base_model: required by the task-vector methods (task_arithmetic, ties, dare_*, sce) and slerp.
    params: mergekit parameters, e.g. {"weight": [0.7, 0.3]} or {"t": 0.3}; see `build_merge_config`.
    dtype: arithmetic and output dtype. seed: random seed for DARE's sampling.
    device: where mergekit does the tensor arithmetic ("cpu", "cuda", "cuda:N"; mergekit's --cuda / --device).
    The result (safetensors + config + tokenizer) is written to a temporary sibling folder and
    renamed to `out_path` only when complete; an existing `out_path` is an error.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out_path = Path(out_path)
    if out_path.exists():
        raise FileExistsError(f"merge output {out_path} already exists; remove it or choose another out_path")
    cfg = build_merge_config(model_paths, method, base_model=base_model, params=params or {}, dtype=dtype)
    check_mergeable([Path(p) for p in model_paths] + ([Path(base_model)] if base_model is not None else []))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp),
                  MergeOptions(random_seed=seed, quiet=True, copy_tokenizer=True, safe_serialization=True,
                               write_model_card=False, device=device, cuda=device.startswith("cuda")))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path
