"""Fuse-then-merge (FuseChat, Wan et al. 2024): fuse each source into the target pairwise (one FuseLLM target per
source, same fusion settings and lambda), then merge those fused targets with mergekit (they share the target's
architecture). Contestants: `fuse-then-merge:<method>` per merge method (method kind "fuse-then-merge")."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.contestants import Contestant, StageModel
from harness.methods import common_params, register_method, trained_params
from harness.stages.merge import MergeStage

FUSE_THEN_MERGE = "fuse-then-merge"


class MergeChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str  # a name in baselines.merging.MERGE_METHODS
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        from baselines.merging import MERGE_METHODS, check_merge_request

        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; registered: {', '.join(MERGE_METHODS.names())}")
        check_merge_request(self.method, self.params)
        return self


class FuseThenMergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    merges: list[MergeChoice] = Field(default_factory=lambda: [MergeChoice(method="linear"),
                                                               MergeChoice(method="sce")], min_length=1)


@register_method("fuse_then_merge", params=FuseThenMergeParams, reference="FuseChat (Wan et al. 2024)")
def fuse_then_merge(g, params: FuseThenMergeParams) -> list[Contestant]:
    from baselines.merging import check_merge_request

    sources = [s for s in g.cfg.sources if s.label != g.target.label]
    if not sources:
        raise ValueError("methods.fuse_then_merge: needs at least one source besides the target")
    trained = [g.train(f"train/fuse-{s.label}", g.fuse([s], name=f"fused/{s.label}"), g.cfg.fusion.lam)
               for s in sources]
    out = []
    for m in params.merges:
        check_merge_request(m.method, m.params, n_models=len(trained))
        merged = g.add(MergeStage(f"merge/fuse-then-{m.method}", trained, m.method, m.params, base_spec=g.target))
        label = f"{FUSE_THEN_MERGE}:{m.method}"
        params = {**common_params(g, FUSE_THEN_MERGE), **trained_params(g, g.cfg.fusion.lam),
                  "merge": m.model_dump(mode="json"), "sources": [s.label for s in sources]}
        out.append(Contestant(label, FUSE_THEN_MERGE, StageModel(label, merged), made_by=[merged], params=params,
                              figures_from=[merged]))
    return out
