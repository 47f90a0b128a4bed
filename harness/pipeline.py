"""The experiment pipeline: an explicit plan of cached stages, then their execution.

experiment YAML -> Config -> world -> corpus -> distributions (per model) -> vocab maps -> aligned (per source)
-> fused -> train (FuseLLM, CLM-only) -> domain pool / merges -> evaluate (every model) -> report.

`build_plan(cfg)` computes every stage's content-addressed key without running anything (so `fuselab plan`
is free); `run_experiment(cfg)` executes the stages that are not cached, each into an atomic directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from harness.cache import HASHES, FileHashes, StageCache, StageKey
from harness.config import ExperimentConfig, ModelSpec

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class Stage:
    name: str  # e.g. "distributions/neox-code"
    kind: str  # cache folder: "world", "corpus", "distributions", ...
    key: StageKey
    settings: dict
    inputs: list[str] = field(default_factory=list)  # names of stages this one reads


@dataclass
class Plan:
    cfg: ExperimentConfig
    cache: StageCache
    stages: dict[str, Stage]
    world_key: StageKey | None
    hashes: FileHashes | None = None  # content hashes of model / corpus / data files, by file version

    def cached(self, name: str) -> bool:
        """Built, and its files have the sizes its manifest records (a truncated stage is not cached)."""
        st = self.stages[name]
        if st.kind == "world":
            return self.cache.path(st.key).is_dir()
        return self.cache.status(st.key).usable

    def dependents(self, name: str) -> list[str]:
        """Stages that read `name` directly."""
        return [n for n, st in self.stages.items() if name in st.inputs]

    def path(self, name: str) -> Path:
        return self.cache.path(self.stages[name].key)

    def table(self) -> pd.DataFrame:
        rows = []
        for st in self.stages.values():
            rows.append({"stage": st.name, "key": st.key.key, "status": "cached" if self.cached(st.name) else "will run"})
        return pd.DataFrame(rows)


# Files in stage folders that record how a build went (seconds, throughput, where it ran, the Trainer's pickled
# arguments with its temporary output path), not what it computed: left out of the content digest that
# dependents record, so an identical rebuild keeps its dependents (harness.cache.build_manifest).
VOLATILE_FILES = ("stats.json", "train_result.json", "runtime.json", "training_args.bin")


def workdir(cfg: ExperimentConfig) -> Path:
    return Path(os.environ.get("FUSELAB_WORKDIR", cfg.workdir)).expanduser().resolve()


def _model_identity(spec: ModelSpec, world_key: StageKey | None, hashes: FileHashes | None = None) -> dict:
    """A model's content identity (weights, tokenizer, dtype): see harness.models.identity."""
    from harness import models

    return models.identity(spec, world_key=world_key, hashes=hashes)


def _files_identity(paths: list[str], hashes: FileHashes) -> list[str | None]:
    """sha256 of each input file (None for a missing one: the run's own check names it)."""
    out = []
    for p in paths:
        f = Path(p).expanduser()
        out.append(hashes.sha256(f) if f.is_file() else None)
    return out


