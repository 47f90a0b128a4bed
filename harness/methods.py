"""Methods: functions that add a method's stages to the experiment graph and return its contestants.

    @register_method("my_method", params=MyParams)      # params: a pydantic model (or None: no parameters)
    def my_method(graph: harness.graph.Graph, params: MyParams) -> list[Contestant]: ...

A registered method runs when the experiment config names it under `methods:` (`methods: {my_method: {...}}`);
its parameters are validated when the config loads, so a typo fails before any work. The built-in comparison
(the given models, CLM-only, FuseLLM, the ensemble, the domain pool and its merges) is `BUILTIN_METHODS`,
switched by the config's `baselines` section.
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from fusion.registry import Registry
from harness.contestants import (CLM, ENSEMBLE, EXPERT, FUSELLM, MERGE, SOURCE, TARGET, Contestant, EnsembleModel,
                                 GivenModel, PoolModels, StageModel)

METHODS: Registry = Registry("method")


def register_method(name: str, *, params: type[BaseModel] | None = None, **meta) -> Callable:
    """Register `fn(graph, params) -> list[Contestant]` under `name` (see the module docstring)."""
    return METHODS.register(name, params=params, **meta)


def method_params(name: str, raw: dict | None) -> Any:
    """A method's `methods.<name>` config section validated by its params model. Raises ValueError naming the
    method and the field."""
    if name not in METHODS:
        _import_builtin_extras()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS.names()) or '(none)'}")
    model = METHODS.meta(name).get("params")
    raw = dict(raw or {})
    if model is None:
        if raw:
            raise ValueError(f"method {name!r} takes no parameters, got {sorted(raw)}")
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{name}.{loc}: {err['msg'].removeprefix('Value error, ')}") from None


def _import_builtin_extras() -> None:
    """The methods FuseLab ships beyond the built-in comparison register on import."""
    import harness.recipes  # noqa: F401


def common_params(g, method: str) -> dict:
    """MLflow params every contestant carries: method kind, seed, target."""
    return {"method": method, "seed": g.cfg.seed, "target": g.target.label}


def trained_params(g, lam: float, **training_overrides) -> dict:
    """MLflow params of a target trained with `lam` (the fusion settings when the fusion term is on)."""
    out: dict[str, Any] = {"lam": lam, "training": {**g.cfg.training.model_dump(mode="json"), **training_overrides}}
    if lam < 1.0:
        out["fusion"] = g.cfg.fusion.model_dump(mode="json")
    return out


# --------------------------------------------------------------------------------------- built-in methods
def given_models(g) -> list[Contestant]:
    """The sources, and the target before them when it is not a source: evaluated as they are."""
    cfg = g.cfg
    specs = list(cfg.sources)
    if cfg.target.label not in [s.label for s in specs]:
        specs.insert(0, cfg.target)
    out = []
    for spec in specs:
        method = TARGET if spec.label == cfg.target.label else SOURCE
        figures = [g.distributions[spec.label]] if spec.label in g.distributions else []
        if spec.label in g.aligned:
            figures += [g.stages[f"vocab/{spec.label}"], g.aligned[spec.label]]
        params = {**common_params(g, method), "model": {"ref": spec.ref, "revision": spec.revision, "dtype": spec.dtype}}
        out.append(Contestant(spec.label, method, GivenModel(spec), identity=g.identity(spec), params=params,
                              figures_from=figures))
    return out


def clm_only(g) -> list[Contestant]:
    """CLM-only: the target trained on the same documents with the plain language-modelling loss (lam = 1)."""
    if not g.cfg.baselines.clm:
        return []
    st = g.train("train/clm", g.corpus, 1.0)
    return [Contestant("clm", CLM, StageModel("clm", st), made_by=[st], losses_from=st,
                       params={**common_params(g, CLM), **trained_params(g, 1.0)}, figures_from=[st])]


def fusellm(g) -> list[Contestant]:
    """FuseLLM: the target trained on the fused distributions (lam * CLM + (1 - lam) * fusion loss), and the
    fusion diagnostics of those distributions."""
    fused = g.fuse()
    st = g.train("train/fusellm", fused, g.cfg.fusion.lam)
    diagnostics = g.diagnose(fused)  # read by the results and the report, not by training
    return [Contestant("fusellm", FUSELLM, StageModel("fusellm", st), made_by=[st], losses_from=st,
                       params={**common_params(g, FUSELLM), **trained_params(g, g.cfg.fusion.lam)},
                       figures_from=[fused, diagnostics, st])]


def ensemble(g) -> list[Contestant]:
    """The sources' output ensemble on the target's tokenization (no training)."""
    cfg = g.cfg
    ens = cfg.baselines.ensemble
    if not (ens.enabled and len(cfg.sources) > 1):
        return []
    members = [cfg.model_by_label(m) for m in (ens.members or [s.label for s in cfg.sources])]
    combination = {"combiner": ens.combiner, "weights": ens.weights, "alignment": cfg.fusion.alignment,
                   "vocab_map": cfg.fusion.vocab_map}
    extra = {"ensemble": {**combination, "members": {m.label: g.identity(m) for m in members}}}
    s = cfg.evaluation.settings
    loader = EnsembleModel("ensemble", members, cfg.target, ens.combiner, ens.weights, cfg.fusion.alignment,
                           cfg.fusion.vocab_map, s.batch_size, s.max_gen_toks)
    params = {**common_params(g, ENSEMBLE),
              "ensemble": {**ens.model_dump(mode="json"), "members": [m.label for m in members], **combination}}
    return [Contestant("ensemble", ENSEMBLE, loader, key_extra=extra, params=params)]


def domain_pool(g) -> list[Contestant]:
    """Domain experts: one copy of the target per corpus domain, one results row each (the paper's Table 7)."""
    from harness.stages.domain_pool import DomainPoolStage

    cfg = g.cfg
    pool = cfg.baselines.domain_pool
    if not pool.enabled:
        return []
    bf16 = g.placement.train_bf16(cfg.training.bf16) != cfg.training.bf16
    st = g.add(DomainPoolStage("domain_pool", g.corpus, g.identity(cfg.target), cfg.seed,
                               cfg.training.model_dump(mode="json"), pool.max_steps, target_spec=cfg.target,
                               numerics={"bf16_mixed": True} if bf16 else {}))
    return [Contestant("domain_pool", EXPERT, PoolModels(st), made_by=[st],
                       params={**common_params(g, EXPERT), **trained_params(g, 1.0, max_steps=pool.max_steps)})]


def merges(g) -> list[Contestant]:
    """The configured weight merges (`baselines.merges`), one contestant `merge:<label>` each: the domain pool
    merged by a method, or a mergekit config over this experiment's models (`contestant:<ref>`) and others."""
    from harness.stages.merge import MergeStage

    out = []
    for m in g.cfg.baselines.merges:
        if m.config is None:
            stage = MergeStage(f"merge/{m.label}", [g.stages["domain_pool"]], m.method, m.params,
                               seed=g.cfg.seed, base_spec=g.target)
        else:
            stage = _config_merge(g, m)
        g.add(stage)
        label = f"merge:{m.label}"
        params = {**common_params(g, MERGE), "merge": m.model_dump(mode="json")}
        if g.cfg.baselines.domain_pool.enabled:
            params["experts_max_steps"] = g.cfg.baselines.domain_pool.max_steps
        out.append(Contestant(label, MERGE, StageModel(label, stage), made_by=[stage], params=params,
                              figures_from=[stage]))
    return out


def _config_merge(g, m):
    """The merge stage of a mergekit-config entry: its `contestant:` refs become inputs (stages) or given
    models (keyed by content identity)."""
    from harness.stages.merge import MergeStage

    stages, refs, specs = [], [], {}
    for ref in m.contestant_refs():
        kind, _, rest = ref.partition(":")
        if kind in ("target", "source"):
            specs[ref] = g.target if kind == "target" else g.cfg.model_by_label(rest)
            continue
        provider = kind if kind in ("fusellm", "clm") else "domain_pool"  # experts: the pool's folder
        if provider not in refs:
            stages.append(g.stages[{"fusellm": "train/fusellm", "clm": "train/clm"}.get(provider, "domain_pool")])
            refs.append(provider)
    given = {ref: g.identity(spec) for ref, spec in specs.items()}
    return MergeStage(f"merge/{m.label}", stages, None, {}, config=m.mergekit_config(), given=given,
                      seed=g.cfg.seed, refs=refs, specs=specs)


BUILTIN_METHODS = (given_models, clm_only, fusellm, ensemble, domain_pool, merges)
