"""The experiment graph, built once from the config: shared stages (world, corpus, the FuseLLM distributions,
vocabulary maps, alignments and fused set), then each method's stages and contestants, then one eval stage per
contestant. `fuselab plan`, `fuselab run`, the distributed launcher and studies all use this one graph.

A method is a function `(graph, params) -> list[Contestant]` that adds its stages through the building blocks
below (`add`, `distributions_of`, `aligned_of`, `fuse`, `diagnose`, `train`); the built-in methods are in
harness.methods, others register with `harness.methods.register_method` and are switched on by the config's
`methods:` section.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harness.cache import HASHES, FileHashes, StageCache
from harness.config import ExperimentConfig, ModelSpec
from harness.contestants import Contestant
from harness.stages.aligned import AlignedStage
from harness.stages.base import Stage
from harness.stages.corpus import CorpusStage
from harness.stages.diagnostics import DiagnosticsStage
from harness.stages.distributions import DistributionsStage
from harness.stages.evaluate import EvalStage
from harness.stages.fused import FusedStage
from harness.stages.train import TrainStage
from harness.stages.vocab import VocabStage
from harness.stages.world import WorldStage


class GraphError(ValueError):
    """The graph cannot be built as configured (two stages with one name)."""


class Graph:
    """The stages of one experiment (by name, in creation order) and its contestants (in table order)."""

    def __init__(self, cfg: ExperimentConfig, cache: StageCache):
        from harness.runtime import planned_placement

        self.cfg = cfg
        self.cache = cache
        self.hashes = FileHashes(cache.root / HASHES)  # content hashes of model / corpus / data files
        self.placement = planned_placement(cfg.runtime)  # what the runtime changes in what stages compute
        self.stages: dict[str, Stage] = {}
        self.contestants: list[Contestant] = []
        self._identity: dict[str, dict] = {}
        self.world: WorldStage | None = None
        if cfg.world is not None:
            self.world = self.add(WorldStage("world", seed=cfg.world.seed))
            shared = os.environ.get("FUSELAB_WORLD_CACHE")  # one world shared by several work dirs (tests, studies)
            if shared:
                cache.redirect(self.world.key, Path(shared).expanduser().resolve() / self.world.key.key)
        self.target = cfg.target
        self.models = [cfg.target, *[s for s in cfg.sources if s.label != cfg.target.label]]
        self.corpus = self.add(self._corpus_stage())
        self.distributions: dict[str, DistributionsStage] = {}
        self.aligned: dict[str, AlignedStage] = {}
        self._built: dict[str, list[Stage]] = {}  # models a stage of this graph builds: label -> that stage

    # -- building blocks ------------------------------------------------------------------------------
    def add(self, stage: Stage) -> Any:
        """Add a stage under its name (unique) and return it."""
        if stage.name in self.stages:
            raise GraphError(f"two stages are named {stage.name!r}; give the second one another name")
        self.stages[stage.name] = stage
        return stage

    def built_model(self, spec: ModelSpec, stage: Stage, tokenizer_of: ModelSpec | None = None, **what) -> ModelSpec:
        """Declare a model that `stage` builds (`spec.ref`: its folder inside the stage's, known before it exists,
        e.g. a domain expert): its identity is the stage's key and `what` (not its files), its tokenizer the one
        of `tokenizer_of` when given, and every stage reading it requires `stage`. Returns `spec`."""
        tok = self.tokenizer_identity(tokenizer_of) if tokenizer_of is not None else {"tokenizer": str(stage.key)}
        self._identity[spec.label] = {"kind": "stage", "weights": {"built_by": str(stage.key), **what},
                                      "tokenizer": tok["tokenizer"], "dtype": spec.dtype}
        self._built[spec.label] = [stage]
        return spec

    def identity(self, spec: ModelSpec) -> dict:
        """A model's content identity (weights, tokenizer, dtype: harness.models.identity), its cache-key part."""
        from harness import models

        if spec.label not in self._identity:
            world_key = self.world.key if self.world else None
            self._identity[spec.label] = models.identity(spec, world_key=world_key, hashes=self.hashes)
        return self._identity[spec.label]

    def tokenizer_identity(self, spec: ModelSpec) -> dict:
        """What tokenizes: the corpus split and the vocabulary maps depend on this, not on the weights."""
        ident = self.identity(spec)
        return {"kind": ident["kind"], "tokenizer": ident["tokenizer"]}

    def _corpus_stage(self) -> CorpusStage:
        cfg = self.cfg
        specs = [cfg.target, *cfg.sources]
        toks = sorted(json.dumps(self.tokenizer_identity(s), sort_keys=True) for s in specs)
        files = []
        if cfg.corpus.kind == "datasets":  # a local dataset rebuilds when its files change (hub: its revision)
            from harness.corpus import local_data_files

            files = files_identity([str(p) for p in local_data_files(cfg.corpus)], self.hashes)
        elif cfg.corpus.kind != "micro":
            from harness.corpus import path_entries

            files = files_identity([str(f) for _, fs in path_entries(cfg.corpus.paths) for f in fs], self.hashes)
        return CorpusStage("corpus", self.world, cfg.corpus, cfg.training.block_size, toks, files=files,
                           models=specs, seed=cfg.seed)

    def distributions_of(self, spec: ModelSpec) -> DistributionsStage:
        """The top-k distributions of `spec` on the corpus (created once per model)."""
        if spec.label not in self.distributions:
            f = self.cfg.fusion
            self.distributions[spec.label] = self.add(DistributionsStage(
                f"distributions/{spec.label}", self.corpus, self.identity(spec), f.top_k, f.store_dtype,
                batch_size=f.extraction_batch_size, spec=spec, device=self.cfg.runtime.device,
                numerics=self.placement.key_settings(spec.dtype), requires=self._built.get(spec.label, [])))
        return self.distributions[spec.label]

    def aligned_of(self, spec: ModelSpec) -> AlignedStage:
        """A source's distributions on the target's tokenization (with its vocabulary map; created once)."""
        if spec.label not in self.aligned:
            f, target = self.cfg.fusion, self.target
            vocab = self.add(VocabStage(f"vocab/{spec.label}", self.world, self.tokenizer_identity(spec),
                                        self.tokenizer_identity(target), f.vocab_map, f.vocab_text,
                                        f.special_tokens, source_spec=spec, target_spec=target,
                                        requires=self._built.get(spec.label, [])))
            self.aligned[spec.label] = self.add(AlignedStage(
                f"aligned/{spec.label}", self.corpus, self.distributions_of(spec), self.distributions_of(target),
                vocab, f.alignment, f.fallback_onehot, f.duplicate_ids, f.position0, f.empty_rows,
                source_spec=spec, target_spec=target))
        return self.aligned[spec.label]

    def fuse(self, sources: list[ModelSpec] | None = None, name: str = "fused") -> FusedStage:
        """A fused training set of the target and `sources` (default: every configured source; the FuseLLM set
        "fused"), with the configured fusion function. Created once per name."""
        if name in self.stages:
            return self.stages[name]
        f, target = self.cfg.fusion, self.target
        sources = [s for s in (self.cfg.sources if sources is None else sources) if s.label != target.label]
        for spec in [target, *sources]:  # every model's distributions first, as the plan lists them
            self.distributions_of(spec)
        aligned = [self.aligned_of(spec) for spec in sources]
        params = {"weights": f.avgce_weights, "cut": f.avgce_cut} if f.fusion == "avgce" else {}
        return self.add(FusedStage(name, self.distributions[target.label], aligned, f.fusion, params, f.score,
                                   f.top_k, corpus=self.corpus, target_spec=target,
                                   source_labels=[s.label for s in sources]))

    def diagnose(self, fused: FusedStage, name: str = "diagnostics") -> DiagnosticsStage:
        """The fusion diagnostics of a fused set (harness.stages.diagnostics: per source and domain, where each
        source's signal is kept or lost, and which candidate the documents pick). Created once per name."""
        if name in self.stages:
            return self.stages[name]
        return self.add(DiagnosticsStage(name, self.corpus, fused.target_distributions,
                                         [a.source_distributions for a in fused.aligned], list(fused.aligned),
                                         [a.vocab for a in fused.aligned], fused))

    def train(self, name: str, data: Stage, lam: float, label: str | None = None, **overrides) -> TrainStage:
        """A stage training the target on `data` (a fused-layout dataset stage, or the corpus for CLM) with
        `lam`; `overrides`: training fields that differ from the config's (e.g. max_steps)."""
        cfg = self.cfg
        training = {**cfg.training.model_dump(mode="json"), **overrides}
        bf16 = self.placement.train_bf16(bool(training.get("bf16"))) != bool(training.get("bf16"))
        return self.add(TrainStage(name, data, self.identity(self.target), cfg.seed, training, lam,
                                   cfg.fusion.temperature, cfg.fusion.loss_positions, target_spec=self.target,
                                   label=label or name.split("/", 1)[-1],
                                   numerics={"bf16_mixed": True} if bf16 else {}))

    def add_evaluations(self) -> None:
        """One eval stage per contestant (after every method has added its stages)."""
        ev = self.cfg.evaluation
        data = data_identity(ev, self.hashes)
        tasks = [tree_identity(Path(f).expanduser(), self.hashes) for f in ev.include_path]
        numerics = self.placement.key_settings(ev.settings.dtype)
        for c in self.contestants:
            self.add(EvalStage(f"eval/{c.label}", self.corpus, self.world, list(c.made_by), ev, c.label,
                               c.identity, dict(c.key_extra), data, tasks, contestant=c, numerics=numerics))


