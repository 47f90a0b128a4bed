"""Fusion diagnostics of the fused training set: per source and per corpus domain, where the source's signal
reaches the fused teacher and where it is lost (`fusion.diagnostics`), on the training documents.

Output `diagnostics.csv`, long form: source, domain, figure, value, n (n: the positions or documents the value
is a share or mean over; domain "all" sums every domain). Figures:
- per aligned source: `share_<category>` for each `fusion.diagnostics.POSITION_CATEGORIES` entry (they sum to 1
  over the target positions that predict a token) and `share_carried`; `coverage` (the gold next target token in
  the source's aligned row) and `target_coverage` (in the target's own stored top-k), over the carried
  positions; `mass_kept`, the source's top-k mass at those positions; `teacher_nll` and `target_nll`, nats per
  token of the teacher (its aligned row renormalised to sum 1, as the fusion loss uses it) and of the target
  (its own probability, not renormalised) on the carried positions where both hold the gold token;
  `mix_gain_nats`, -ln(0.9 p + 0.1 q) minus -ln p on the carried positions where the target's top-k holds the
  gold token (q = 0 where the teacher's row does not): negative when mixing 10% of the teacher in helps. Mass
  outside a top-k is never invented: a position whose probability is unknown is left out of that figure, and
  its share is `1 - coverage` / `1 - target_coverage`.
- per model (the target and every source, on its own tokenization): `topk_mass`, the mean top-k mass over the
  positions that predict a token (1 - the tail the fusion drops).
- per fusion candidate (the target and the aligned sources; MinCE / AvgCE only): `picked`, the documents whose
  lowest score is that candidate (n: the domain's documents), and `mean_weight` (`candidate_weights`).
`stats.json`: the same values flat, `"<source>/<domain>/<figure>"` (finite ones; MLflow metrics through
`Stage.figures`).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from harness.results import DIAGNOSTICS_COLUMNS
from harness.stages.aligned import AlignedStage
from harness.stages.base import Stage
from harness.stages.corpus import CorpusStage
from harness.stages.distributions import DistributionsStage
from harness.stages.fused import FusedStage
from harness.stages.vocab import VocabStage, read_vocab_map

COLUMNS = DIAGNOSTICS_COLUMNS
ALL_DOMAINS = "all"


@dataclass(eq=False)
class DiagnosticsStage(Stage):
    kind: ClassVar[str] = "diagnostics"
    version: ClassVar[int] = 1

    corpus: CorpusStage
    target_distributions: DistributionsStage
    source_distributions: list[DistributionsStage]  # of each aligned source, in `fused.aligned` order
    aligned: list[AlignedStage]
    vocab: list[VocabStage]
    fused: FusedStage  # its settings say how the candidates were scored and weighted
    mix: float = 0.1  # the teacher's weight in mix_gain_nats

    def build(self, out: Path, env) -> None:
        acc = _Sums()
        for doc, target_row, sources in self._documents(env):
            self._diagnose(doc, target_row, sources, env, acc)
        table = acc.table(self.fused.target_spec.label, [a.source_spec.label for a in self.aligned],
                          self.fused.fusion, self.fused.params.get("weights", "softmax_neg"))
        table.to_csv(out / "diagnostics.csv", index=False)
        stats = {f"{r.source}/{r.domain}/{r.figure}": float(r.value) for r in table.itertuples()
                 if math.isfinite(r.value)}
        (out / "stats.json").write_text(json.dumps(stats, indent=0))

    def _documents(self, env):
        """(corpus row, target distributions row, [(source distributions row, aligned row)]) per training
        document, in doc_id order (every input dataset is sorted by doc_id)."""
        import datasets

        def rows(stage: Stage):
            return iter(datasets.load_from_disk(str(env.path(stage) / "dataset")))

        target = rows(self.target_distributions)
        pairs = [(rows(d), rows(a)) for d, a in zip(self.source_distributions, self.aligned)]
        for doc in env.iterate(env.corpus_rows(self.corpus)["train"], "diagnose"):
            row = next(target)
            sources = [(next(d), next(a)) for d, a in pairs]
            found = [row["doc_id"], *[r["doc_id"] for pair in sources for r in pair]]
            if any(i != doc["doc_id"] for i in found):
                raise ValueError(f"{self.name}: document {doc['doc_id']} of the corpus meets rows {found} of "
                                 "target distributions, then each source's distributions and aligned rows: the "
                                 "stages were built from other corpora; rebuild them (`fuselab run`)")
            yield doc, row, sources

    def _diagnose(self, doc: dict, target_row: dict, sources: list, env, acc: "_Sums") -> None:
        from fusion.diagnostics import diagnose_document, gold_logprob, topk_mass
        from fusion.distributions import topk_arrays
        from fusion.registry import ALIGNMENTS
        from fusion.tokens import tokenize_document

        domain, target_spec = doc["domain"], self.fused.target_spec
        tt = tokenize_document(env.tokenizer(target_spec), doc["text"], add_bos=False, add_eos=True)
        t_ids, t_lp, _ = topk_arrays(target_row, self.target_distributions.k)
        gold = gold_logprob(tt, t_ids, t_lp)
        acc.add_mass(target_spec.label, domain, topk_mass(t_lp))
        scores = [float(target_row[self.fused.score])]
        for i, (s_row, a_row) in enumerate(sources):
            aligned = self.aligned[i]
            label = aligned.source_spec.label
            st = tokenize_document(env.tokenizer(aligned.source_spec), doc["text"], add_bos=False, add_eos=True)
            s_ids, s_lp, _ = topk_arrays(s_row, self.source_distributions[i].k)
            a_ids = np.asarray(a_row["ids"], dtype=np.int32).reshape(len(tt), -1)
            a_probs = np.asarray(a_row["probs"], dtype=np.float32).reshape(len(tt), -1)
            alignment = ALIGNMENTS.get(aligned.alignment)(tt, st)
            acc.diag[(label, domain)] += diagnose_document(
                tt, st, s_ids, s_lp, alignment, self._vocab_map(i, env), a_ids, a_probs, gold,
                position0=aligned.position0, mix=self.mix)
            acc.add_mass(label, domain, topk_mass(s_lp))
            scores.append(float(a_row[self.fused.score]))
        acc.scores[domain].append(scores)

    def _vocab_map(self, i: int, env):
        maps = self.__dict__.setdefault("_maps", {})
        if i not in maps:
            maps[i] = read_vocab_map(env.path(self.vocab[i]), self.vocab[i].method)
        return maps[i]


class _Sums:
    """Per (source, domain) Diagnostics, per (model, domain) top-k mass sums, per domain candidate scores."""

    def __init__(self):
        from fusion.diagnostics import Diagnostics

        self.diag = defaultdict(Diagnostics)
        self.mass: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])
        self.scores: dict[str, list[list[float]]] = defaultdict(list)

    def add_mass(self, model: str, domain: str, mass: tuple[float, int]) -> None:
        self.mass[(model, domain)][0] += mass[0]
        self.mass[(model, domain)][1] += mass[1]

    def table(self, target: str, sources: list[str], fusion: str, avgce_weights: str) -> pd.DataFrame:
        """The long table (COLUMNS): every domain in corpus order, then "all"."""
        domains = list(self.scores)
        rows = []
        for domain in [*domains, ALL_DOMAINS]:
            scope = domains if domain == ALL_DOMAINS else [domain]
            for source in sources:
                total = sum((self.diag[(source, d)] for d in scope), self.diag.default_factory())
                rows += [(source, domain, name, v, n) for name, (v, n) in total.figures().items()]
            for model in [target, *sources]:
                mass, n = np.sum([self.mass[(model, d)] for d in scope], axis=0)
                rows.append((model, domain, "topk_mass", mass / n if n else float("nan"), int(n)))
            rows += self._candidates(scope, domain, [target, *sources], fusion, avgce_weights)
        return pd.DataFrame(rows, columns=COLUMNS)

    def _candidates(self, scope: list[str], domain: str, names: list[str], fusion: str, weights: str) -> list:
        from fusion.diagnostics import candidate_choices

        if fusion not in ("mince", "avgce"):
            return []
        scores = np.array([s for d in scope for s in self.scores[d]], dtype=np.float64).reshape(-1, len(names))
        picked, weight_sum = candidate_choices(scores, fusion, weights)
        n = len(scores)
        nan = float("nan")
        out = []
        for name, p, w in zip(names, picked, weight_sum):
            out += [(name, domain, "picked", float(p), n), (name, domain, "mean_weight", w / n if n else nan, n)]
        return out


def read_diagnostics(folder: Path | None) -> pd.DataFrame:
    """The long table of a built diagnostics stage's folder (COLUMNS); empty with those columns when there is
    none (folder None, or not built)."""
    f = Path(folder) / "diagnostics.csv" if folder is not None else None
    if f is None or not f.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(f, keep_default_na=False, na_values=[""], dtype={"source": str, "domain": str})