def _tree_identity(root: Path, hashes: FileHashes) -> str:
    """Digest of every file under `root` (relative path + sha256), e.g. a local evaluation-data folder."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            h.update(f"{f.relative_to(root).as_posix()}:{hashes.sha256(f)}\n".encode())
        except FileNotFoundError:  # removed while we walked: not part of the data any more
            continue
    return h.hexdigest()[:16]


def check_models(cfg: ExperimentConfig, hashes: FileHashes | None = None) -> list[str]:
    """One line per problem with the target or a source (harness.models.check_model), before any stage runs."""
    from harness import models

    return models.check_models([cfg.target, *cfg.sources], hashes=hashes)


def check_evaluation(cfg: ExperimentConfig) -> list[str]:
    """One line per reason the evaluation would fail only after every model is trained, found before any
    stage runs: a built-in suite whose data is missing offline (harness.evaluation.data), or MultiPL-E where
    generated code cannot be jailed (harness.evaluation.sandbox). Nothing is downloaded or executed."""
    from harness.evaluation.data import BUILTIN_SUITES, DataUnavailableError, resolve_suite_data
    from harness.evaluation.multipl_e import available_languages
    from harness.evaluation.sandbox import SandboxUnavailable, check_sandbox

    data_dir = Path(cfg.evaluation.data_dir).expanduser() if cfg.evaluation.data_dir else None
    problems: list[str] = []
    for suite in cfg.evaluation.suites:
        if suite not in BUILTIN_SUITES:
            continue
        # the languages evaluate() runs: those with a toolchain here (the others are reported "not run")
        languages = available_languages() if suite == "multipl_e" else ()
        if suite == "multipl_e" and not languages:
            continue
        try:
            resolve_suite_data(suite, data_dir, languages)
        except DataUnavailableError as exc:
            lines = str(exc).splitlines()
            lacks = " ".join(line.split(": ")[0] + "." for line in lines[1:] if " lacks " in line)
            problems.append(f"evaluation.suites: {suite}: {lines[0]}{' ' + lacks if lacks else ''} Set "
                            f"evaluation.data_dir (or FUSELAB_DATA) to a folder holding its files (listed in "
                            f"harness/evaluation/data.py).")
        if suite == "multipl_e":
            try:
                check_sandbox()
            except (SandboxUnavailable, ValueError) as exc:
                problems.append(f"evaluation.suites: multipl_e: {exc}")
    return problems


def world_settings(seed: int) -> dict:
    """What identifies a micro world: recipe version, sizes and seed."""
    from dataclasses import asdict

    from harness.micro import DEFAULT_SIZES, micro_world_version

    return {"kind": "micro", "seed": seed, "version": micro_world_version(), "sizes": asdict(DEFAULT_SIZES)}


def world_stage_key(seed: int) -> StageKey:
    return StageCache.key("world", world_settings(seed))


def build_plan(cfg: ExperimentConfig) -> Plan:
    cache = StageCache(workdir(cfg) / "cache")
    hashes = FileHashes(cache.root / HASHES)
    stages: dict[str, Stage] = {}

    numerics = _runtime_key_settings(cfg)

    def add(name: str, kind: str, settings: dict, inputs: list[str] = ()) -> Stage:
        settings = {**settings, **numerics(name)}  # {} unless the runtime changes what a model computes
        key = cache.key(kind, settings, [stages[i].key for i in inputs])
        stages[name] = Stage(name, kind, key, settings, list(inputs))
        return stages[name]

    world_key = None
    if cfg.world is not None:
        world_key = add("world", "world", world_settings(cfg.world.seed)).key
        shared = os.environ.get("FUSELAB_WORLD_CACHE")  # one world shared by several work dirs (tests, studies)
        if shared:
            cache.redirect(world_key, Path(shared).expanduser().resolve() / world_key.key)
    # the target last: a source named like the target is the target (the runner loads it by that name)
    ident = {s.label: _model_identity(s, world_key, hashes) for s in [*cfg.sources, cfg.target]}
    # what tokenizes: the corpus split and the vocabulary maps depend on the tokenizers, not on the weights
    tok_ident = {label: {"kind": v["kind"], "tokenizer": v["tokenizer"]} for label, v in ident.items()}
    world_in = ["world"] if world_key else []
    corpus_settings = {"corpus": cfg.corpus.model_dump(mode="json"), "block_size": cfg.training.block_size,
                       "tokenizers": sorted(json.dumps(v, sort_keys=True) for v in tok_ident.values())}
    if cfg.corpus.kind != "micro":  # the micro world brings its own split (keyed by the world)
        corpus_settings["seed"] = cfg.seed  # the train/validation shuffle
        corpus_settings["files"] = _files_identity(cfg.corpus.paths, hashes)
    add("corpus", "corpus", corpus_settings, world_in)
    f = cfg.fusion
    models = [cfg.target, *[s for s in cfg.sources if s.label != cfg.target.label]]
    for spec in models:
        add(f"distributions/{spec.label}", "distributions",
            {"model": ident[spec.label], "k": f.top_k, "dtype": f.store_dtype}, ["corpus"])
    fuse_inputs = [f"distributions/{cfg.target.label}"]
    for spec in cfg.sources:
        if spec.label == cfg.target.label:
            continue  # the target is a candidate as itself (no alignment)
        # "bytes": byte tokens compared as bytes since this version (they all collapsed into U+FFFD before)
        add(f"vocab/{spec.label}", "vocab", {"source": tok_ident[spec.label], "target": tok_ident[cfg.target.label],
                                             "method": f.vocab_map, **f.vocab_options(), "bytes": 1}, world_in)
        add(f"aligned/{spec.label}", "aligned",
            {"alignment": f.alignment, "fallback": f.fallback_onehot, "duplicates": f.duplicate_ids,
             "position0": f.position0, "empty_rows": f.empty_rows},
            ["corpus", f"distributions/{spec.label}", f"distributions/{cfg.target.label}", f"vocab/{spec.label}"])
        fuse_inputs.append(f"aligned/{spec.label}")
    add("fused", "fused", {"fusion": f.fusion, "weights": f.avgce_weights if f.fusion == "avgce" else None,
                           "cut": f.avgce_cut if f.fusion == "avgce" else None,
                           "avgce_normalized": True, "score": f.score, "top_k": f.top_k}, fuse_inputs)
    train_settings = cfg.training.model_dump(mode="json", exclude={"checkpoint_steps"})  # saving changes no result
    tgt = {"target": ident[cfg.target.label], "seed": cfg.seed}
    add("train/fusellm", "train", {**tgt, "training": train_settings, "lam": f.lam, "temperature": f.temperature,
                                   "loss_positions": f.loss_positions},
        ["fused"])
    if cfg.baselines.clm:
        add("train/clm", "train", {**tgt, "training": train_settings, "lam": 1.0}, ["corpus"])
    pool = cfg.baselines.domain_pool
    if pool.enabled:
        add("domain_pool", "domain_pool", {**tgt, "training": train_settings, "max_steps": pool.max_steps}, ["corpus"])
        for m in cfg.baselines.merges:
            add(f"merge/{m.method}", "merge", {"method": m.method, "params": m.params}, ["domain_pool"])
    # "units": the stage also keeps per-item and per-document scores (intervals, paired tests) since version 1
    ev = {"units": 1, "suites": cfg.evaluation.suites, "settings": cfg.evaluation.settings.model_dump(mode="json"),
          "perplexity": cfg.evaluation.perplexity.model_dump(mode="json"), "data_dir": cfg.evaluation.data_dir}
    data_root = cfg.evaluation.data_dir or os.environ.get("FUSELAB_DATA")
    if cfg.evaluation.suites and data_root and Path(data_root).expanduser().is_dir():
        ev["data"] = _tree_identity(Path(data_root).expanduser(), hashes)  # the task data's content
    for name in evaluated_models(cfg):
        inputs = ["corpus"] + _model_stage(cfg, name)
        settings = {**ev, "model": name, "ident": ident.get(name) or ident.get(name.split(":")[0])}
        if name == "ensemble":
            # the ensemble's per-domain bits per byte (same windows as the single models) since this version
            settings["protocol"] = "ensemble-perplexity-1"
            ens = cfg.baselines.ensemble
            members = ens.members or [s.label for s in cfg.sources]
            settings["ensemble"] = {"combiner": ens.combiner, "weights": ens.weights,
                                    "members": {m: ident[m] for m in members},
                                    "alignment": cfg.fusion.alignment, "vocab_map": cfg.fusion.vocab_map}
        add(f"eval/{name}", "eval", settings, inputs + world_in)
    return Plan(cfg, cache, stages, world_key, hashes)


def _runtime_key_settings(cfg: ExperimentConfig) -> Callable[[str], dict]:
    """stage name -> what `runtime` adds to its key: the run dtype where it differs from the declared one
    (extraction, evaluation), bf16 mixed precision where the runtime turns it on (training). The device is
    not part of a key: a GPU gives the CPU's results up to float rounding (see harness/runtime.py)."""
    from harness.runtime import planned_placement

    place = planned_placement(cfg.runtime)
    labels = {s.label: s for s in [cfg.target, *cfg.sources]}

    def extra(name: str) -> dict:
        kind, _, rest = name.partition("/")
        if kind == "distributions" and rest in labels:
            return place.key_settings(labels[rest].dtype)
        if kind == "eval":
            return place.key_settings(cfg.evaluation.settings.dtype)
        if kind in ("train", "domain_pool") and place.train_bf16(cfg.training.bf16) != cfg.training.bf16:
            return {"bf16_mixed": True}
        return {}

    return extra


def evaluated_models(cfg: ExperimentConfig) -> list[str]:
    """Every model of the comparison, in table order."""
    names = [s.label for s in cfg.sources]
    if cfg.target.label not in names:
        names.insert(0, cfg.target.label)
    if cfg.baselines.clm:
        names.append("clm")
    names.append("fusellm")
    if cfg.baselines.ensemble.enabled and len(cfg.sources) > 1:
        names.append("ensemble")
    if cfg.baselines.domain_pool.enabled:
        names.append("domain_pool")  # placeholder expanded at run time into one row per expert
        names += [f"merge:{m.method}" for m in cfg.baselines.merges]
    return names


def _model_stage(cfg: ExperimentConfig, name: str) -> list[str]:
    if name == "fusellm":
        return ["train/fusellm"]
    if name == "clm":
        return ["train/clm"]
    if name == "domain_pool":
        return ["domain_pool"]
    if name.startswith("merge:"):
        return [f"merge/{name.split(':', 1)[1]}"]
    return []


# ----------------------------------------------------------------------------------------------- run
@dataclass
class ExperimentResult:
    config: ExperimentConfig
    results: pd.DataFrame
    eval_long: pd.DataFrame
    metrics: dict[str, float]
    losses: dict[str, list[tuple[int, float]]]
    stage_timings: dict[str, float]
    run_dir: Path
    cache_hits: int = 0
    stages_run: int = 0
    # every stage of the plan this run passed through: stage, seconds (its build time, also when it was
    # cached: recorded in the stage's _meta.json when it was built), cached
    stage_times: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["stage", "seconds", "cached"]))
    # every score's bootstrap interval and the paired tests vs the target and CLM-only (harness.stats)
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)


