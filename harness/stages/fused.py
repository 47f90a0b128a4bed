"""The fused training set: per document the target's tokens and the fusion of the target's and the aligned
sources' distributions (`fusion.document.fuse_document`). Output: `dataset/` (doc_id, input_ids, fused_ids,
fused_probs [n*k], k) and `stats.json` (documents, how often MinCE chose each model)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.config import ModelSpec
from harness.stages.aligned import AlignedStage
from harness.stages.base import Stage, no_key
from harness.stages.checks import require_finite
from harness.stages.corpus import CorpusStage
from harness.stages.distributions import DistributionsStage


@dataclass(eq=False)
class FusedStage(Stage):
    kind: ClassVar[str] = "fused"
    version: ClassVar[int] = 2  # 2: AvgCE renormalises each candidate before weighting

    target_distributions: DistributionsStage
    aligned: list[AlignedStage]  # one per source other than the target, in source order
    fusion: str  # a name in fusion.registry.FUSIONS
    params: dict  # that function's parameters (avgce: weights, cut)
    score: str  # "ce" | "bpb": the candidates' quality score
    top_k: int
    corpus: CorpusStage = no_key(default=None)  # the documents' texts (keyed through the distributions)
    target_spec: ModelSpec = no_key(default=None)
    source_labels: list[str] = no_key(default_factory=list)  # of `aligned`, same order

    def build(self, out: Path, env) -> None:
        import datasets

        from fusion.tokens import tokenize_document

        tgt_ds = datasets.load_from_disk(str(env.path(self.target_distributions) / "dataset"))
        sources = {lab: _Rows(env.path(st)) for lab, st in zip(self.source_labels, self.aligned)}
        tok = env.tokenizer(self.target_spec)
        by_id = {r["doc_id"]: r for r in env.corpus_rows(self.corpus)["train"]}
        cols = {"doc_id": [], "input_ids": [], "fused_ids": [], "fused_probs": [], "k": []}
        chosen: dict[str, int] = {}
        for row in env.iterate(tgt_ds, "fuse"):
            doc = row["doc_id"]
            tt = tokenize_document(tok, by_id[doc]["text"], add_bos=False, add_eos=True)
            fused = self._fuse(row, len(tt), sources)
            if fused.chosen is not None:
                chosen[fused.chosen] = chosen.get(fused.chosen, 0) + 1
            cols["doc_id"].append(doc)
            cols["input_ids"].append(tt.ids.astype(np.int32))
            cols["fused_ids"].append(fused.ids.reshape(-1))
            cols["fused_probs"].append(fused.probs.reshape(-1))
            cols["k"].append(int(fused.ids.shape[1]))
        ds = datasets.Dataset.from_dict(cols)
        require_finite(ds, ("fused_probs",), self.name, "the fused distributions hold non-finite probabilities")
        ds.save_to_disk(str(out / "dataset"))
        (out / "stats.json").write_text(json.dumps({"documents": len(cols["doc_id"]), "mince_chosen": chosen}))

    def _fuse(self, target_row: dict, n_target: int, sources: dict[str, "_Rows"]):
        """fusion.document.FusedDocument of one document: the target's own top-k, then each aligned source."""
        from fusion.distributions import topk_arrays
        from fusion.document import fuse_document
        from fusion.fuse import Candidate

        t_ids, t_lp, _ = topk_arrays(target_row, self.top_k)
        cands = {self.target_spec.label: Candidate(t_ids.astype(np.int32), np.exp(t_lp.astype(np.float32)),
                                                   float(target_row[self.score]))}
        for lab, rows in sources.items():
            r = rows[target_row["doc_id"]]
            cands[lab] = Candidate(np.asarray(r["ids"], dtype=np.int32).reshape(n_target, -1),
                                   np.asarray(r["probs"], dtype=np.float32).reshape(n_target, -1),
                                   float(r[self.score]))
        return fuse_document(cands, self.fusion, self.top_k, **self.params)


@dataclass
class _Rows:
    """An aligned stage's dataset, read by doc_id."""

    folder: Path
    ds: object = field(init=False)
    index: dict = field(init=False)

    def __post_init__(self):
        import datasets

        self.ds = datasets.load_from_disk(str(Path(self.folder) / "dataset"))
        self.index = {r["doc_id"]: i for i, r in enumerate(self.ds.select_columns(["doc_id"]))}

    def __getitem__(self, doc_id: int) -> dict:
        return self.ds[self.index[doc_id]]
