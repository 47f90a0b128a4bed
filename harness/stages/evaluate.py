"""Evaluating one contestant: lm-eval suites and bits per byte on held-out text, for every model the contestant
loads (one, or one per domain expert). Output: `eval_long.csv` in the long results format
(`harness.results.LONG_COLUMNS` without `method`), the per-unit scores the intervals and paired tests resample
(`harness.stats`): `eval_items.csv` (lm-eval's per-item scores) and `eval_docs.csv` (per held-out document nll and
bytes), `rows.json` ({results row: what it adds to its contestant's params}) and `runtime.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from harness.config import EvaluationSpec
from harness.stages.base import Stage, no_key
from harness.stages.corpus import CorpusStage
from harness.stages.world import WorldStage


@dataclass(eq=False)
class EvalStage(Stage):
    kind: ClassVar[str] = "eval"
    # 2: per-item and per-document scores kept, the ensemble's bits per byte; 3: BBH, BoolQ and MultiPL-E as
    # lm-eval 0.4.13 scores them (raw exact match, stop "Q", size-weighted group; acc only; common problems)
    version: ClassVar[int] = 3

    corpus: CorpusStage  # held-out documents (evaluation.perplexity.split: validation, or test)
    world: WorldStage | None  # the micro tasks (and micro models)
    made_by: list[Stage]  # the stages the contestant's models come from ([] for a given model)
    evaluation: EvaluationSpec
    model: str  # the contestant's label
    ident: dict | None  # a given model's identity (models made by stages are keyed through `made_by`)
    extra: dict  # what else identifies the contestant (the ensemble's combiner, weights and members)
    data: str | None = None  # digest of the local task data's files (harness.graph.tree_identity)
    tasks: list[str] = None  # digests of the evaluation.include_path folders (their task YAMLs and data)
    contestant: object = no_key(default=None)

    def key_settings(self) -> dict:
        # every evaluation field (suites, settings, perplexity windows, data folders, task include paths)
        out = {**self.evaluation.model_dump(mode="json"), "model": self.model, "ident": self.ident, **self.extra}
        if self.data is not None:
            out["data"] = self.data
        if self.tasks:
            out["tasks"] = self.tasks
        return out

    def build(self, out: Path, env) -> None:
        from harness.stats import DOC_COLUMNS, ITEM_COLUMNS

        rows_by_domain = held_out_by_domain(held_out_rows(env, self.corpus, self.evaluation.perplexity.split),
                                            self.evaluation.perplexity.max_docs_per_domain)
        scores, items, docs, used, rows = [], [], [], {}, {}
        for m in self.contestant.loader(env, self.evaluation.settings.dtype):
            used[m.label] = where(m.lm_eval)
            rows[m.label] = m.params
            df, per_item = run_suites(self.evaluation, m.label, m.lm_eval, env)
            scores.append(df)
            items.append(per_item)
            if self.evaluation.perplexity.enabled and m.scorer is not None:
                df, per_doc = run_perplexity(self.evaluation, m.label, m.scorer, rows_by_domain, env)
                scores.append(df)
                docs.append(per_doc)
        long = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame()
        long.to_csv(out / "eval_long.csv", index=False)
        env.note_runtime(self, out, used)
        (out / "rows.json").write_text(json.dumps(rows))
        for frames, columns, file in ((items, ITEM_COLUMNS, "eval_items.csv"), (docs, DOC_COLUMNS, "eval_docs.csv")):
            kept = [f for f in frames if len(f)]
            (pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=columns)).to_csv(
                out / file, index=False)


def held_out_rows(env, corpus: CorpusStage, split: str) -> list[dict]:
    """The rows of the corpus stage's `split` ("validation" or "test"). A micro corpus stage built before
    corpora had a test split reads the micro world's test split (what the stage writes now: held-out documents
    are written whole). A corpus without one raises ValueError naming corpus.test_fraction."""
    rows = env.corpus_rows(corpus)
    if split in rows:
        return rows[split]
    if split == "test" and corpus.corpus.kind == "micro":
        from harness.corpus import load_corpus_splits

        return load_corpus_splits(corpus.corpus, world=env.world)["test"]
    if split == "test":
        raise ValueError("evaluation.perplexity.split: test needs a test split: set corpus.test_fraction "
                         "(file and datasets corpora; the micro world has one)")
    return []


def held_out_by_domain(rows: list[dict], limit: int | None) -> dict[str, list[str]]:
    """{domain: texts} of held-out rows, at most `limit` documents per domain (first ones)."""
    by_domain: dict[str, list[str]] = {}
    for row in rows:
        lst = by_domain.setdefault(row["domain"], [])
        if limit is None or len(lst) < limit:
            lst.append(row["text"])
    return by_domain


def run_suites(evaluation: EvaluationSpec, label: str, model, env) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(score rows, per-item scores) of `model` ((model, tokenizer) or an lm-eval LM) on the configured suites."""
    from harness.evaluation import EvalSettings, evaluate

    if not evaluation.suites:
        return pd.DataFrame(), pd.DataFrame()
    s, p = evaluation.settings, env.placement
    settings = EvalSettings(batch_size=s.batch_size, dtype=p.dtype_for(s.dtype), num_fewshot=s.num_fewshot,
                            seed=s.seed, limit=s.limit, max_gen_toks=s.max_gen_toks, bbh_variant=s.bbh_variant,
                            bbh_strip_whitespace=s.bbh_strip_whitespace, device=p.device,
                            attn_implementation=p.attn_implementation)
    include = ([env.world.tasks_dir] if env.world is not None else []) + \
        [Path(f).expanduser() for f in evaluation.include_path]
    data_dir = Path(evaluation.data_dir).expanduser() if evaluation.data_dir else None
    df, items = evaluate(model, list(evaluation.suites), settings, data_dir=data_dir, include_paths=include,
                         model_name=label, progress=env.progress, return_items=True)
    df["model"] = label
    items["model"] = label
    return df, items


