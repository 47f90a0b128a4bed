"""What every stage is: a typed node of the experiment graph with a content-addressed cache key.

A stage kind is one class (one module under `harness/stages/`): its `kind` (the cache folder), its `version`
(bumped when the same settings give other output, so old cache entries stop matching), its inputs (other stage
objects, held as fields) and settings (the other fields), and `build(out, env)`, which writes the stage's files
into `out` (a temporary folder the executor publishes atomically). Stages never call each other: they read their
inputs' folders through `env.path(stage)`. `numerics` (keyword-only, every kind) holds what the runtime changes in
what a stage computes (a run dtype other than the declared one, bf16 mixed precision): it joins the key's
settings at the top level, and is empty on the default CPU runtime.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from harness.cache import StageCache, StageKey

if TYPE_CHECKING:
    from harness.executor import Env


@dataclasses.dataclass(eq=False)
class Stage:
    """Base of every stage kind. Subclasses are dataclasses; a field holding a Stage (or a list of them) is an
    input, every other field is a setting. `name` is the stage's name in plans and logs ("distributions/x")."""

    kind: ClassVar[str] = ""
    version: ClassVar[int | None] = 1  # None: the settings carry their own version (the micro world)
    cached_by_executor: ClassVar[bool] = True  # False: the stage manages its own folder (the micro world)

    name: str
    numerics: dict = dataclasses.field(default_factory=dict, kw_only=True)
    # stages that must be built first although no field reads them (e.g. the stage that trains a model this
    # stage loads by path): inputs like any other, so their keys are part of this stage's key
    requires: list = dataclasses.field(default_factory=list, kw_only=True)

    # -- graph --------------------------------------------------------------------------------------
    def inputs(self) -> dict[str, "Stage"]:
        """{role: stage} of every stage this one reads (fields holding stages, in field order)."""
        out: dict[str, Stage] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Stage):
                out[f.name] = value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Stage) for v in value):
                out.update({f"{f.name}.{i}": v for i, v in enumerate(value)})
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """What identifies this stage's output besides its inputs and version: `key_settings()` and `numerics`."""
        return {**self.key_settings(), **self.numerics}

    def key_settings(self) -> dict[str, Any]:
        """Every non-stage field except `name` and `numerics`, as JSON-able values. Subclasses override to leave
        out or rename fields."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "numerics", "requires") or isinstance(value, Stage) or f.metadata.get("key") is False:
                continue
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, Stage) for v in value):
                continue
            out[f.name] = _jsonable(value)
        return out

    @property
    def key(self) -> StageKey:
        """hash(kind, settings + version, input keys): changing a setting rebuilds this stage and its dependents.
        Computed once (a stage's fields do not change after the graph is built)."""
        cached = self.__dict__.get("_key")
        if cached is None:
            cached = self.__dict__["_key"] = self._compute_key()
        return cached

    def _compute_key(self) -> StageKey:
        settings = self.settings
        if self.version is not None:
            settings = {**settings, "stage_version": self.version}
        return StageCache.key(self.kind, settings, [s.key for s in self.inputs().values()])

    # -- building -----------------------------------------------------------------------------------
    def build(self, out: Path, env: "Env") -> None:
        """Write the stage's files into `out` (an empty temporary folder)."""
        raise NotImplementedError(f"stage kind {self.kind!r} ({type(self).__name__}) has no build()")

    def figures(self, folder: Path) -> dict[str, Any]:
        """The stage's own figures (its `stats.json`: throughput, shares, choices) for tracking; {} without one."""
        import json

        f = Path(folder) / "stats.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def published(self, folder: Path, env: "Env") -> None:
        """Called once the stage's folder is in place (e.g. to remove a training stage's checkpoints)."""


def walk(stages: list[Stage]) -> Iterator[Stage]:
    """Every stage reachable from `stages`, inputs before the stages that read them, each once."""
    seen: set[int] = set()

    def visit(st: Stage) -> Iterator[Stage]:
        if id(st) in seen:
            return
        seen.add(id(st))
        for dep in st.inputs().values():
            yield from visit(dep)
        yield st

    for st in stages:
        yield from visit(st)


def no_key(**kw) -> Any:
    """A dataclass field that is not part of the cache key (e.g. a loader, a label used only in messages)."""
    return dataclasses.field(metadata={"key": False}, **kw)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