def files_identity(paths: list[str], hashes: FileHashes) -> list[str | None]:
    """sha256 of each input file (None for a missing one: the run's own check names it)."""
    out = []
    for p in paths:
        f = Path(p).expanduser()
        out.append(hashes.sha256(f) if f.is_file() else None)
    return out


def tree_identity(root: Path, hashes: FileHashes) -> str:
    """Digest of every file under `root` (relative path + sha256), e.g. a local evaluation-data folder."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            h.update(f"{f.relative_to(root).as_posix()}:{hashes.sha256(f)}\n".encode())
        except FileNotFoundError:  # removed while we walked: not part of the data any more
            continue
    return h.hexdigest()[:16]


def data_identity(evaluation, hashes: FileHashes) -> str | None:
    """The content digest of the local task data the suites read (evaluation.data_dir or FUSELAB_DATA)."""
    root = evaluation.data_dir or os.environ.get("FUSELAB_DATA")
    if evaluation.suites and root and Path(root).expanduser().is_dir():
        return tree_identity(Path(root).expanduser(), hashes)
    return None


def build_graph(cfg: ExperimentConfig, cache: StageCache) -> Graph:
    """Every stage and contestant of `cfg`: the built-in methods in table order, then `cfg.methods` in config
    order, then one eval stage per contestant."""
    from harness.methods import BUILTIN_METHODS, METHODS, method_params

    g = Graph(cfg, cache)
    g.fuse()  # the FuseLLM stages come first in every plan (the comparison is about them)
    for build in BUILTIN_METHODS:
        g.contestants += build(g)
    for name, raw in cfg.methods.items():
        g.contestants += METHODS.get(name)(g, method_params(name, raw))
    g.add_evaluations()
    return g