def run_perplexity(evaluation: EvaluationSpec, label: str, scorer, rows_by_domain: dict[str, list[str]], env):
    """(score rows: bits per byte and token perplexity per domain, per-document nll rows) of one model:
    `scorer` is (model, tokenizer) or an LM with `windowed_nll` (the ensemble)."""
    from fusion.windows import describe_windows
    from harness.evaluation.perplexity import lm_perplexity_by_domain, perplexity_by_domain

    p = evaluation.perplexity
    if hasattr(scorer, "windowed_nll"):
        df, docs = lm_perplexity_by_domain(scorer, rows_by_domain, window=p.window, stride=p.stride,
                                           convention=p.convention, per_document=True,
                                           progress=env.progress and label)
    else:
        model, tok = scorer
        df, docs = perplexity_by_domain(model, tok, rows_by_domain, window=p.window, stride=p.stride,
                                        convention=p.convention,
                                        batch_size=env.placement.batch_size(evaluation.settings.batch_size),
                                        per_document=True, progress=env.progress and label)
    docs.insert(0, "model", label)
    windows = describe_windows(p.window, p.stride, p.convention) + ("; test split" if p.split == "test" else "")
    rows = [{"model": label, "suite": "perplexity", "task": r["domain"], "metric": metric,
             "value": float(r[metric]), "stderr": float("nan"), "n": int(r["n_tokens"]), "windows": windows}
            for _, r in df.iterrows() for metric in ("bits_per_byte", "token_perplexity")]
    return pd.DataFrame(rows), docs


def where(lm_obj) -> dict:
    """Where an evaluated model ran: a (model, tokenizer) pair's parameters, or each ensemble member's."""
    from harness.runtime import observed

    if isinstance(lm_obj, tuple):
        return observed(lm_obj[0])
    members = getattr(lm_obj, "members", None)
    if members:
        return {"members": {m.name: observed(m.model) for m in members}}
    return {"device": str(getattr(lm_obj, "device", "?"))}


def read_units(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-item scores, per-document nll) of a finished eval stage; empty frames for files it lacks."""
    from harness.stats import DOC_COLUMNS, ITEM_COLUMNS

    out = []
    for file, columns in (("eval_items.csv", ITEM_COLUMNS), ("eval_docs.csv", DOC_COLUMNS)):
        f = Path(folder) / file
        out.append(pd.read_csv(f) if f.is_file() and f.stat().st_size > 1 else pd.DataFrame(columns=columns))
    return out[0], out[1]


def read_eval(folder: Path) -> pd.DataFrame:
    """The long-format scores (`eval_long.csv`) of a finished eval stage (empty for a contestant with none)."""
    f = Path(folder) / "eval_long.csv"
    return pd.read_csv(f) if f.stat().st_size > 1 else pd.DataFrame()
