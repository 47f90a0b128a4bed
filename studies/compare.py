"""One contestant under two settings, paired on the same items and held-out documents.

    python -m studies.compare CONFIG [overrides] --vs [overrides] [--model fusellm] [--workdir DIR]

Both settings must have been run (their evaluation stages are read from the stage cache, nothing is built): e.g.
the trials of a study, or `fuselab run CONFIG overrides`. The table gives, per score (each suite's average, bits
per byte per domain and their mean), B minus A with its 95% paired-bootstrap interval and the two-sided sign-flip
p-value over the same units (harness.stats.paired_comparisons): the evidence for "this rule beats the paper's".
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd


def eval_frames(cfg, model: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long, items, docs) of contestant `model`'s cached eval stage under `cfg`; FileNotFoundError naming the
    setting when it has not been run."""
    from harness.plan import build_plan
    from harness.stages.evaluate import read_eval, read_units

    plan = build_plan(cfg)
    name = f"eval/{model}"
    if name not in plan.stages:
        raise KeyError(f"{cfg.name}: no contestant {model!r}; contestants: {[c.label for c in plan.contestants]}")
    if not plan.cached(name):
        raise FileNotFoundError(f"{cfg.name} ({cfg.content_hash()}): {name} is not in the cache "
                                f"{plan.cache.root}; run this setting first")
    folder = plan.path(name)
    items, docs = read_units(folder)
    return read_eval(folder), items, docs


def compare(cfg_a, cfg_b, model: str = "fusellm", *, seed: int = 0) -> pd.DataFrame:
    """B minus A for `model` on every score both have per-unit values for (harness.stats.COMPARISON_COLUMNS;
    `model` column "B", reference "A")."""
    from harness.stats import paired_comparisons

    frames = []
    for tag, cfg in (("A", cfg_a), ("B", cfg_b)):
        frames.append([f[f["model"] == model].assign(model=tag) if len(f) else f for f in eval_frames(cfg, model)])
    long, items, docs = (pd.concat([a, b], ignore_index=True) for a, b in zip(*frames))
    return paired_comparisons(long, items, docs, ["A", "B"], {"A": "A"}, seed=seed)


KEY_FIGURES = ("share_usable", "share_next_span_differs", "coverage", "teacher_nll", "target_nll", "mix_gain_nats")


def diagnostics_pair(cfg_a, cfg_b, figures: tuple[str, ...] = KEY_FIGURES) -> pd.DataFrame:
    """The fusion diagnostics (harness.stages.diagnostics) of A and B side by side: rows (source, domain) of the
    sources, columns `<figure> A` / `<figure> B`; empty when either setting has no built diagnostics stage."""
    from harness.plan import build_plan
    from harness.stages.diagnostics import read_diagnostics

    tables = []
    for tag, cfg in (("A", cfg_a), ("B", cfg_b)):
        plan = build_plan(cfg)
        folder = plan.path("diagnostics") if "diagnostics" in plan.stages and plan.cached("diagnostics") else None
        d = read_diagnostics(folder)
        d = d[d["figure"].isin(figures) & (d["source"] != cfg.target.label)]
        tables.append(d.pivot_table(index=["source", "domain"], columns="figure", values="value", sort=False)
                      .add_suffix(f" {tag}"))
    if any(t.empty for t in tables):
        return pd.DataFrame()
    both = tables[0].join(tables[1], how="outer")
    return both[[f"{f} {t}" for f in figures for t in ("A", "B") if f"{f} {t}" in both.columns]]


def main(argv: list[str] | None = None) -> int:
    from harness.config import load_config

    ap = argparse.ArgumentParser(prog="python -m studies.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment config YAML (a study's base config, e.g. studies/micro_quickstart.yaml)")
    ap.add_argument("a", nargs="*", help="overrides of setting A (the reference, e.g. the paper's rule)")
    ap.add_argument("--vs", nargs="*", default=[], help="overrides of setting B")
    ap.add_argument("--model", default="fusellm", help="the contestant to compare (default fusellm)")
    ap.add_argument("--diagnostics", action="store_true", help="also the two settings' fusion diagnostics")
    args = ap.parse_args(argv)
    table = compare(load_config(args.config, args.a), load_config(args.config, args.vs), args.model)
    print(f"{args.model}: B ({' '.join(args.vs) or 'config'}) minus A ({' '.join(args.a) or 'config'}), paired "
          "on the same units; bits per byte: negative = B better")
    print(table[["score", "difference", "lo", "hi", "p_value", "mark", "n"]].to_string(index=False))
    if args.diagnostics:
        pair = diagnostics_pair(load_config(args.config, args.a), load_config(args.config, args.vs))
        print("\nfusion diagnostics (A, B):\n" + (pair.round(4).to_string() if len(pair) else "not built"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
