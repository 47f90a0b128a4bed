"""The chosen setting of a study, reported on held-out test documents it was not chosen on.

A study's trials score every setting on the validation split (`evaluation.perplexity.split: validation`) and the
objective picks the best of them there; that score is biased in the chosen setting's favour (it was the largest of
several noisy numbers). When the study is complete, the setting with the best mean objective over the seeds is
run again for every seed of the study with `evaluation.perplexity.split: test`: the same trained models (the stage
cache gives them back; only the evaluation stages run), scored on test documents no setting was chosen on. The
lm-eval suites are left out of that run: FuseLab scores them on one fixed set of items, so they have no held-out
counterpart, and the objective is a bits-per-byte score anyway.

Skipped, with the reason recorded, when the spec says `heldout: none`, when the objective is not a bits-per-byte
score, or when the corpus has no test split (file and datasets corpora without `corpus.test_fraction`).

The record (study user attr ATTR_HELDOUT): {"setting", "params", "validation_objective", "runs": [{"seed",
"metrics", "methods"}]} (runs shaped as the trials' ATTR_RUNS), {"skipped": reason}, or {"failed": error} (tried
again the next time the study is run).
"""
from __future__ import annotations

import math
from typing import Any

from harness.tracking import TAG_ROLE, TAG_STUDY
from studies.attrs import ATTR_HELDOUT, ATTR_RUNS
from studies.spec import SEED_PARAM

TEST_OVERRIDES = ["evaluation.perplexity.split=test", "evaluation.suites=[]"]


def skip_reason(spec) -> str | None:
    """Why the study gets no held-out run, or None."""
    if spec.heldout == "none":
        return "the spec says heldout: none"
    score = spec.objective.metric.split("/", 1)[-1]
    if not score.startswith("bpb_"):
        return (f"the objective {spec.objective.metric} is a suite score; the suites have one fixed set of items, "
                "with no held-out split")
    corpus = spec.base_config().corpus
    if corpus.kind != "micro" and not corpus.test_fraction:
        return "the corpus has no test split (set corpus.test_fraction)"
    return None


def chosen_setting(spec, study) -> tuple[dict[str, Any], float] | None:
    """(params of the setting with the best mean objective over the seeds it completed, that mean), among the
    settings that completed the most seeds; None without a complete trial."""
    from optuna.trial import TrialState

    values: dict[tuple, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = tuple(sorted((k, v) for k, v in t.params.items() if k != SEED_PARAM))
        runs = t.user_attrs.get(ATTR_RUNS) or []
        values.setdefault(key, []).extend(
            r["metrics"][spec.objective.metric] for r in runs if spec.objective.metric in r["metrics"])
    values = {k: v for k, v in values.items() if v and not any(math.isnan(x) for x in v)}
    if not values:
        return None
    most = max(len(v) for v in values.values())
    means = {k: sum(v) / len(v) for k, v in values.items() if len(v) == most}
    pick = (min if spec.objective.direction == "minimize" else max)(means, key=means.get)
    return dict(pick), means[pick]


def heldout_pending(study) -> bool:
    """The study has no held-out record yet, or its held-out run failed (a later `fuselab study` retries)."""
    record = study.user_attrs.get(ATTR_HELDOUT)
    return record is None or "failed" in record


def run_heldout(spec, study, tracker, parent_run_id: str, objective_fn, progress: bool = False) -> dict:
    """Run the chosen setting on the test split for every seed; store and return the record."""
    from studies.runner import run_record, setting_label  # the runner imports this module

    why = skip_reason(spec)
    chosen = None if why else chosen_setting(spec, study)
    if why is None and chosen is None:
        why = "no complete trial"
    if why is not None:
        record = {"skipped": why}
        study.set_user_attr(ATTR_HELDOUT, record)
        return record
    params, validation_value = chosen
    setting = setting_label(params)
    if progress:
        print(f"[{spec.study_name}] held-out test split: {setting}, seeds {list(spec.seeds)}", flush=True)
    runs = []
    tags = {TAG_ROLE: "heldout", TAG_STUDY: spec.study_name, "fuselab.setting": setting}
    with tracker.run("held-out test", parent_run_id=parent_run_id, tags=tags) as run:
        tracker.log_params({"setting": setting, "split": "test", "seeds": ",".join(map(str, spec.seeds))})
        for seed in spec.seeds:
            cfg = spec.config_for(params, seed, extra=TEST_OVERRIDES)
            out = objective_fn(cfg, tracker=tracker, parent_run_id=run.info.run_id, trial=None)
            runs.append(run_record(out, seed, spec))
        objective = [r["metrics"][spec.objective.metric] for r in runs]
        tracker.log_metrics({"objective": sum(objective) / len(objective)}, run_id=run.info.run_id)
    record = {"setting": setting, "params": params, "validation_objective": validation_value, "runs": runs}
    study.set_user_attr(ATTR_HELDOUT, record)
    return record
