"""FuseLLM and the output ensemble over the domain pool (the paper's Table 7): the target fused with its own domain
experts (structurally identical copies of it, each continually trained on one domain: `baselines.domain_pool`),
so that fusion, the ensemble and the pool's weight merges (`baselines.merges`) compare on the same three models.

The experts are models the `domain_pool` stage builds: each is declared to the graph (`Graph.built_model`) with
the pool stage's key and its domain as identity, so the three get three distribution stages, three keys and three
distributions, although they share architecture, tokenizer and file sizes. They share the target's tokenizer, so
their alignment to it is one-to-one and their vocabulary map the identity.

Contestants: `fusellm:experts` (method kind FuseLLM) and `ensemble:experts` (method kind ensemble).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from harness.config import ModelSpec
from harness.contestants import ENSEMBLE, FUSELLM, Contestant, EnsembleModel, StageModel
from harness.methods import common_params, register_method, trained_params


class FusePoolParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float | None = Field(None, ge=0.0, le=1.0)  # default: fusion.lam
    ensemble: bool = True  # also the output ensemble of the experts (the config's ensemble combiner)
    domains: list[str] | None = None  # the pool's domains; default: the micro world's (other corpora: name them)


def pool_experts(g, domains: list[str] | None) -> list[ModelSpec]:
    """The domain pool's experts as models of the graph (built by its `domain_pool` stage)."""
    pool = g.stages.get("domain_pool")
    if pool is None:
        raise ValueError("methods.fuse_pool: needs the domain pool (baselines.domain_pool.enabled: true)")
    if domains is None:
        if g.cfg.corpus.kind != "micro":
            raise ValueError("methods.fuse_pool.domains: name the corpus domains (the pool trains one expert per "
                             "domain; only the micro corpus's are known before it is read)")
        from harness.micro import DOMAINS

        domains = list(DOMAINS)
    folder = g.cache.path(pool.key) / "experts"
    return [g.built_model(ModelSpec(name=f"expert-{d}", ref=str(folder / d)), pool, tokenizer_of=g.target, domain=d)
            for d in domains]


@register_method("fuse_pool", params=FusePoolParams, reference="Wan et al. 2024, Table 7 (domain experts)")
def fuse_pool(g, params: FusePoolParams) -> list[Contestant]:
    experts = pool_experts(g, params.domains)
    fused = g.fuse(experts, name="fused/experts")
    lam = g.cfg.fusion.lam if params.lam is None else params.lam
    st = g.train("train/fusellm-experts", fused, lam, label="fusellm:experts")
    members = {"experts": [e.label for e in experts]}
    out = [Contestant("fusellm:experts", FUSELLM, StageModel("fusellm:experts", st), made_by=[st], losses_from=st,
                      params={**common_params(g, FUSELLM), **trained_params(g, lam), **members},
                      figures_from=[fused, st])]
    if params.ensemble:
        cfg, ens = g.cfg, g.cfg.baselines.ensemble
        s = cfg.evaluation.settings
        loader = EnsembleModel("ensemble:experts", experts, g.target, ens.combiner, ens.weights, cfg.fusion.alignment,
                               cfg.fusion.vocab_map, s.batch_size, s.max_gen_toks)
        combination = {"combiner": ens.combiner, "weights": ens.weights, "alignment": cfg.fusion.alignment,
                       "vocab_map": cfg.fusion.vocab_map}
        extra = {"ensemble": {**combination, "members": {e.label: g.identity(e) for e in experts}}}
        out.append(Contestant("ensemble:experts", ENSEMBLE, loader, made_by=[g.stages["domain_pool"]],
                              key_extra=extra, params={**common_params(g, ENSEMBLE), **combination, **members}))
    return out
