"""The one executor of stage graphs: for `fuselab run`, `fuselab plan`'s cache status, the distributed launcher and
studies alike.

`Executor.ensure(stage)` makes a stage's folder exist: its inputs first (recursively), then the stage itself from
the cache when it is there and passes its manifest check, else built (once across concurrent runs: the stage
key's lock) into a temporary folder that the cache publishes atomically, with the content digests of the inputs
it read. It keeps the timing of every stage, prints progress, and tells listeners (the live MLflow tracking)
about every stage it passes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from harness.config import ModelSpec
from harness.stages.base import Stage

log = logging.getLogger(__name__)

# Files in stage folders that record how a build went (seconds, throughput, where it ran, the Trainer's pickled
# arguments with its temporary output path), not what it computed: left out of the content digest that
# dependents record, so an identical rebuild keeps its dependents (harness.cache.build_manifest).
VOLATILE_FILES = ("stats.json", "train_result.json", "runtime.json", "training_args.bin")

StageListener = Callable[[Stage, Path, float, bool], None]  # (stage, folder, build seconds, cached)


class Env:
    """What a stage's build uses besides its own fields: its inputs' folders, the micro world, models and
    tokenizers (loaded through harness.models on the runtime's placement), the corpus' rows, progress output,
    where its models ran, training-curve sinks and checkpoint folders."""

    def __init__(self, executor: "Executor"):
        self._ex = executor
        self._tokenizers: dict[str, Any] = {}
        self._rows: dict[str, dict] = {}

    @property
    def progress(self) -> bool:
        """Progress bars and training steps (`fuselab run` without --quiet)."""
        return self._ex.progress

    @property
    def placement(self):
        """harness.runtime.Placement: device, run dtype, attention, extraction processes."""
        return self._ex.placement

    @property
    def seed(self) -> int:
        return self._ex.plan.cfg.seed

    def path(self, stage: Stage) -> Path:
        """The folder of a stage (ensured by the executor before any stage that reads it)."""
        return self._ex.cache.path(stage.key)

    @property
    def world(self):
        """The micro world (None without one)."""
        return self._ex.world()

    def tokenizer(self, spec: ModelSpec):
        from harness.models import load_model

        if spec.label not in self._tokenizers:
            self._tokenizers[spec.label] = load_model(spec, world=self.world, with_weights=False).tokenizer
        return self._tokenizers[spec.label]

    def load(self, spec: ModelSpec, *, training: bool = False, dtype: str | None = None):
        """harness.models.LoadedModel of a configured model: for inference on the runtime device in its run dtype
        (`dtype`: the declared dtype to resolve, default the spec's); for training float32 master weights on the
        CPU in the spec's dtype (the Trainer places it)."""
        from harness.models import load_model

        if training:
            return load_model(spec, world=self.world)
        p = self.placement
        return load_model(spec, world=self.world, device=p.device, dtype=p.dtype_for(dtype or spec.dtype),
                          attn_implementation=p.attn_implementation)

    def load_folder(self, folder: Path, dtype: str | None = None):
        """(model, tokenizer) of a model folder a stage wrote, on the runtime device in the run dtype."""
        from harness.models import load_folder

        p = self.placement
        return load_folder(folder, device=p.device, dtype=p.dtype_for(dtype or "float32"),
                           attn_implementation=p.attn_implementation)

    def model_path(self, spec: ModelSpec) -> str:
        """The local folder a configured model is loaded from."""
        from harness.models import resolve

        return resolve(spec, world=self.world)

    def corpus_rows(self, corpus: Stage) -> dict[str, list[dict]]:
        """{split: rows} of a built corpus stage (read once)."""
        from harness.stages.corpus import read_corpus

        if corpus.name not in self._rows:
            self._rows[corpus.name] = read_corpus(self.path(corpus))
        return self._rows[corpus.name]

    def iterate(self, items, desc: str):
        """`items`, with a progress bar when the run shows progress."""
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(items, desc=f"           {desc}", leave=False)
        return items

    def note_runtime(self, stage: Stage, out: Path, used: dict) -> None:
        """Record where a stage's models ran: <stage folder>/runtime.json (the run's runtime.json and MLflow
        read it back), and a progress line."""
        (out / "runtime.json").write_text(json.dumps(used, indent=2))
        self._ex.say(f"           {stage.name} ran on {describe_used(used)}")

    def curve_sink(self, label: str):
        """Where contestant `label`'s training curve streams (fusion.trainer.train_target(on_log=...)), or None."""
        return self._ex.curve_sink(label) if self._ex.curve_sink else None

    def checkpoint_dir(self, stage: Stage) -> Path:
        """Where a training stage keeps its checkpoints: outside its temporary build folder (a killed run's folder
        is removed on the next start), keyed like the stage, removed once the stage is published."""
        return self._ex.cache.root / "_checkpoints" / f"{stage.name.replace('/', '-')}-{stage.key.key}"


class Executor:
    """Walks a plan's stages. progress: True = stage lines, bars and training steps; "stages" = one line per
    stage; False = silent. listeners: called after each stage (built or cached); curve_sink: label -> training
    curve sink (live tracking)."""

    def __init__(self, plan, *, progress: bool | str = True, listeners: list[StageListener] = (),
                 curve_sink: Callable[[str], Any] | None = None):
        from harness.runtime import placement_from_config

        self.plan = plan
        self.cache = plan.cache
        self.progress = progress is True
        self.lines = bool(progress)
        self.listeners = list(listeners)
        self.curve_sink = curve_sink
        # resolved once, before any stage: `cuda` without a GPU fails here, naming runtime.device
        self.placement = placement_from_config(plan.cfg.runtime)
        self.env = Env(self)
        self.timings: dict[str, float] = {}  # seconds of the stages built in this run
        self.stage_log: list[dict] = []  # every stage passed: stage, seconds (build time), cached
        self.hits = 0
        self.ran = 0
        self._done: dict[int, Path] = {}
        self._world = None

    def say(self, msg: str) -> None:
        if self.lines:
            print(msg, flush=True)

    def world(self):
        """The micro world of the plan (materialised on first use), or None."""
        if self._world is None and "world" in self.plan.stages:
            self.ensure(self.plan.stages["world"])
        return self._world

    def run(self, stages: list[Stage] | None = None) -> None:
        """Ensure `stages` (default: every stage of the plan), in plan order."""
        for st in (stages if stages is not None else list(self.plan.stages.values())):
            self.ensure(st)

    def ensure(self, stage: Stage, build: Callable[[Path], None] | None = None) -> Path:
        """The stage's folder: its inputs ensured first, then cached or built (by `build(tmp)` when given, e.g.
        the launcher's distributed job, else `stage.build(tmp, env)`) and published atomically."""
        if id(stage) in self._done:
            return self._done[id(stage)]
        for dep in stage.inputs().values():
            self.ensure(dep)
        path = self._cached_stage(stage, build) if stage.cached_by_executor else self._world_stage(stage)
        self._done[id(stage)] = path
        return path

    def _world_stage(self, stage: Stage) -> Path:
        root = self.cache.path(stage.key)
        if root.is_dir():
            self.hits += 1
            self.say(f"  [cached] {stage.name:<34} {root.name}")
        else:
            self.say(f"  [run]    {stage.name:<34} {root.name}")
        t0 = time.perf_counter()
        self._world = stage.materialize(root, self.progress)
        if time.perf_counter() - t0 > 1:
            self.timings[stage.name] = time.perf_counter() - t0
        return root

    def _full_check(self, stage: Stage) -> bool:
        # content hashes for what a report is made from (evaluation results) and for every stage a build is
        # about to read; sizes only for the rest (a cached stage read by cached stages only)
        return stage.kind == "eval" or any(not self.plan.cached(d) for d in self.plan.dependents(stage.name))

    def _hit(self, stage: Stage) -> Path:
        self.hits += 1
        path = self.cache.path(stage.key)
        self.say(f"  [cached] {stage.name:<34} {stage.key.key}")
        self._record(stage, path, built_seconds(path), True)
        return path

    def _cached_stage(self, stage: Stage, build: Callable[[Path], None] | None) -> Path:
        """Cached and verified against its manifest, else built once across concurrent runs (the stage key's
        lock) into an atomic folder. A corrupt stage is removed and rebuilt."""
        full = self._full_check(stage)
        if self.cache.status(stage.key, full=full).usable:
            return self._hit(stage)
        wait = lambda: self.say(f"  [wait]   {stage.name:<34} another run is building it")  # noqa: E731
        with self.cache.lock(stage.key, on_wait=wait):
            status = self.cache.status(stage.key, full=full)  # again: another run may have built it meanwhile
            if status.usable:
                return self._hit(stage)
            if status.state == "corrupt":
                self._discard_corrupt(stage, status)
            dt = self._build(stage, build)
        self.timings[stage.name] = dt
        self.ran += 1
        self.say(f"           {stage.name} done in {dt:.1f} s" if self.progress
                 else f"  [run]    {stage.name:<34} {dt:.1f} s")
        path = self.cache.path(stage.key)
        self._record(stage, path, dt, False)
        return path

    def _discard_corrupt(self, stage: Stage, status) -> None:
        msg = f"{status.describe()}; rebuilding it"
        if self.progress:
            self.say(f"  [corrupt] {msg}")
        else:
            log.warning(msg)
        self.cache.discard(stage.key)

    def _build(self, stage: Stage, build: Callable[[Path], None] | None) -> float:
        # what this build reads, by content digest (verified now): a dependent rebuilds if it changes
        inputs = {str(dep.key): self.cache.digest(dep.key) for dep in stage.inputs().values()
                  if dep.cached_by_executor}
        if self.progress:  # quiet runs print one line per stage, when it is done
            self.say(f"  [run]    {stage.name:<34} {stage.key.key}")
        t0 = time.perf_counter()
        meta = {"stage": stage.name, "settings": stage.settings, "stage_version": stage.version}
        with self.cache.atomic_dir(stage.key, meta=meta, inputs=inputs, volatile=VOLATILE_FILES) as tmp:
            if build is not None:
                build(tmp)
            else:
                stage.build(tmp, self.env)
            meta["build_seconds"] = round(time.perf_counter() - t0, 3)  # _meta.json is written after this
        stage.published(self.cache.path(stage.key), self.env)
        return time.perf_counter() - t0

    def _record(self, stage: Stage, path: Path, seconds: float, cached: bool) -> None:
        self.stage_log.append({"stage": stage.name, "seconds": seconds, "cached": cached})
        for listener in self.listeners:
            listener(stage, path, seconds, cached)


def built_seconds(stage_dir: Path) -> float:
    """How long a cached stage took to build (from its _meta.json); NaN for stages built before this was kept."""
    try:
        return float(json.loads((Path(stage_dir) / "_meta.json").read_text()).get("build_seconds", math.nan))
    except (OSError, ValueError):
        return math.nan


def describe_used(used: dict) -> str:
    """runtime.json -> one line: "cuda:0 bfloat16", or "model=cuda:0 bfloat16; ..." for several models."""
    if "members" in used:
        return "; ".join(f"{m}={describe_used(v)}" for m, v in used["members"].items())
    if "device" in used:
        return f"{used['device']} {used.get('dtype', '')}".strip()
    return "; ".join(f"{m}={describe_used(v)}" for m, v in used.items())