class StageRunner:
    """Builds (or finds cached) the stages of one plan: one method per stage kind, each an atomic, locked build
    through the stage cache. Used by `run_experiment` and by the distributed launcher (harness.launch)."""

    def __init__(self, plan: Plan, progress: bool | str, tracker=None, live=None):
        self.plan = plan
        self.cfg = plan.cfg
        # progress: True = stage lines, bars and training steps; "stages" = one line per stage; False = silent
        self.progress = progress is True
        self.lines = bool(progress)
        self.tracker = tracker
        self.live = live  # harness.tracking.ExperimentRuns: stage outputs stream to MLflow as stages finish
        self.timings: dict[str, float] = {}
        self.stage_log: list[dict] = []
        self.hits = 0
        self.ran = 0
        self._world = None
        self._loaded: dict[str, Any] = {}
        from harness.runtime import placement_from_config

        # resolved once, before any stage: `cuda` without a GPU fails here, naming runtime.device
        self.placement = placement_from_config(self.cfg.runtime)
        self.runtime_used: dict[str, dict] = {}  # stage -> where its models ran (also <stage>/runtime.json)

    # -- helpers
    def say(self, msg: str) -> None:
        if self.lines:
            print(msg, flush=True)

    def _full_check(self, name: str) -> bool:
        # content hashes for what a report is made from (evaluation results) and for every stage a build is
        # about to read; sizes only for the rest (a cached stage read by cached stages only)
        return name.startswith("eval/") or any(not self.plan.cached(d) for d in self.plan.dependents(name))

    def _hit(self, name: str) -> Path:
        self.hits += 1
        self.say(f"  [cached] {name:<34} {self.plan.stages[name].key.key}")
        self.stage_log.append({"stage": name, "seconds": _built_seconds(self.plan.path(name)), "cached": True})
        _track_stage(self, name, math.nan, cached=True)
        return self.plan.path(name)

    def stage(self, name: str, build: Callable[[Path], None]) -> Path:
        """Return the stage's folder: cached and verified against its manifest, else built (once across
        concurrent runs: the stage key's lock) into an atomic folder. A corrupt stage is removed and rebuilt."""
        st = self.plan.stages[name]
        cache = self.plan.cache
        full = self._full_check(name)
        if cache.status(st.key, full=full).usable:
            return self._hit(name)
        wait = lambda: self.say(f"  [wait]   {name:<34} another run is building it")  # noqa: E731
        with cache.lock(st.key, on_wait=wait):
            status = cache.status(st.key, full=full)  # again: another run may have built it meanwhile
            if status.usable:
                return self._hit(name)
            if status.state == "corrupt":
                msg = f"{status.describe()}; rebuilding it"
                if self.progress:
                    self.say(f"  [corrupt] {msg}")
                else:
                    log.warning(msg)
                cache.discard(st.key)
            # what this build reads, by content digest (verified now): a dependent rebuilds if it changes
            inputs = {str(self.plan.stages[i].key): cache.digest(self.plan.stages[i].key)
                      for i in st.inputs if self.plan.stages[i].kind != "world"}
            if self.progress:  # quiet runs print one line per stage, when it is done
                self.say(f"  [run]    {name:<34} {st.key.key}")
            t0 = time.perf_counter()
            meta = {"stage": name, "settings": st.settings}
            with cache.atomic_dir(st.key, meta=meta, inputs=inputs, volatile=VOLATILE_FILES) as tmp:
                build(tmp)
                meta["build_seconds"] = round(time.perf_counter() - t0, 3)  # _meta.json is written after this
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        self.stage_log.append({"stage": name, "seconds": dt, "cached": False})
        self.ran += 1
        self.say(f"           {name} done in {dt:.1f} s" if self.progress else f"  [run]    {name:<34} {dt:.1f} s")
        _track_stage(self, name, dt, cached=False)
        return self.plan.path(name)

    @property
    def world(self):
        if self._world is None and self.cfg.world is not None:
            from harness.micro import build_micro_world

            root = self.plan.cache.path(self.plan.stages["world"].key)
            if root.is_dir():
                self.hits += 1
                self.say(f"  [cached] {'world':<34} {root.name}")
            else:
                self.say(f"  [run]    {'world':<34} {root.name}")
            t0 = time.perf_counter()
            self._world = build_micro_world(root, seed=self.cfg.world.seed, progress=self.progress)
            if "world" not in self.timings and time.perf_counter() - t0 > 1:
                self.timings["world"] = time.perf_counter() - t0
        return self._world

    def spec(self, label: str) -> ModelSpec:
        return self.cfg.model_by_label(label)

    def tokenizer(self, label: str):
        from harness.models import load_model

        key = ("tok", label)
        if key not in self._loaded:
            self._loaded[key] = load_model(self.spec(label), world=self.world, with_weights=False).tokenizer
        return self._loaded[key]

    def model(self, label: str, training: bool = False):
        """A model loaded once onto the runtime device in its run dtype; for training: float32 master weights on
        the CPU in the spec's dtype (the Trainer places it, with bf16 autocast when the runtime asks for it)."""
        from harness.models import load_model

        if training:
            return load_model(self.spec(label), world=self.world)
        spec, p = self.spec(label), self.placement
        return load_model(spec, world=self.world, device=p.device, dtype=p.dtype_for(spec.dtype),
                          attn_implementation=p.attn_implementation)

    def note_runtime(self, stage: str, tmp: Path, used: dict) -> None:
        """Record where a stage's models ran: <stage folder>/runtime.json, the run's runtime.json, MLflow."""
        self.runtime_used[stage] = used
        (tmp / "runtime.json").write_text(json.dumps(used, indent=2))
        self.say(f"           {stage} ran on {_describe_used(used)}")

    # -- corpus
    def corpus(self) -> dict[str, list[dict]]:
        from harness.corpus import load_corpus_splits, save_jsonl, load_jsonl
        from fusion.data import split_documents

        def build(tmp: Path) -> None:
            splits = load_corpus_splits(self.cfg.corpus, world=self.world, seed=self.cfg.seed)
            toks = [self.tokenizer(s.label) for s in [self.cfg.target, *self.cfg.sources]]
            for split, rows in splits.items():
                out, doc_id = [], 0
                for row in rows:
                    pieces = split_documents([row["text"]], toks, self.cfg.training.block_size) if split == "train" else [row["text"]]
                    for piece in pieces:
                        out.append({"doc_id": doc_id, "domain": row["domain"], "text": piece})
                        doc_id += 1
                save_jsonl(tmp / f"{split}.jsonl", out)

        path = self.stage("corpus", build)
        return {p.stem: load_jsonl(p) for p in sorted(path.glob("*.jsonl"))}

    def prepare_fused(self) -> tuple[dict[str, list[dict]], Path]:
        """Run (or find cached) the world, the corpus and every FuseLLM stage up to the fused set, in plan order;
        -> (corpus splits, fused stage folder). `fuselab run` and the distributed launcher both start here."""
        cfg = self.cfg
        _ = self.world
        corpus = self.corpus()
        rows = corpus["train"]
        for spec in [cfg.target, *[s for s in cfg.sources if s.label != cfg.target.label]]:
            self.distributions(spec.label, rows)
        for spec in cfg.sources:
            if spec.label != cfg.target.label:
                self.vocab(spec.label)
                self.aligned(spec.label, rows)
        return corpus, self.fused(rows)

    # -- distributions
    def distributions(self, label: str, train_rows: list[dict]) -> Path:
        from fusion.distributions import extract_distributions

        def build(tmp: Path) -> None:
            import torch

            torch.manual_seed(self.cfg.seed)
            p = self.placement
            texts, doc_ids = [r["text"] for r in train_rows], [r["doc_id"] for r in train_rows]
            if p.extraction_nproc > 1:
                import shutil

                from harness.models import resolve
                from harness.sharded import extract_distributions_sharded

                spec = self.spec(label)
                local = spec.model_copy(update={"ref": resolve(spec, world=self.world), "name": spec.label})
                work = tmp / "_sharded"
                ds, stats = extract_distributions_sharded(
                    local, texts, doc_ids, work, nproc=p.extraction_nproc, k=self.cfg.fusion.top_k,
                    batch_size=self.cfg.fusion.extraction_batch_size, store_dtype=self.cfg.fusion.store_dtype,
                    device=self.cfg.runtime.device, dtype=p.dtype_for(spec.dtype),
                    attn_implementation=p.attn_implementation, progress=self.progress)
                used = {"device": stats_device(work), "dtype": p.dtype_for(spec.dtype), "processes": p.extraction_nproc}
                shutil.rmtree(work)  # the merged dataset is in memory; the shards would double the stage's size
            else:
                from harness.runtime import observed

                lm = self.model(label)
                used = observed(lm.model)
                ds, stats = extract_distributions(
                    lm.model, lm.tokenizer, texts, doc_ids,
                    k=self.cfg.fusion.top_k, batch_size=self.cfg.fusion.extraction_batch_size,
                    store_dtype=self.cfg.fusion.store_dtype, progress=self.progress, label=label)
            self.note_runtime(f"distributions/{label}", tmp, used)
            _require_finite(ds, ("topk_logprobs", "ce", "bpb"), f"distributions/{label}",
                            f"model {label} gives non-finite log-probabilities (NaN/inf weights, or an overflow in "
                            f"{self.spec(label).dtype}: try dtype float32)")
            ds.save_to_disk(str(tmp / "dataset"))
            (tmp / "stats.json").write_text(json.dumps(_asdict(stats), indent=2))

        return self.stage(f"distributions/{label}", build)

    def vocab(self, label: str) -> Path:
        from fusion.vocab import build_vocab_map

        def build(tmp: Path) -> None:
            f = self.cfg.fusion
            vm = build_vocab_map(f.vocab_map, self.tokenizer(label), self.tokenizer(self.cfg.target.label),
                                 **f.vocab_options())
            np.save(tmp / "source_to_target.npy", vm.source_to_target)
            np.save(tmp / "prefixed_to_target.npy", vm.prefixed_to_target)
            (tmp / "summary.json").write_text(json.dumps(
                {"method": vm.method, "mapped": int((vm.source_to_target >= 0).sum()),
                 "source_vocab": int(vm.source_to_target.shape[0])}))

        return self.stage(f"vocab/{label}", build)

    def aligned(self, label: str, train_rows: list[dict]) -> Path:
        import datasets
        from fusion.distributions import topk_arrays
        from fusion.document import align_document
        from fusion.vocab import VocabMap

        def build(tmp: Path) -> None:
            f = self.cfg.fusion
            src_ds = datasets.load_from_disk(str(self.plan.path(f"distributions/{label}") / "dataset"))
            vocab_dir = self.plan.path(f"vocab/{label}")
            vm = VocabMap(np.load(vocab_dir / "source_to_target.npy"), f.vocab_map,
                          np.load(vocab_dir / "prefixed_to_target.npy"))
            target_rows = None
            if f.empty_rows == "target":  # the target's own top-k fills accepted rows left empty
                tgt_dist = self.plan.path(f"distributions/{self.cfg.target.label}")
                tgt_ds = datasets.load_from_disk(str(tgt_dist / "dataset"))
                target_rows = {r["doc_id"]: i for i, r in enumerate(tgt_ds.select_columns(["doc_id"]))}
            tgt_tok, src_tok = self.tokenizer(self.cfg.target.label), self.tokenizer(label)
            by_id = {r["doc_id"]: r for r in train_rows}
            out = {"doc_id": [], "ids": [], "probs": [], "ce": [], "bpb": []}
            n_one_to_one = n_target = 0
            for row in _iter(src_ds, self.progress, f"align {label}"):
                s_ids, s_lp, _ = topk_arrays(row, f.top_k)
                t_ids = t_lp = None
                if target_rows is not None:
                    t_ids, t_lp, _ = topk_arrays(tgt_ds[target_rows[row["doc_id"]]], f.top_k)
                doc = align_document(by_id[row["doc_id"]]["text"], tgt_tok, src_tok, s_ids, s_lp, vm,
                                     alignment=f.alignment, target_ids=t_ids, target_logprobs=t_lp,
                                     **f.aligned_options())
                ids, probs = doc.ids, doc.probs
                n_one_to_one += doc.n_one_to_one
                n_target += doc.n_target
                out["doc_id"].append(row["doc_id"])
                out["ids"].append(ids.reshape(-1).astype(np.int32))
                out["probs"].append(probs.reshape(-1).astype(np.float32))
                out["ce"].append(row["ce"])
                out["bpb"].append(row["bpb"])
            datasets.Dataset.from_dict(out).save_to_disk(str(tmp / "dataset"))
            (tmp / "stats.json").write_text(json.dumps({"target_positions": n_target,
                                                        "one_to_one_fraction": n_one_to_one / max(n_target, 1)}))

        return self.stage(f"aligned/{label}", build)

    def fused(self, train_rows: list[dict]) -> Path:
        import datasets
        from fusion.distributions import topk_arrays
        from fusion.document import fuse_document
        from fusion.fuse import Candidate
        from fusion.tokens import tokenize_document

        def build(tmp: Path) -> None:
            f = self.cfg.fusion
            k = f.top_k
            tgt_label = self.cfg.target.label
            tgt_ds = datasets.load_from_disk(str(self.plan.path(f"distributions/{tgt_label}") / "dataset"))
            src_labels = [s.label for s in self.cfg.sources if s.label != tgt_label]
            src_ds = {l: datasets.load_from_disk(str(self.plan.path(f"aligned/{l}") / "dataset")) for l in src_labels}
            src_rows = {l: {r["doc_id"]: i for i, r in enumerate(ds.select_columns(["doc_id"]))} for l, ds in src_ds.items()}
            params = {"weights": f.avgce_weights, "cut": f.avgce_cut} if f.fusion == "avgce" else {}
            tok = self.tokenizer(tgt_label)
            by_id = {r["doc_id"]: r for r in train_rows}
            out = {"doc_id": [], "input_ids": [], "fused_ids": [], "fused_probs": [], "k": []}
            chosen: dict[str, int] = {}
            for row in _iter(tgt_ds, self.progress, "fuse"):
                doc = row["doc_id"]
                tt = tokenize_document(tok, by_id[doc]["text"], add_bos=False, add_eos=True)
                t_ids, t_lp, _ = topk_arrays(row, k)
                cands = {tgt_label: Candidate(t_ids.astype(np.int32), np.exp(t_lp.astype(np.float32)),
                                              float(row[f.score]))}
                for l in src_labels:
                    r = src_ds[l][src_rows[l][doc]]
                    cands[l] = Candidate(np.asarray(r["ids"], dtype=np.int32).reshape(len(tt), -1),
                                         np.asarray(r["probs"], dtype=np.float32).reshape(len(tt), -1),
                                         float(r[f.score]))
                fused = fuse_document(cands, f.fusion, k, **params)
                if fused.chosen is not None:
                    chosen[fused.chosen] = chosen.get(fused.chosen, 0) + 1
                ids, probs = fused.ids, fused.probs
                out["doc_id"].append(doc)
                out["input_ids"].append(tt.ids.astype(np.int32))
                out["fused_ids"].append(np.asarray(ids, dtype=np.int32).reshape(-1))
                out["fused_probs"].append(np.asarray(probs, dtype=np.float32).reshape(-1))
                out["k"].append(int(np.asarray(ids).shape[1]))
            fused_ds = datasets.Dataset.from_dict(out)
            _require_finite(fused_ds, ("fused_probs",), "fused", "the fused distributions hold non-finite probabilities")
            fused_ds.save_to_disk(str(tmp / "dataset"))
            (tmp / "stats.json").write_text(json.dumps({"documents": len(out["doc_id"]), "mince_chosen": chosen}))

        return self.stage("fused", build)

    # -- training
    def checkpoint_dir(self, name: str) -> Path:
        """Where a training stage keeps its checkpoints: outside its temporary build folder (a killed run's
        folder is removed on the next start), keyed like the stage, removed once the stage is published."""
        return self.plan.cache.root / "_checkpoints" / f"{name.replace('/', '-')}-{self.plan.stages[name].key.key}"

    def train(self, name: str, dataset_fn: Callable[[], Any], lam: float) -> Path:
        from fusion.trainer import train_target

        label = name.split("/", 1)[1]  # the contestant: fusellm | clm

        def build(tmp: Path) -> None:
            lm = self.model(self.cfg.target.label, training=True)
            p = self.placement
            settings = train_settings(self.cfg, device=p.device, bf16=p.train_bf16(self.cfg.training.bf16))
            res = train_target(lm.model, lm.tokenizer, dataset_fn(), tmp / "model", settings,
                               lam=lam, temperature=self.cfg.fusion.temperature, verbose=self.progress,
                               loss_positions=self.cfg.fusion.loss_positions, label=label,
                               checkpoint_dir=self.checkpoint_dir(name), on_log=_curve_sink(self, label))
            record = _asdict(res)
            record["model_dir"] = "model"  # relative: the stage folder is renamed into place
            self.note_runtime(name, tmp, {"device": res.device, "dtype": res.precision})
            (tmp / "train_result.json").write_text(json.dumps(record, indent=2, default=float))

        path = self.stage(name, build)
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)  # the model is published: not needed
        return path

    def clm_dataset(self, train_rows: list[dict]):
        import datasets
        from fusion.tokens import tokenize_document

        tok = self.tokenizer(self.cfg.target.label)
        ids = [tokenize_document(tok, r["text"], add_bos=False, add_eos=True).ids.astype(np.int32) for r in train_rows]
        return datasets.Dataset.from_dict({"doc_id": [r["doc_id"] for r in train_rows], "input_ids": ids})

    def domain_pool(self, train_rows: list[dict]) -> Path:
        from baselines.domain_pool import train_domain_experts

        def build(tmp: Path) -> None:
            by_domain: dict[str, list[str]] = {}
            for r in train_rows:
                by_domain.setdefault(r["domain"], []).append(r["text"])
            from harness.models import load_model

            p = self.placement
            settings = train_settings(self.cfg, max_steps=self.cfg.baselines.domain_pool.max_steps, device=p.device,
                                      bf16=p.train_bf16(self.cfg.training.bf16))
            lm = load_model(self.spec(self.cfg.target.label), world=self.world, with_weights=False)
            experts = train_domain_experts(lm.path, by_domain, tmp / "experts", settings, lm.tokenizer,
                                           verbose=self.progress)
            self.note_runtime("domain_pool", tmp, {"device": _trained_on(settings.device),
                                                   "dtype": "bf16 mixed" if settings.bf16 else "float32"})
            (tmp / "experts.json").write_text(json.dumps({d: str(Path(p).relative_to(tmp)) for d, p in experts.items()}))

        return self.stage("domain_pool", build)

    def experts(self) -> dict[str, Path]:
        root = self.plan.path("domain_pool")
        return {d: root / p for d, p in json.loads((root / "experts.json").read_text()).items()}

    def merge(self, method: str, params: dict) -> Path:
        from baselines.merging import MERGE_METHODS, merge_models

        def build(tmp: Path) -> None:
            experts = self.experts()
            # methods on task vectors use the target (the experts' common ancestor) as the base
            base = Path(self.model_path(self.cfg.target.label)) if MERGE_METHODS.get(method).needs_base else None
            merge_models([experts[d] for d in sorted(experts)], method, tmp / "model", base_model=base, params=params,
                         device=self.placement.device)
            self.note_runtime(f"merge/{method}", tmp, {"device": self.placement.device, "dtype": "float32"})

        return self.stage(f"merge/{method}", build)

    def model_path(self, label: str) -> str:
        from harness.models import resolve

        return resolve(self.spec(label), world=self.world)

    # -- evaluation
    def evaluate(self, name: str, rows_by_domain: dict[str, list[str]]) -> pd.DataFrame:
        """The eval stage of one model (several rows for the domain pool): eval_long.csv (scores), plus the
        per-unit scores the intervals and paired tests resample (harness.stats): eval_items.csv (lm-eval's
        per-item scores) and eval_docs.csv (per held-out document nll and bytes)."""
        from harness.stats import DOC_COLUMNS, ITEM_COLUMNS

        def build(tmp: Path) -> None:
            frames, ppl, items, docs = [], [], [], []
            used = {}
            for label, lm_obj, tok_model in self.eval_models(name):
                used[label] = _where(lm_obj)
                scores, per_item = self.run_suites(label, lm_obj)
                frames.append(scores)
                items.append(per_item)
                if self.cfg.evaluation.perplexity.enabled and tok_model is not None:
                    rows, per_doc = self.run_perplexity(label, tok_model, rows_by_domain)
                    ppl.append(rows)
                    docs.append(per_doc)
            long = pd.concat(frames + ppl, ignore_index=True) if frames or ppl else pd.DataFrame()
            long.to_csv(tmp / "eval_long.csv", index=False)
            self.note_runtime(f"eval/{name}", tmp, used)
            for frame_list, columns, file in ((items, ITEM_COLUMNS, "eval_items.csv"),
                                              (docs, DOC_COLUMNS, "eval_docs.csv")):
                kept = [f for f in frame_list if len(f)]
                (pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=columns)).to_csv(
                    tmp / file, index=False)

        path = self.stage(f"eval/{name}", build)
        return pd.read_csv(path / "eval_long.csv")

    def eval_units(self, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(per-item scores, per-document nll) of a finished eval stage; empty frames for a stage cached
        before they were kept."""
        from harness.stats import DOC_COLUMNS, ITEM_COLUMNS

        path = self.plan.path(f"eval/{name}")
        out = []
        for file, columns in (("eval_items.csv", ITEM_COLUMNS), ("eval_docs.csv", DOC_COLUMNS)):
            f = path / file
            out.append(pd.read_csv(f) if f.is_file() and f.stat().st_size > 1 else pd.DataFrame(columns=columns))
        return out[0], out[1]

    def eval_models(self, name: str):
        """Yield (row label, model for lm-eval ((model, tokenizer) loaded once on the runtime device, or an LM),
        what perplexity scores: the same pair, or an LM with windowed_nll (the ensemble))."""
        from harness.models import load_model

        p = self.placement
        eval_dtype = p.dtype_for(self.cfg.evaluation.settings.dtype)

        def folder_pair(folder: Path):
            return _load_folder(folder, device=p.device, dtype=eval_dtype, attn_implementation=p.attn_implementation)

        def spec_pair(label: str):
            lm = load_model(self.spec(label), world=self.world, device=p.device, dtype=eval_dtype,
                            attn_implementation=p.attn_implementation)
            return lm.model, lm.tokenizer

        if name == "fusellm" or name == "clm":
            pair = folder_pair(self.plan.path(f"train/{name}") / "model")
            yield name, pair, pair
        elif name == "ensemble":
            from baselines.ensemble import EnsembleLM

            members = self.cfg.baselines.ensemble.members or [s.label for s in self.cfg.sources]
            loaded = [spec_pair(m) for m in members]
            pivot = self.tokenizer(self.cfg.target.label)
            s = self.cfg.evaluation.settings
            lm = EnsembleLM(members=loaded, pivot=pivot, device=p.device, dtype=eval_dtype,
                            combiner=self.cfg.baselines.ensemble.combiner,
                            weights=self.cfg.baselines.ensemble.weights, alignment=self.cfg.fusion.alignment,
                            vocab_map=self.cfg.fusion.vocab_map, batch_size=p.batch_size(s.batch_size),
                            max_gen_toks=s.max_gen_toks, names=members)
            yield name, lm, lm  # it scores held-out text itself (EnsembleLM.windowed_nll)
        elif name == "domain_pool":
            for domain, folder in sorted(self.experts().items()):
                pair = folder_pair(folder)
                yield f"expert:{domain}", pair, pair
        elif name.startswith("merge:"):
            pair = folder_pair(self.plan.path(f"merge/{name.split(':', 1)[1]}") / "model")
            yield name, pair, pair
        else:
            pair = spec_pair(name)
            yield name, pair, pair

    def run_suites(self, label: str, model) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(score rows, per-item scores) of `model` on the configured suites."""
        from harness.evaluation import EvalSettings, evaluate

        suites = self.cfg.evaluation.suites
        if not suites:
            return pd.DataFrame(), pd.DataFrame()
        s = self.cfg.evaluation.settings
        p = self.placement
        settings = EvalSettings(batch_size=s.batch_size, dtype=p.dtype_for(s.dtype), num_fewshot=s.num_fewshot,
                                seed=s.seed, limit=s.limit, max_gen_toks=s.max_gen_toks, bbh_variant=s.bbh_variant,
                                device=p.device, attn_implementation=p.attn_implementation)
        include = [self.world.tasks_dir] if self.world is not None else []
        data_dir = Path(self.cfg.evaluation.data_dir).expanduser() if self.cfg.evaluation.data_dir else None
        df, items = evaluate(model, list(suites), settings, data_dir=data_dir, include_paths=include,
                             model_name=label, progress=self.progress, return_items=True)
        df["model"] = label
        items["model"] = label
        return df, items

    def run_perplexity(self, label: str, model_tok, rows_by_domain: dict[str, list[str]]):
        """(score rows: bits per byte and token perplexity per domain, per-document nll rows) of one model."""
        from harness.evaluation.perplexity import lm_perplexity_by_domain, perplexity_by_domain

        p = self.cfg.evaluation.perplexity
        if hasattr(model_tok, "windowed_nll"):
            df, docs = lm_perplexity_by_domain(model_tok, rows_by_domain, window=p.window, stride=p.stride,
                                               per_document=True, progress=self.progress and label)
        else:
            model, tok = model_tok
            df, docs = perplexity_by_domain(model, tok, rows_by_domain, window=p.window, stride=p.stride,
                                            batch_size=self.placement.batch_size(self.cfg.evaluation.settings.batch_size),
                                            per_document=True, progress=self.progress and label)
        docs.insert(0, "model", label)
        rows = []
        for _, r in df.iterrows():
            for metric in ("bits_per_byte", "token_perplexity"):
                rows.append({"model": label, "suite": "perplexity", "task": r["domain"], "metric": metric,
                             "value": float(r[metric]), "stderr": float("nan"), "n": int(r["n_tokens"])})
        return pd.DataFrame(rows), docs


def _import_registered_methods() -> None:
    # Registries fill on import: make every built-in method available by name.
    import fusion.align  # noqa: F401
    import fusion.fuse  # noqa: F401
    import fusion.vocab  # noqa: F401


def _quiet_libraries() -> None:
    # Our own per-stage lines are the progress report; per-file "Loading weights" bars drown them.
    import datasets
    import transformers

    from harness.tracking import quiet_third_party

    quiet_third_party()

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _load_folder(folder: Path, device: str = "cpu", dtype: str | None = None, attn_implementation: str | None = None):
    """A saved HF folder (trained, expert, merged) -> (model on `device` in `dtype`, tokenizer), read once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"dtype": getattr(torch, dtype)} if dtype else {}
    if device != "cpu":
        kw["device_map"] = device  # weights read straight onto the GPU
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **kw)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def _where(lm_obj) -> dict:
    """Where an evaluated model ran: a (model, tokenizer) pair's parameters, or each ensemble member's."""
    from harness.runtime import observed

    if isinstance(lm_obj, tuple):
        return observed(lm_obj[0])
    members = getattr(lm_obj, "members", None)
    if members:
        return {"members": {m.name: observed(m.model) for m in members}}
    return {"device": str(getattr(lm_obj, "device", "?"))}


def _describe_used(used: dict) -> str:
    """runtime.json -> one line: "cuda:0 bfloat16", or "model=cuda:0 bfloat16; ..." for several models."""
    if "members" in used:
        return "; ".join(f"{m}={_describe_used(v)}" for m, v in used["members"].items())
    if "device" in used:
        return f"{used['device']} {used.get('dtype', '')}".strip()
    return "; ".join(f"{m}={_describe_used(v)}" for m, v in used.items())


def _trained_on(device: str | None) -> str:
    # what the HF Trainer does with FuseLab's device setting (fusion.trainer.training_arguments)
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return device if device and ":" in device else "cuda:0"


def stats_device(work: Path) -> str:
    """The devices the ranks of a sharded extraction ran on, from their stats files ("cpu", "cuda:0,cuda:1")."""
    found = []
    for f in sorted(Path(work).glob("shards/rank-*/stats.json")):
        d = json.loads(f.read_text()).get("device", "cpu")
        if d not in found:
            found.append(d)
    return ",".join(found) or "cpu"


def _iter(ds, progress: bool, desc: str):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(ds, desc=f"           {desc}", leave=False)
    return ds


def _asdict(obj) -> dict:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj):
        return asdict(obj)
    return dict(obj) if isinstance(obj, dict) else {"value": str(obj)}


def train_settings(cfg: ExperimentConfig, **overrides):
    """fusion.trainer.TrainSettings from the config's `training` section (its fields have the TrainSettings
    names) and the experiment seed; `overrides` (e.g. device, max_steps) win."""
    from fusion.trainer import TrainSettings

    return TrainSettings(**{**cfg.training.model_dump(), "seed": cfg.seed, **overrides})


def summarize(long: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """One row per model: each suite's average over its tasks of the task's primary metric (every task with a
    value counts, filtered generation metrics included: `harness.evaluation.suites.primary_scores`) and bits
    per byte per domain (`bpb_<domain>`) with their mean over domains (`bpb_avg`)."""
    from harness.evaluation.suites import primary_scores

    primary = primary_scores(long)
    rows = []
    for model in models:
        sub = long[long["model"] == model]
        row: dict[str, Any] = {"model": model}
        mine = primary[primary["model"] == model]
        for suite in dict.fromkeys(sub.loc[sub["suite"] != "perplexity", "suite"]):
            vals = pd.to_numeric(mine.loc[mine["suite"] == suite, "value"], errors="coerce").dropna()
            row[suite] = float(vals.mean()) if len(vals) else float("nan")
        bpb = sub[(sub["suite"] == "perplexity") & (sub["metric"] == "bits_per_byte")]
        for _, r in bpb.iterrows():
            row[f"bpb_{r['task']}"] = float(r["value"])
        if len(bpb):
            row["bpb_avg"] = float(bpb["value"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def method_of(model: str, cfg: ExperimentConfig) -> str:
    if model == "fusellm":
        return "FuseLLM"
    if model == "clm":
        return "CLM-only"
    if model == "ensemble":
        return "ensemble"
    if model.startswith("merge:"):
        return "merge"
    if model.startswith("expert:"):
        return "domain expert"
    return "target" if model == cfg.target.label else "source"


def run_experiment(cfg: ExperimentConfig, *, tracker=None, parent_run_id: str | None = None,
                   progress: bool | str = True, track: bool = True) -> ExperimentResult:
    """Run (or resume) the whole comparison and return its results; every stage is cached.

    progress: True prints stage lines, progress bars and training steps; "stages" one line per stage
    (`fuselab run --quiet`); False nothing. With tracking, metrics reach MLflow as stages finish
    (`harness.tracking.ExperimentRuns`), training curves at every logging step."""
    import torch

    torch.manual_seed(cfg.seed)
    _import_registered_methods()
    _quiet_libraries()
    plan = build_plan(cfg)
    evaluation_problems = check_evaluation(cfg)
    if evaluation_problems:  # before any stage runs, rather than after all the training
        from harness.config import ConfigError

        raise ConfigError("\n".join(evaluation_problems))
    problems = check_models(cfg, plan.hashes)
    if problems:  # before any stage runs: one line per problem, each naming the model
        from harness.models import ModelLoadError

        raise ModelLoadError("\n".join(problems))
    plan.cache.clean_stale()
    run_dir = workdir(cfg) / "runs" / f"{cfg.name}-{cfg.content_hash()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if tracker is None and track:
        from harness.tracking import Tracker

        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, workdir(cfg))
    if tracker is None:
        return _execute(plan, run_dir, progress, None)
    from harness.tracking import ExperimentRuns

    with tracker.run(cfg.name, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                     tags={"fuselab.kind": "experiment", "fuselab.config_hash": cfg.content_hash()}) as run:
        tracker.log_config(cfg)
        live = ExperimentRuns(tracker, run.info.run_id, tags={"fuselab.experiment": cfg.name})
        try:
            result = _execute(plan, run_dir, progress, tracker, live=live)
            tracker.log_params(runtime_params(cfg, run_dir))
            _track_result(tracker, result, cfg, live=live)
        except BaseException as exc:
            live.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        live.close()
        return result


def _execute(plan: Plan, run_dir: Path, progress: bool | str, tracker, live=None) -> ExperimentResult:
    cfg = plan.cfg
    t_all = time.perf_counter()
    r = StageRunner(plan, progress, tracker, live)
    if progress:
        print(f"FuseLab experiment {cfg.name} ({cfg.content_hash()}), cache {plan.cache.root}", flush=True)
    corpus, fused_path = r.prepare_fused()
    train_rows = corpus["train"]

    def fused_dataset():
        import datasets

        return datasets.load_from_disk(str(fused_path / "dataset"))

    r.train("train/fusellm", fused_dataset, lam=cfg.fusion.lam)
    if cfg.baselines.clm:
        r.train("train/clm", lambda: r.clm_dataset(train_rows), lam=1.0)
    if cfg.baselines.domain_pool.enabled:
        r.domain_pool(train_rows)
        for m in cfg.baselines.merges:
            r.merge(m.method, m.params)
    held_out = corpus.get("validation", [])
    limit = cfg.evaluation.perplexity.max_docs_per_domain
    by_domain: dict[str, list[str]] = {}
    for row in held_out:
        lst = by_domain.setdefault(row["domain"], [])
        if limit is None or len(lst) < limit:
            lst.append(row["text"])
    frames = [r.evaluate(name, by_domain) for name in evaluated_models(cfg)]
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    models = list(dict.fromkeys(long["model"])) if len(long) else []
    results = summarize(long, models)
    results.insert(1, "method", [method_of(m, cfg) for m in results["model"]])
    units = [r.eval_units(name) for name in evaluated_models(cfg)]
    intervals, comparisons = uncertainty_tables(long, pd.concat([u[0] for u in units], ignore_index=True),
                                                pd.concat([u[1] for u in units], ignore_index=True), results,
                                                seed=cfg.evaluation.settings.seed)
    losses = {}
    for name in ("fusellm", "clm"):
        p = plan.path(f"train/{name}") / "train_result.json" if f"train/{name}" in plan.stages else None
        if p is not None and p.is_file():
            rec = json.loads(p.read_text())
            for curve in ("losses", "clm_losses", "fusion_losses"):
                pts = sorted((int(step), float(v)) for step, v in rec.get(curve, {}).items())
                if pts:
                    losses[name if curve == "losses" else f"{name}/{curve.removesuffix('es')}"] = pts
    metrics: dict[str, float] = {}
    for _, row in results.iterrows():
        for col in results.columns[2:]:
            if isinstance(row[col], (int, float)) and not math.isnan(row[col]):
                metrics[f"{row['model']}/{col}"] = float(row[col])
    timings = dict(r.timings)
    timings["total"] = time.perf_counter() - t_all
    results.to_csv(run_dir / "results.csv", index=False)
    long.to_csv(run_dir / "eval_long.csv", index=False)
    intervals.to_csv(run_dir / "intervals.csv", index=False)
    comparisons.to_csv(run_dir / "comparisons.csv", index=False)
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    stage_times = pd.DataFrame(r.stage_log, columns=["stage", "seconds", "cached"])
    stage_times.to_csv(run_dir / "stage_times.csv", index=False)
    used = {n: json.loads((plan.path(n) / "runtime.json").read_text()) for n in plan.stages
            if (plan.path(n) / "runtime.json").is_file()}
    (run_dir / "runtime.json").write_text(json.dumps({"runtime": r.placement.params(), "stages": used}, indent=2))
    if progress:
        print(f"\nstages run {r.ran}, cached {r.hits}, total {timings['total']:.1f} s; results in {run_dir}")
    return ExperimentResult(cfg, results, long, metrics, losses, timings, run_dir, r.hits, r.ran, stage_times,
                            intervals=intervals, comparisons=comparisons)


def uncertainty_tables(long: pd.DataFrame, items: pd.DataFrame, docs: pd.DataFrame, results: pd.DataFrame, *,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(intervals, comparisons) of a results table: every score's bootstrap interval (`harness.stats.
    score_intervals`) and every model's paired tests against the target and against CLM-only
    (`harness.stats.paired_comparisons`), seeded with the evaluation seed."""
    from harness.stats import paired_comparisons, score_intervals

    models = list(results["model"]) if len(results) else []
    refs = {}
    for label in ("target", "CLM-only"):
        hit = results.loc[results["method"] == label, "model"] if len(results) else []
        if len(hit):
            refs[label] = str(hit.iloc[0])
    if not len(long):
        return score_intervals(long, items, docs, []), paired_comparisons(long, items, docs, [], {})
    return (score_intervals(long, items, docs, models, seed=seed),
            paired_comparisons(long, items, docs, models, refs, seed=seed))


