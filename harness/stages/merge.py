"""Merging models with mergekit (baselines.merging): the domain experts ({method, params}), stages that each
publish one `model/` (fuse-then-merge), or a mergekit config as `mergekit-yaml` takes it, whose `contestant:<ref>`
model references name this experiment's models. Output: `model/` (with the `mergekit_config.yml` it ran) and
`runtime.json`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key


class MergeFailed(RuntimeError):
    """mergekit refused or failed a merge (models it cannot merge, a config it cannot run); one line naming the
    stage and mergekit's message (`fuselab --debug` shows the traceback)."""


@dataclass(eq=False)
class MergeStage(Stage):
    kind: ClassVar[str] = "merge"

    models: list[Stage]  # the stages whose models are merged: the domain pool, or stages publishing `model/`
    method: str | None  # method form: a name in baselines.merging.MERGE_METHODS
    params: dict  # method form: that method's parameters
    config: dict | None = None  # config form: the mergekit config, model references still `contestant:<ref>`
    given: dict = field(default_factory=dict)  # config form: {ref: identity} of the given models it names
    seed: int = 0  # mergekit's random seed (DARE's sampling)
    refs: list[str] = no_key(default_factory=list)  # config form: the contestant ref each of `models` provides
    specs: dict = no_key(default_factory=dict)  # config form: {ref: ModelSpec} of the given models
    base_spec: ModelSpec = no_key(default=None)  # method form: the models' common ancestor (task vectors)

    def key_settings(self) -> dict:
        if self.config is None:
            return {"method": self.method, "params": self.params}
        return {"config": self.config, "given": self.given, "seed": self.seed}

    def build(self, out: Path, env) -> None:
        from baselines.merging import MERGE_METHODS, UnmergeableModelsError, merge_models, run_merge_config

        device = env.placement.device
        try:
            if self.config is not None:
                run_merge_config(self.config, out / "model", lambda ref: self._resolve(ref, env), seed=self.seed,
                                 device=device)
            else:
                folders = model_folders(self.models, env)
                base = Path(env.model_path(self.base_spec)) if MERGE_METHODS.get(self.method).needs_base else None
                merge_models([folders[n] for n in sorted(folders)], self.method, out / "model", base_model=base,
                             params=self.params, seed=self.seed, device=device)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            if isinstance(exc, (MergeFailed, FileNotFoundError, UnmergeableModelsError)):
                raise
            what = self.method or self.config.get("merge_method")
            raise MergeFailed(f"{self.name}: mergekit could not merge ({what}): {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        env.note_runtime(self, out, {"device": device, "dtype": "float32"})

    def _resolve(self, ref: str, env) -> str:
        """The local folder of a `contestant:<ref>` model reference."""
        from harness.stages.domain_pool import read_experts

        if ref in self.specs:
            return env.model_path(self.specs[ref])
        by_ref = dict(zip(self.refs, self.models))
        if ref.startswith("expert:"):
            experts = read_experts(env.path(by_ref["domain_pool"]))
            domain = ref.split(":", 1)[1]
            if domain not in experts:
                raise ValueError(f"{self.name}: contestant:{ref}: the domain pool has no expert for domain "
                                 f"{domain!r} (its domains: {', '.join(sorted(experts))})")
            return str(experts[domain])
        return str(env.path(by_ref[ref]) / "model")


def model_folders(stages: list[Stage], env) -> dict[str, Path]:
    """{name: model folder} that stages published: a domain pool's experts (by domain), else each stage's
    `model/` (by stage name)."""
    from harness.stages.domain_pool import DomainPoolStage, read_experts

    out: dict[str, Path] = {}
    for stage in stages:
        if isinstance(stage, DomainPoolStage):
            out.update(read_experts(env.path(stage)))
        else:
            out[stage.name] = env.path(stage) / "model"
    return out
