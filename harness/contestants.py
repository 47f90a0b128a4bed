"""The models an experiment compares, one `Contestant` each: its label (the results row), its method kind, the
stages that make it, how its models are loaded for evaluation, and what defines it (its MLflow params).

Evaluation (one `eval/<label>` stage per contestant), the results table, MLflow's child runs and the report all
iterate the experiment's contestant list (`Plan.contestants`); nothing dispatches on label strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.config import ModelSpec
from harness.stages.base import Stage

# Method kinds of the built-in contestants (the results' `method` column).
SOURCE, TARGET, CLM, FUSELLM, ENSEMBLE, EXPERT, MERGE = (
    "source", "target", "CLM-only", "FuseLLM", "ensemble", "domain expert", "merge")


@dataclass
class EvalModel:
    """One model to evaluate: label (its results row), lm_eval (what lm-eval scores: a (model, tokenizer) pair
    or an lm-eval LM) and scorer (what scores held-out text: (model, tokenizer), an LM with `windowed_nll`, or
    None for no bits per byte)."""

    label: str
    lm_eval: Any
    scorer: Any
    params: dict = field(default_factory=dict)  # what this row adds to its contestant's params (an expert's domain)


Loader = Callable[[Any, str], Iterator[EvalModel]]  # (env, declared eval dtype) -> the contestant's models


@dataclass(eq=False)
class Contestant:
    """label: the results row (and the eval stage `eval/<label>`); method: its method kind; loader: (env, dtype)
    -> EvalModels (several rows for a pool); made_by: the stages that produce its models ([] for a given model);
    identity: a given model's content identity (its eval key); key_extra: other settings its scores depend on;
    losses_from: the training stage whose loss curves belong to it; params: what defines it (MLflow params of
    its child run); figures_from: stages whose own figures (stats) are logged to its child run."""

    label: str
    method: str
    loader: Loader
    made_by: list[Stage] = field(default_factory=list)
    identity: dict | None = None
    key_extra: dict = field(default_factory=dict)
    losses_from: Stage | None = None
    params: dict = field(default_factory=dict)
    figures_from: list[Stage] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- loaders
@dataclass
class GivenModel:
    """A model from the config (target or source), loaded through harness.models on the runtime placement."""

    spec: ModelSpec

    def __call__(self, env, dtype: str) -> Iterator[EvalModel]:
        lm = env.load(self.spec, dtype=dtype)
        pair = (lm.model, lm.tokenizer)
        yield EvalModel(self.spec.label, pair, pair)


@dataclass
class StageModel:
    """The `model/` folder a stage wrote (a trained target, a merge)."""

    label: str
    stage: Stage

    def __call__(self, env, dtype: str) -> Iterator[EvalModel]:
        pair = env.load_folder(env.path(self.stage) / "model", dtype)
        yield EvalModel(self.label, pair, pair)


@dataclass
class PoolModels:
    """Every expert of a domain pool, one row each (`expert:<domain>`)."""

    stage: Stage

    def __call__(self, env, dtype: str) -> Iterator[EvalModel]:
        from harness.stages.domain_pool import read_experts

        for domain, folder in sorted(read_experts(env.path(self.stage)).items()):
            pair = env.load_folder(Path(folder), dtype)
            yield EvalModel(f"expert:{domain}", pair, pair, {"domain": domain})


@dataclass
class EnsembleModel:
    """The output ensemble of `members` on the pivot's (the target's) tokenization (baselines.ensemble)."""

    label: str
    members: list[ModelSpec]
    pivot: ModelSpec
    combiner: str
    weights: list[float] | None
    alignment: str
    vocab_map: str
    batch_size: int | str
    max_gen_toks: int

    def __call__(self, env, dtype: str) -> Iterator[EvalModel]:
        from baselines.ensemble import EnsembleLM

        p = env.placement
        loaded = [env.load(m, dtype=dtype) for m in self.members]
        lm = EnsembleLM(members=[(x.model, x.tokenizer) for x in loaded], pivot=env.tokenizer(self.pivot),
                        device=p.device, dtype=p.dtype_for(dtype), combiner=self.combiner, weights=self.weights,
                        alignment=self.alignment, vocab_map=self.vocab_map, batch_size=p.batch_size(self.batch_size),
                        max_gen_toks=self.max_gen_toks, names=[m.label for m in self.members])
        yield EvalModel(self.label, lm, lm)  # it scores held-out text itself (EnsembleLM.windowed_nll)
