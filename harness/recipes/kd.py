"""Knowledge distillation (the paper's Table 6 baseline): the target trained on one teacher's top-k next-token
distributions, with FuseLLM's loss and lambda (lam * CLM + (1 - lam) * fusion term) and no alignment: the teacher
shares the target's tokenizer, so its distribution at position t is already the target's.

Stages: the teacher's distributions (`DistributionsStage`), `TeacherSetStage` (the teacher's top-k in the fused
layout), then a `TrainStage`. Contestant: `kd` (method kind "KD"). The teacher is a configured model
(`teacher: {ref: ...}`), or, in the micro world, `micro_teacher`: a wider copy of the micro target trained once
(`MicroTeacherStage`) on the target's own training mix, so that it has the target's tokenizer.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.config import ModelSpec
from harness.contestants import Contestant, StageModel
from harness.methods import common_params, register_method, trained_params
from harness.stages.base import Stage, no_key
from harness.stages.checks import require_finite
from harness.stages.corpus import CorpusStage
from harness.stages.distributions import DistributionsStage

KD = "KD"


class TokenizerMismatch(ValueError):
    """The teacher tokenizes a document differently from the target (KD needs one tokenizer)."""


@dataclass(eq=False)
class TeacherSetStage(Stage):
    """The teacher's top-k per target position as a training set: doc_id, input_ids, fused_ids, fused_probs
    [n * k], k (the layout of the fused set, so `TrainStage` trains on it unchanged)."""

    kind: ClassVar[str] = "teacher_set"

    teacher_distributions: DistributionsStage
    corpus: CorpusStage = no_key(default=None)
    target_spec: ModelSpec = no_key(default=None)
    teacher_label: str = no_key(default="teacher")

    def build(self, out: Path, env) -> None:
        import datasets

        from fusion.distributions import topk_arrays
        from fusion.tokens import tokenize_document

        k = self.teacher_distributions.k
        tok = env.tokenizer(self.target_spec)
        by_id = {r["doc_id"]: r for r in env.corpus_rows(self.corpus)["train"]}
        cols = {"doc_id": [], "input_ids": [], "fused_ids": [], "fused_probs": [], "k": []}
        for row in env.iterate(datasets.load_from_disk(str(env.path(self.teacher_distributions) / "dataset")),
                               f"teacher {self.teacher_label}"):
            tt = tokenize_document(tok, by_id[row["doc_id"]]["text"], add_bos=False, add_eos=True)
            if int(row["n_tokens"]) != len(tt):
                raise TokenizerMismatch(
                    f"{self.name}: teacher {self.teacher_label} has {row['n_tokens']} tokens in doc_id "
                    f"{row['doc_id']}, the target {self.target_spec.label} {len(tt)}; KD needs a teacher with the "
                    "target's tokenizer (use FuseLLM for teachers with other vocabularies)")
            ids, logprobs, _ = topk_arrays(row, k)
            cols["doc_id"].append(row["doc_id"])
            cols["input_ids"].append(tt.ids.astype(np.int32))
            cols["fused_ids"].append(ids.astype(np.int32).reshape(-1))
            cols["fused_probs"].append(np.exp(logprobs.astype(np.float32)).reshape(-1))
            cols["k"].append(k)
        ds = datasets.Dataset.from_dict(cols)
        require_finite(ds, ("fused_probs",), self.name, f"teacher {self.teacher_label} gives non-finite probabilities")
        ds.save_to_disk(str(out / "dataset"))
        (out / "stats.json").write_text(json.dumps({"documents": len(cols["doc_id"]), "k": k}))


@dataclass(eq=False)
class MicroTeacherStage(Stage):
    """A wider model of the micro target's family, trained from scratch like the micro sources
    (`harness.micro.sources.train_source`) on the target's training mix, so with the target's tokenizer (checked).
    Output: `model/` (HF folder) and `stats.json` (its validation bits per byte per domain, training time)."""

    kind: ClassVar[str] = "micro_teacher"

    world: Stage
    base: str  # the micro model it widens (the target)
    hidden: int
    layers: int
    heads: int
    steps: int
    seed: int  # the micro world's seed (the training mix and the model's initialisation)

    def build(self, out: Path, env) -> None:
        from dataclasses import replace

        from harness.micro import SOURCE_SPECS, TrainSizes
        from harness.micro.sources import train_source

        base = next(s for s in SOURCE_SPECS if s.name == self.base)
        spec = replace(base, name=f"{base.name}-wide", hidden=self.hidden, layers=self.layers, heads=self.heads)
        with _process_state_kept():  # train_source sets one thread, deterministic kernels and the RNGs
            result = train_source(spec, self.seed, replace(TrainSizes(), steps=self.steps),
                                  env.world.root / "corpus", out / "model", progress=env.progress, mix_of=base.name)
        mine, theirs = (Path(d) / "tokenizer.json" for d in (out / "model", env.world.models[self.base]))
        if mine.read_bytes() != theirs.read_bytes():
            raise TokenizerMismatch(f"{self.name}: the teacher's tokenizer differs from {self.base}'s although both "
                                    "were trained on the same mix")
        (out / "stats.json").write_text(json.dumps({"seconds": result["seconds"], "final_loss": result["final_loss"],
                                                    "validation_bpb": result["validation_bpb"]}))


@contextlib.contextmanager
def _process_state_kept():
    """Restore torch's thread count, deterministic-algorithms flag and RNG states, and Python's RNG, afterwards:
    the stages that run next in this process compute as they would had the teacher been cached."""
    import random

    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(torch_rng)
        random.setstate(py_rng)


class MicroTeacher(BaseModel):
    """Size of the micro teacher: the target is hidden 96, 3 layers, 4 heads, 400 steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    steps: int = Field(1000, ge=1)  # at 400 (the target's) 128 x 4 was worse than the target on docs


class KDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: ModelSpec | None = None  # shares the target's tokenizer (e.g. a larger model of the target's family)
    micro_teacher: MicroTeacher | None = None  # micro world: a wider copy of the micro target, trained once
    lam: float | None = Field(None, ge=0.0, le=1.0)  # default: fusion.lam, as the paper compares them

    @model_validator(mode="after")
    def _one_teacher(self):
        if (self.teacher is None) == (self.micro_teacher is None):
            raise ValueError("give the teacher: either teacher (a model sharing the target's tokenizer) or "
                             "micro_teacher (a wider micro target, trained once), not both")
        return self


def teacher_of(g, params: KDParams) -> tuple[ModelSpec, list[Stage], dict]:
    """(the teacher's spec, the stages that build it, its identity)."""
    if params.teacher is not None:
        return params.teacher, [], g.identity(params.teacher)
    ref = g.target.model_ref
    if ref.kind != "micro" or g.world is None:
        raise ValueError(f"methods.kd.micro_teacher: needs a micro target (micro:NAME), not {g.target.ref}")
    m = params.micro_teacher
    built = g.add(MicroTeacherStage(f"micro_teacher/{ref.name}", g.world, ref.name, m.hidden, m.layers, m.heads,
                                    m.steps, g.cfg.world.seed))
    spec = ModelSpec(name=f"{ref.name}-wide", ref=str(g.cache.path(built.key) / "model"))
    return spec, [built], {"kind": "stage", "built_by": str(built.key), "dtype": spec.dtype}


@register_method("kd", params=KDParams, reference="Wan et al. 2024, Table 6 (knowledge distillation)")
def kd(g, params: KDParams) -> list[Contestant]:
    teacher, built, ident = teacher_of(g, params)
    f = g.cfg.fusion
    if not built:  # a configured model: its distributions as any model's (shared when it is also a source)
        dists = g.distributions_of(teacher)
    else:
        dists = g.add(DistributionsStage(f"distributions/{teacher.label}", g.corpus, ident, f.top_k, f.store_dtype,
                                         batch_size=f.extraction_batch_size, spec=teacher, device=g.cfg.runtime.device,
                                         numerics=g.placement.key_settings(teacher.dtype), requires=built))
    data = g.add(TeacherSetStage(f"teacher_set/{teacher.label}", dists, corpus=g.corpus, target_spec=g.target,
                                 teacher_label=teacher.label))
    lam = f.lam if params.lam is None else params.lam
    st = g.train("train/kd", data, lam)
    info = {**common_params(g, KD), **trained_params(g, lam), "teacher": teacher.model_dump(mode="json")}
    if params.micro_teacher is not None:
        info["micro_teacher"] = params.micro_teacher.model_dump(mode="json")
    return [Contestant("kd", KD, StageModel("kd", st), made_by=[st], losses_from=st, params=info,
                       figures_from=[*built, data, st])]
