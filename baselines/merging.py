"""Weight merging baselines through mergekit's Python API (mergekit 0.1.5).

Merging only makes sense for structurally identical models (the paper's Table 7 domain experts):
`check_mergeable` refuses any other pool before mergekit reads a single tensor, naming the models
and what differs, so a heterogeneous pool is sent to the ensemble or FuseLLM instead of failing
half-way through a merge.

Methods are data: `MERGE_METHODS` maps a FuseLab name (the mergekit name) to a `MergeMethodSpec`
that says whether a base model is needed, how many models the method takes, which parameters are
given per model, and the defaults FuseLab uses where mergekit's default would make the method a
no-op (e.g. `density=1.0` turns TIES/DARE into plain task arithmetic).

A merge may also be a mergekit configuration as `mergekit-yaml` takes it (a YAML file or the same mapping
inline), whose model references may name FuseLab contestants (`contestant:target`, `contestant:fusellm`,
`contestant:clm`, `contestant:source:<label>`, `contestant:expert:<domain>`) besides paths and hub ids:
`check_mergekit_config` validates it with mergekit's own config model and method contracts before any model
exists, `contestant_refs` lists what it needs, `run_merge_config` resolves the contestants and runs it.
Both forms run through `_run_mergekit`, one atomic write path.
"""
from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fusion.publish import publish_dir
from fusion.registry import Registry

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration

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


