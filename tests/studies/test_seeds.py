"""Contestants over seeds (studies.seeds): means, Student-t intervals and paired differences over the seeds,
checked against values computed by hand from the definitions in the module docstring."""
from __future__ import annotations

import math

import optuna
import pytest
from scipy.stats import t as student_t

from studies.attrs import ATTR_RUNS, ATTR_SEARCH_SPACE
from studies.seeds import contestant_table, seed_comparisons

METHODS = {"base": "target", "clm": "CLM-only", "fusellm:experts": "FuseLLM", "merge:linear": "merge",
           "merge:ties": "merge"}
# bpb_avg per seed (0, 1, 2) and model: exact binary fractions
BPB = {"base": [2.5, 2.5, 2.5], "clm": [2.25, 2.0, 2.5], "fusellm:experts": [2.0, 2.0, 2.25],
       "merge:linear": [2.25, 2.5, 2.25], "merge:ties": [2.5, 2.5, 2.5]}


@pytest.fixture()
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name="t7", direction="minimize")
    s.set_user_attr(ATTR_SEARCH_SPACE, ["fusion.lam"])
    runs = [{"seed": seed, "methods": METHODS,
             "metrics": {f"{m}/bpb_avg": v[i] for m, v in BPB.items()}} for i, seed in enumerate((0, 1, 2))]
    s.add_trial(optuna.trial.create_trial(
        params={"fusion.lam": 0.9}, distributions={"fusion.lam": optuna.distributions.CategoricalDistribution([0.9])},
        value=2.0, user_attrs={ATTR_RUNS: runs}))
    return s


def test_each_contestant_has_its_mean_and_t_interval_over_seeds(study):
    table = contestant_table(study).set_index("model")
    assert list(table.index) == list(BPB)
    row = table.loc["clm"]
    mean = (2.25 + 2.0 + 2.5) / 3
    sd = math.sqrt(((2.25 - mean) ** 2 + (2.0 - mean) ** 2 + (2.5 - mean) ** 2) / 2)
    half = student_t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert row["method"] == "CLM-only" and row["n_seeds"] == 3
    assert row["bpb_avg mean"] == pytest.approx(mean, rel=1e-12)
    assert (row["bpb_avg lo"], row["bpb_avg hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert table.loc["base", "bpb_avg lo"] == table.loc["base", "bpb_avg hi"] == 2.5  # no spread


def test_paired_differences_against_base_clm_and_the_best_merge(study):
    cmp = seed_comparisons(study).set_index(["model", "vs"])
    # the best merge is the one with the lowest mean bpb_avg: linear (2.333) before ties (2.5)
    assert set(cmp.loc[("fusellm:experts", slice(None)), "reference_model"]) == {"base", "clm", "merge:linear"}
    row = cmp.loc[("fusellm:experts", "best merge")]
    diffs = [2.0 - 2.25, 2.0 - 2.5, 2.25 - 2.25]  # -0.25, -0.5, 0
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    p = 2 * student_t.sf(abs(mean / (sd / math.sqrt(3))), 2)
    assert row["difference"] == pytest.approx(mean, rel=1e-12)
    assert row["p_value"] == pytest.approx(p, rel=1e-9)
    assert row["better_in"] == "2/3"  # lower bits per byte in seeds 0 and 1, a tie in seed 2
    vs_base = cmp.loc[("fusellm:experts", "target")]
    assert vs_base["better_in"] == "3/3" and vs_base["difference"] == pytest.approx(-5 / 12, rel=1e-12)
    assert ("base", "target") not in cmp.index  # no model is compared with itself


def test_the_study_report_shows_every_contestant_and_the_paired_table(study, tmp_path):
    from studies.report import write_study_report

    md = write_study_report(study, tmp_path).read_text()
    assert "## Every contestant over the seeds (validation split)" in md
    assert "### Paired over the seeds (bits per byte, validation split)" in md
    assert "## Held-out test split" not in md  # a study without a held-out record (made before, or by hand)
    line = next(ln for ln in md.splitlines() if ln.replace(" ", "").startswith("|fusellm:experts|bestmerge|"))
    assert "-0.2500 [" in line and "(2/3 better)" in line  # mean difference -0.25 vs merge:linear
    assert (tmp_path / "contestants.csv").is_file() and (tmp_path / "contestant_comparisons.csv").is_file()
