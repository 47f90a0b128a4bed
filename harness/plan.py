"""The plan of one experiment: its graph's stages with their cache keys, and its contestants. Building it runs
nothing (so `fuselab plan` is free)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.cache import FileHashes, StageCache, StageKey
from harness.config import ExperimentConfig
from harness.contestants import Contestant
from harness.stages.base import Stage


def workdir(cfg: ExperimentConfig) -> Path:
    """The experiment's work folder (cache, runs, MLflow store): FUSELAB_WORKDIR, else the config's `workdir`."""
    return Path(os.environ.get("FUSELAB_WORKDIR", cfg.workdir)).expanduser().resolve()


@dataclass
class Plan:
    cfg: ExperimentConfig
    cache: StageCache
    stages: dict[str, Stage]  # by name, inputs before the stages that read them
    contestants: list[Contestant]  # results rows' sources, in table order
    hashes: FileHashes | None = None  # content hashes of model / corpus / data files, by file version

    @property
    def world_key(self) -> StageKey | None:
        return self.stages["world"].key if "world" in self.stages else None

    def cached(self, name: str) -> bool:
        """Built, and its files have the sizes its manifest records (a truncated stage is not cached)."""
        st = self.stages[name]
        if not st.cached_by_executor:
            return self.cache.path(st.key).is_dir()
        return self.cache.status(st.key).usable

    def dependents(self, name: str) -> list[str]:
        """Stages that read `name` directly ([] for a stage outside the plan)."""
        target = self.stages.get(name)
        if target is None:
            return []
        return [n for n, st in self.stages.items() if any(dep is target for dep in st.inputs().values())]

    def path(self, name: str) -> Path:
        return self.cache.path(self.stages[name].key)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"stage": st.name, "key": st.key.key,
                              "status": "cached" if self.cached(st.name) else "will run"}
                             for st in self.stages.values()])


def build_plan(cfg: ExperimentConfig) -> Plan:
    """Every stage of `cfg` with its content-addressed key (harness.graph.build_graph); nothing runs."""
    from harness.graph import build_graph

    cache = StageCache(workdir(cfg) / "cache")
    g = build_graph(cfg, cache)
    return Plan(cfg, cache, g.stages, g.contestants, g.hashes)
