"""A source's distributions moved onto the target's tokenization, document by document
(`fusion.document.align_document`). Output: `dataset/` (doc_id, ids [n_t*k], probs [n_t*k], ce, bpb) and
`stats.json` (target positions, fraction aligned one-to-one)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.config import ModelSpec
from harness.stages.base import Stage, no_key
from harness.stages.corpus import CorpusStage
from harness.stages.distributions import DistributionsStage
from harness.stages.vocab import VocabStage, read_vocab_map


@dataclass(eq=False)
class AlignedStage(Stage):
    kind: ClassVar[str] = "aligned"

    corpus: CorpusStage
    source_distributions: DistributionsStage
    target_distributions: DistributionsStage
    vocab: VocabStage
    alignment: str  # a name in fusion.registry.ALIGNMENTS
    fallback: str  # fusion.fallback_onehot
    duplicates: str  # fusion.duplicate_ids
    position0: str  # fusion.position0
    empty_rows: str  # fusion.empty_rows
    source_spec: ModelSpec = no_key(default=None)
    target_spec: ModelSpec = no_key(default=None)

    def build(self, out: Path, env) -> None:
        import datasets

        from fusion.distributions import topk_arrays

        k = self.source_distributions.k
        src_ds = datasets.load_from_disk(str(env.path(self.source_distributions) / "dataset"))
        target_rows = self._target_rows(env)
        by_id = {r["doc_id"]: r for r in env.corpus_rows(self.corpus)["train"]}
        cols = {"doc_id": [], "ids": [], "probs": [], "ce": [], "bpb": []}
        n_one_to_one = n_target = 0
        for row in env.iterate(src_ds, f"align {self.source_spec.label}"):
            s_ids, s_lp, _ = topk_arrays(row, k)
            t_ids = t_lp = None
            if target_rows is not None:
                t_ids, t_lp, _ = topk_arrays(target_rows(row["doc_id"]), k)
            doc = self._align(by_id[row["doc_id"]]["text"], s_ids, s_lp, t_ids, t_lp, env)
            n_one_to_one += doc.n_one_to_one
            n_target += doc.n_target
            cols["doc_id"].append(row["doc_id"])
            cols["ids"].append(doc.ids.reshape(-1).astype(np.int32))
            cols["probs"].append(doc.probs.reshape(-1).astype(np.float32))
            cols["ce"].append(row["ce"])
            cols["bpb"].append(row["bpb"])
        datasets.Dataset.from_dict(cols).save_to_disk(str(out / "dataset"))
        (out / "stats.json").write_text(json.dumps({"target_positions": n_target,
                                                    "one_to_one_fraction": n_one_to_one / max(n_target, 1)}))

    def _align(self, text: str, s_ids, s_lp, t_ids, t_lp, env):
        from fusion.document import align_document

        if "_vm" not in self.__dict__:
            self.__dict__["_vm"] = read_vocab_map(env.path(self.vocab), self.vocab.method)
        return align_document(text, env.tokenizer(self.target_spec), env.tokenizer(self.source_spec), s_ids, s_lp,
                              self.__dict__["_vm"], alignment=self.alignment, target_ids=t_ids,
                              target_logprobs=t_lp, fallback_onehot=self.fallback, duplicate_ids=self.duplicates,
                              position0=self.position0, empty_rows=self.empty_rows)

    def _target_rows(self, env):
        """doc_id -> the target's stored row, when accepted rows left empty take the target's own top-k."""
        if self.empty_rows != "target":
            return None
        import datasets

        tgt_ds = datasets.load_from_disk(str(env.path(self.target_distributions) / "dataset"))
        index = {r["doc_id"]: i for i, r in enumerate(tgt_ds.select_columns(["doc_id"]))}
        return lambda doc_id: tgt_ds[index[doc_id]]
