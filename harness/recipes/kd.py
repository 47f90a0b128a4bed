"""Knowledge distillation (the paper's Table 6 baseline): the target trained on one teacher's top-k next-token
distributions, with FuseLLM's loss and lambda (lam * CLM + (1 - lam) * fusion term) and no alignment: the teacher
shares the target's tokenizer, so its distribution at position t is already the target's.

Stages: the teacher's distributions (`DistributionsStage`), `TeacherSetStage` (the teacher's top-k in the fused
layout), then a `TrainStage`. Contestant: `kd` (method kind "KD").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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


class KDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: ModelSpec  # shares the target's tokenizer (e.g. a larger model of the target's family)
    lam: float | None = Field(None, ge=0.0, le=1.0)  # default: fusion.lam, as the paper compares them


@register_method("kd", params=KDParams, reference="Wan et al. 2024, Table 6 (knowledge distillation)")
def kd(g, params: KDParams) -> list[Contestant]:
    teacher = params.teacher
    dists = g.distributions_of(teacher)
    data = g.add(TeacherSetStage(f"teacher_set/{teacher.label}", dists, corpus=g.corpus, target_spec=g.target,
                                 teacher_label=teacher.label))
    lam = g.cfg.fusion.lam if params.lam is None else params.lam
    st = g.train("train/kd", data, lam)
    params = {**common_params(g, KD), **trained_params(g, lam), "teacher": teacher.model_dump(mode="json")}
    return [Contestant("kd", KD, StageModel("kd", st), made_by=[st], losses_from=st, params=params,
                       figures_from=[data, st])]