def runtime_params(cfg: ExperimentConfig, run_dir: Path) -> dict[str, str]:
    """MLflow params: the resolved runtime (placement.device, ...) and where each model-running stage ran
    (device/<stage> = "cuda:0 bfloat16"; several models: "<model>=<device> <dtype>; ..."), from runtime.json."""
    rec = json.loads((run_dir / "runtime.json").read_text())
    out = {f"placement.{k}": str(v) for k, v in rec["runtime"].items()}  # runtime.* holds the config as written

    for stage, used in rec["stages"].items():
        out["device/" + stage.replace(":", "_")] = _describe_used(used)[:500]
    return out


def _require_finite(ds, columns: tuple[str, ...], stage: str, what: str) -> None:
    """Refuse to write a dataset with NaN/inf in `columns` (flat or list columns): name the stage, the
    document and what is wrong, instead of caching values that fail (or silently skew) later stages."""
    import pyarrow as pa

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    for col in columns:
        arr = table.column(col).combine_chunks()
        nested = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
        flat = arr.flatten() if nested else arr
        bad = ~np.isfinite(np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32))
        if not bad.any():
            continue
        first = int(np.argmax(bad))
        if nested:  # the document (row) holding the first bad value
            offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False))
            first = int(np.searchsorted(offsets - offsets[0], first, side="right") - 1)
        doc = ds[first]["doc_id"] if "doc_id" in ds.column_names else first
        from harness.models import NonFiniteError

        raise NonFiniteError(f"{stage}: {what}: {int(bad.sum())} of {bad.size} values in column {col} "
                             f"are NaN/inf (first in doc_id {doc}); nothing was cached")