def build_merge_config(model_paths: list[Path | str], method: str, *, base_model: Path | str | None, params: dict,
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


def pool_merge_config(method: str, params: dict, expert_domains: list[str], dtype: str = "float32") -> dict:
    """The mergekit config of a `{method, params}` merge of the domain pool: one `contestant:expert:<domain>`
    per domain (sorted), `contestant:target` (the experts' common ancestor) as the base where the method
    needs one. Run it with `run_merge_config` like any other merge config."""
    base = f"{CONTESTANT_PREFIX}target" if MERGE_METHODS.get(method).needs_base else None
    models = [f"{CONTESTANT_PREFIX}expert:{d}" for d in sorted(expert_domains)]
    return build_merge_config(models, method, base_model=base, params=params, dtype=dtype)


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
    cfg = build_merge_config(model_paths, method, base_model=base_model, params=params or {}, dtype=dtype)
    check_mergeable([Path(p) for p in model_paths] + ([Path(base_model)] if base_model is not None else []))
    return _run_mergekit(cfg, Path(out_path), seed=seed, device=device)


def _run_mergekit(cfg: dict, out_path: Path, *, seed: int, device: str) -> Path:
    """Run mergekit on a config dict whose model references are local paths or hub ids; the result (and
    the config it ran, `mergekit_config.yml`) goes to a temporary sibling folder renamed to `out_path` when
    complete, so a killed merge never leaves a half-written `out_path`."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if out_path.exists():
        raise FileExistsError(f"merge output {out_path} already exists; remove it or choose another out_path")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with publish_dir(out_path) as tmp:
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp),
                  MergeOptions(random_seed=seed, quiet=True, copy_tokenizer=True, safe_serialization=True,
                               write_model_card=False, device=device, cuda=device.startswith("cuda")))
        (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return out_path


# ----------------------------------------------------------------------------------------------
# mergekit configs as mergekit-yaml takes them, with FuseLab contestants as models

CONTESTANT_PREFIX = "contestant:"
CONTESTANT_FORMS = ("target", "fusellm", "clm", "source:<label>", "expert:<domain>")


def load_mergekit_config(config: str | Path | dict) -> dict:
    """A merge entry's mergekit config as a dict: the YAML file at `config` (a relative path is read from
    the working directory) or a deep copy of an inline mapping. Raises ValueError naming the file."""
    import yaml

    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config).expanduser()
    if not path.is_file():
        raise ValueError(f"mergekit config file {config} not found (a relative path is read from the "
                         f"working directory, {Path.cwd()})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"mergekit config {config} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"mergekit config {config}: the top level must be a mapping (merge_method, models or "
                         f"slices, base_model, ...), got {type(data).__name__}")
    return data


def _map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a YAML-like tree with `fn` applied to every string value (mapping keys untouched)."""
    if isinstance(node, dict):
        return {k: _map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def contestant_refs(config: dict) -> list[str]:
    """The contestants a mergekit config names, without the `contestant:` prefix, in order of first mention:
    e.g. ["expert:code", "target"] for `models: [{model: contestant:expert:code}]`, `base_model:
    contestant:target`. Any string value of the config counts (models, base_model, slices' sources,
    tokenizer_source, tokenizer sources)."""
    found: list[str] = []

    def note(s: str) -> str:
        if s.startswith(CONTESTANT_PREFIX):
            found.append(s[len(CONTESTANT_PREFIX):])
        return s

    _map_strings(config, note)
    return list(dict.fromkeys(found))


def _check_contestant_ref(ref: str) -> None:
    kind, _, rest = ref.partition(":")
    if ref in ("target", "fusellm", "clm") or (kind in ("source", "expert") and rest):
        if "@" in ref or "+" in ref:
            raise ValueError(f"{CONTESTANT_PREFIX}{ref}: a contestant reference takes no @revision or +lora; "
                             f"the contestant's model is used as FuseLab built it")
        return
    raise ValueError(f"{CONTESTANT_PREFIX}{ref} names no contestant; use one of "
                     f"{', '.join(CONTESTANT_PREFIX + f for f in CONTESTANT_FORMS)}")


def external_model_paths(config: dict) -> list[str]:
    """The model paths (hub ids or local folders, LoRA adapters included) a mergekit config reads besides its
    `contestant:` references, sorted; for checking local ones exist before any work."""
    from mergekit.common import ModelReference

    merge = check_mergekit_config(config)
    refs = list(merge.referenced_models())
    if isinstance(merge.tokenizer_source, ModelReference):
        refs.append(merge.tokenizer_source)
    paths = {p.path for ref in refs for p in (ref.model, ref.lora) if p is not None}
    return sorted(p for p in paths if not p.startswith(CONTESTANT_PREFIX))


def resolve_contestants(config: dict, resolve: Callable[[str], str]) -> dict:
    """A copy of `config` with every `contestant:<ref>` replaced by `resolve(ref)` (a local model folder)."""
    def one(s: str) -> str:
        if not s.startswith(CONTESTANT_PREFIX):
            return s
        path = resolve(s[len(CONTESTANT_PREFIX):])
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{s} resolved to {path}, which is not a model folder")
        return str(path)

    return _map_strings(config, one)


def run_merge_config(config: dict, out: Path, resolve: Callable[[str], str], *, seed: int = 0,
                     device: str = "cpu") -> Path:
    """Run a mergekit config (as `mergekit-yaml` takes it) whose model references may be `contestant:<ref>`;
    returns `out`, written atomically (see `_run_mergekit`).

    resolve: contestant ref without the prefix (e.g. "expert:code", "target", "source:gpt2") -> local model
    folder. seed: mergekit's random seed (DARE's sampling). device: "cpu", "cuda" or "cuda:N".
    Validated with `check_mergekit_config` first; no structural check is added on top of mergekit's own, so
    configs mergekit accepts (slices of different depths, `tokenizer_source: union`) run as they are.
    """
    check_mergekit_config(config)
    return _run_mergekit(resolve_contestants(config, resolve), Path(out), seed=seed, device=device)


def check_mergekit_config(config: dict) -> MergeConfiguration:
    """Validate a mergekit config before any model exists, as mergekit itself would when planning: the keys
    (mergekit ignores unknown ones: here they are an error, naming the key), mergekit's config model, the
    method's name, its input contract per merged group (e.g. slerp: exactly 2 inputs, base included; the
    base added to `models` as mergekit adds it), every parameter name, `dtype`/`out_dtype`, and the form of
    each `contestant:` reference. Raises ValueError naming the field; returns mergekit's config object."""
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    unknown = sorted(set(config) - set(MergeConfiguration.model_fields))
    if unknown:
        raise ValueError(f"unknown mergekit config key(s) {unknown}; mergekit's keys: "
                         f"{', '.join(MergeConfiguration.model_fields)}")
    try:
        merge = MergeConfiguration.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    except RuntimeError as exc:  # mergekit's own validators raise RuntimeError
        raise ValueError(str(exc)) from None
    method = _mergekit_method(merge.merge_method)
    allowed = {p.name for p in method.spec.parameters}
    for where, inputs, base, settings in _merge_groups(merge):
        try:
            method.validate_inputs(inputs, base, group_name=where)
        except ValueError as exc:
            raise ValueError(f"merge_method {merge.merge_method!r}: {exc} ({len(inputs)} input(s) counting the "
                             f"base: {[str(m) for m in inputs]})") from None
        for field_name, params in settings:
            bad = sorted(set(params or {}) - allowed)
            if bad:
                raise ValueError(f"{field_name}: merge method {merge.merge_method!r} has no parameter(s) {bad}; "
                                 f"its parameters: {sorted(allowed)}")
    for key in ("dtype", "out_dtype"):
        try:
            dtype_from_name(getattr(merge, key))
        except RuntimeError:
            raise ValueError(f"{key}: {getattr(merge, key)!r} is not a dtype mergekit knows (float32, bfloat16, "
                             f"float16, float64)") from None
    for ref in contestant_refs(config):
        _check_contestant_ref(ref)
    return merge


def _mergekit_method(name: str):
    from mergekit.merge_methods import get, registered_methods

    try:
        return get(name)
    except RuntimeError:
        names = sorted(m.spec.name for m in registered_methods())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"merge_method {name!r} is not a mergekit merge method{hint}; mergekit's methods: "
                         f"{', '.join(names)}") from None


def _merge_groups(merge):
    """(where, inputs, base, [(field, parameters)]) per group mergekit merges: `models` (the base appended
    when not listed, as mergekit's planner does), each slice, or each module's models/slices."""
    if merge.modules:
        sections = [(f"modules.{n}.", m.models, m.slices, [(f"modules.{n}.parameters", m.parameters)])
                    for n, m in merge.modules.items()]
    else:
        sections = [("", merge.models, merge.slices, [])]
    top = [("parameters", merge.parameters)]
    for prefix, models, slices, extra in sections:
        if models:
            inputs = [m.model for m in models]
            if merge.base_model is not None and merge.base_model not in inputs:
                inputs.append(merge.base_model)
            settings = [(f"{prefix}models.{i}.parameters", m.parameters) for i, m in enumerate(models)]
            yield f"{prefix}models", inputs, merge.base_model, top + extra + settings
        for i, part in enumerate(slices or []):
            settings = [(f"{prefix}slices.{i}.parameters", part.parameters)] + [
                (f"{prefix}slices.{i}.sources.{j}.parameters", s.parameters) for j, s in enumerate(part.sources)]
            yield f"{prefix}slices.{i}", [s.model for s in part.sources], part.base_model or merge.base_model, \
                top + extra + settings
