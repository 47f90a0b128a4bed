"""The micro world (models, corpus, tasks) as a stage: built by `harness.micro.build_micro_world`, which keeps
its own folder (and may be shared by several work dirs through FUSELAB_WORLD_CACHE)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from harness.stages.base import Stage


def world_settings(seed: int) -> dict:
    """What identifies a micro world: recipe version, sizes and seed."""
    from harness.micro import DEFAULT_SIZES, micro_world_version

    return {"kind": "micro", "seed": seed, "version": micro_world_version(), "sizes": asdict(DEFAULT_SIZES)}


@dataclass(eq=False)
class WorldStage(Stage):
    kind: ClassVar[str] = "world"
    version: ClassVar[int | None] = None  # the recipe version is in the settings (micro_world_version)
    cached_by_executor: ClassVar[bool] = False

    seed: int = 0

    def key_settings(self) -> dict:
        return world_settings(self.seed)

    def materialize(self, root: Path, progress: bool):
        """The MicroWorld at `root`, built there first when missing (build_micro_world publishes atomically)."""
        from harness.micro import build_micro_world

        return build_micro_world(root, seed=self.seed, progress=progress)