def _built_seconds(stage_dir: Path) -> float:
    """How long a cached stage took to build (from its _meta.json); NaN for stages built before this was kept."""
    try:
        return float(json.loads((stage_dir / "_meta.json").read_text()).get("build_seconds", math.nan))
    except (OSError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------ live tracking
def contestant_params(cfg: ExperimentConfig, model: str) -> dict[str, Any]:
    """What defines one contestant of the comparison, as MLflow params of its child run (so that the MLflow
    Compare page shows what differs): method and seed for all; the model reference of a source/target; the
    fusion settings and lambda of FuseLLM; the training settings of everything trained; the ensemble's
    combination; a merge's method and parameters; an expert's domain."""
    method = method_of(model, cfg)
    params: dict[str, Any] = {"method": method, "seed": cfg.seed, "target": cfg.target.label}
    training = cfg.training.model_dump(mode="json")
    if method in ("source", "target"):
        spec = next((s for s in [cfg.target, *cfg.sources] if s.label == model), None)
        if spec is not None:  # a results table from elsewhere may name models this config does not have
            params["model"] = {"ref": spec.ref, "revision": spec.revision, "dtype": spec.dtype}
    elif model == "fusellm":
        params.update(lam=cfg.fusion.lam, fusion=cfg.fusion.model_dump(mode="json"), training=training)
    elif model == "clm":
        params.update(lam=1.0, training=training)
    elif model == "ensemble":
        e = cfg.baselines.ensemble
        params["ensemble"] = {**e.model_dump(mode="json"), "members": e.members or [s.label for s in cfg.sources],
                              "alignment": cfg.fusion.alignment, "vocab_map": cfg.fusion.vocab_map}
    elif model.startswith("expert:"):
        params.update(domain=model.split(":", 1)[1], lam=1.0,
                      training={**training, "max_steps": cfg.baselines.domain_pool.max_steps})
    elif model.startswith("merge:"):
        method_name = model.split(":", 1)[1]
        merge = next((m for m in cfg.baselines.merges if m.method == method_name), None)
        params["merge"] = merge.model_dump(mode="json") if merge is not None else {"method": method_name}
        params["experts_max_steps"] = cfg.baselines.domain_pool.max_steps
    return params


def _stage_contestant(cfg: ExperimentConfig, name: str) -> str | None:
    """The contestant whose child run gets a stage's outputs (None: the experiment's own run)."""
    kind, _, rest = name.partition("/")
    if kind in ("distributions", "vocab", "aligned"):
        return rest
    if kind == "fused":
        return "fusellm"
    if kind == "train":
        return rest
    if kind == "merge":
        return f"merge:{rest}"
    return None


def _contestant_run(live, cfg: ExperimentConfig, model: str) -> str:
    return live.child(model, method=method_of(model, cfg), params=contestant_params(cfg, model))


def _stage_metrics(kind: str, path: Path) -> dict[str, float]:
    """A finished stage's own figures, named `<kind>/<figure>` (child-run metrics with a "/" stay out of the
    results table read back from MLflow)."""
    from harness.tracking import flatten

    files = {"distributions": "stats.json", "vocab": "summary.json", "aligned": "stats.json", "fused": "stats.json",
             "train": "train_result.json"}
    f = path / files.get(kind, "")
    if kind not in files or not f.is_file():
        return {}
    data = json.loads(f.read_text())
    if kind == "train":
        data = {"runtime_s" if k == "train_runtime" else k: data[k]
                for k in ("train_runtime", "tokens", "tokens_per_s", "flops_per_s", "resumed_from_step", "steps_run")
                if k in data}
    if kind == "vocab" and data.get("source_vocab"):
        data["mapped_fraction"] = data["mapped"] / data["source_vocab"]
    return {f"{kind}/{k}": float(v) for k, v in flatten(data).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _score_metrics(long: pd.DataFrame, model: str) -> tuple[dict[str, float], dict[str, float]]:
    """(suite averages and bits per byte as in the results table, every per-task metric `suite/task/metric`)."""
    sub = long[long["model"] == model]
    row = summarize(long, [model]).iloc[0]
    scores = {c: float(row[c]) for c in row.index[1:] if isinstance(row[c], (int, float)) and not math.isnan(row[c])}
    per_task = {f"{r.suite}/{r.task}/{r.metric}": float(r.value) for r in sub.itertuples()
                if isinstance(r.value, (int, float)) and not math.isnan(r.value)}
    return scores, per_task


def _track_stage(r: "StageRunner", name: str, seconds: float, cached: bool) -> None:
    """Stream a finished stage to MLflow: its build time to the experiment's run, its figures to its
    contestant's run; an evaluation logs each model's scores (to its run and, as `<model>/<score>`, to the
    experiment's run) and ends that model's run. A tracking error is reported and the experiment goes on
    (the summary logged at the end still fails loudly)."""
    live = r.live
    if live is None or name == "world":
        return
    try:
        kind, _, rest = name.partition("/")
        path = r.plan.path(name)
        if not cached:
            live.log_stage(name, seconds)
        if kind == "eval":
            long = pd.read_csv(path / "eval_long.csv")
            for model in dict.fromkeys(long["model"]) if len(long) else []:
                run_id = _contestant_run(live, r.cfg, model)
                scores, per_task = _score_metrics(long, model)
                live.log_new(run_id, {**scores, **per_task})
                live.log_new(live.parent_run_id, {f"{model}/{k}": v for k, v in scores.items()})
                live.logged.add(f"eval:{model}")
                live.finish(model)
            return
        label = _stage_contestant(r.cfg, name)
        if label is not None:
            live.log_new(_contestant_run(live, r.cfg, label), _stage_metrics(kind, path))
    except Exception as exc:
        log.warning("MLflow: could not log stage %s as it finished (%s: %s); the run goes on", name,
                    type(exc).__name__, exc)


def _curve_sink(r: "StageRunner", label: str):
    """The training-curve sink of contestant `label` (`fusion.trainer.train_target(on_log=...)`), or None."""
    if r.live is None:
        return None
    try:
        _contestant_run(r.live, r.cfg, label)
        return r.live.curve_sink(label)
    except Exception as exc:
        log.warning("MLflow: no live training curve for %s (%s: %s)", label, type(exc).__name__, exc)
        return None


def _track_result(tracker, result: ExperimentResult, cfg: ExperimentConfig, live=None) -> None:
    """Log a finished experiment to the open run of `tracker`: one nested run per model/method (so the MLflow
    UI compares them side by side) with its params, scores and training curve; the results tables. With
    `live` (the runs it streamed to while the experiment ran) only what did not go out live is logged."""
    for _, row in result.results.iterrows():
        model = str(row["model"])
        scores, per_task = _score_metrics(result.eval_long, model) if len(result.eval_long) else ({}, {})
        scores.update({c: float(row[c]) for c in result.results.columns[2:]
                       if isinstance(row[c], (int, float)) and not math.isnan(row[c])})
        if live is not None:
            run_id = _contestant_run(live, cfg, model)
            live.log_new(run_id, {**scores, **per_task})
            if model in result.losses and f"curve:{model}" not in live.logged:
                tracker.log_curve("train_loss", result.losses[model], run_id=run_id)
            live.finish(model)
            continue
        with tracker.run(model, nested=True, tags={"fuselab.method": row["method"], "fuselab.model": model,
                                                   "fuselab.experiment": cfg.name}):
            tracker.log_params(contestant_params(cfg, model))
            tracker.log_metrics({**scores, **per_task})
            if model in result.losses:
                tracker.log_curve("train_loss", result.losses[model])
    if live is not None:
        live.log_new(live.parent_run_id, result.metrics)
    else:
        tracker.log_metrics(result.metrics)
    tracker.log_metrics({f"stage_seconds/{k}": v for k, v in result.stage_timings.items()
                         if live is None or f"stage:{k}" not in live.logged})
    tracker.log_metrics({"cache_hits": result.cache_hits, "stages_run": result.stages_run})
    for name, pts in result.losses.items():
        if live is None or f"curve:{name.split('/')[0]}" not in live.logged:
            tracker.log_curve(f"loss/{name}", pts)
    tracker.log_table(result.results, "results.csv")
    tracker.log_table(result.eval_long, "eval_long.csv")
    for name in ("intervals", "comparisons"):
        table = getattr(result, name, None)
        if table is not None and len(table):
            tracker.log_table(table, f"{name}.csv")
    if len(result.stage_times):
        tracker.log_table(result.stage_times, "stage_times.csv")
