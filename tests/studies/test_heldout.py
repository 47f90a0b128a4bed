"""The chosen setting of a study on the held-out test split (studies.heldout): chosen on validation by the
objective's mean over seeds, re-run on test for every seed without the suites, reported beside the validation
figures; skipped with a reason where no held-out split applies."""
from __future__ import annotations

import optuna
import pytest
from study_objectives import expected_micro, split_aware_experiment

from studies.attrs import ATTR_HELDOUT, ATTR_RUNS
from studies.heldout import chosen_setting
from studies.runner import run_study
from studies.spec import load_spec

GRID = {"fusion.vocab_map": {"type": "categorical", "choices": ["em", "mined"]},
        "fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]}}
BPB = {"metric": "fusellm/bpb_avg", "direction": "minimize"}


def _overrides(wd):
    return [f"workdir={wd}", "study.heartbeat_interval=1", "study.grace_period=2"]


def test_the_best_validation_setting_is_rerun_on_test_for_every_seed(write_spec, tmp_path):
    wd = tmp_path / "wd"
    path = write_spec("ho", search_space=GRID, objective=BPB, seeds=[0, 1])
    study = run_study(path, _overrides(wd), objective_fn=split_aware_experiment, progress=False)
    record = study.user_attrs[ATTR_HELDOUT]
    # validation bpb = 2 - micro: the largest micro (mince + mined: 0.625 + 0.01 seed) is the best setting
    assert record["params"] == {"fusion.fusion": "mince", "fusion.vocab_map": "mined"}
    assert record["setting"] == "fusion.fusion=mince, fusion.vocab_map=mined"
    assert record["validation_objective"] == pytest.approx(2.0 - 0.625 - 0.005, abs=1e-12)
    assert [r["seed"] for r in record["runs"]] == [0, 1]
    for r in record["runs"]:
        micro = expected_micro("mince", "mined", r["seed"])
        assert r["metrics"]["fusellm/bpb_avg"] == pytest.approx(2.5 - micro / 2, abs=1e-12)
        assert r["metrics"]["n_suites"] == 0 and r["metrics"]["trial_given"] == 0  # no suites, no trial
    report = (wd / "reports" / "ho" / "report.md").read_text()
    assert "## Held-out test split: the chosen setting" in report
    assert "**fusion.fusion=mince, fusion.vocab_map=mined**" in report
    assert f"= {2.5 - (0.625 + 0.005) / 2:.4f} (mean of 2)" in report


def test_a_failed_held_out_run_is_recorded_and_tried_again_next_time(write_spec, tmp_path, capsys):
    wd = tmp_path / "wd"
    broken = {"on": True}

    def fails_on_test(cfg, **kw):
        if cfg.evaluation.perplexity.split == "test" and broken["on"]:
            raise RuntimeError("disk full")
        return split_aware_experiment(cfg, **kw)

    path = write_spec("retry", objective=BPB, seeds=[0])
    study = run_study(path, _overrides(wd), objective_fn=fails_on_test, progress=False)
    assert study.user_attrs[ATTR_HELDOUT] == {"failed": "RuntimeError: disk full"}
    assert "[retry] held-out test run failed: RuntimeError: disk full" in capsys.readouterr().err
    report = (wd / "reports" / "retry" / "report.md").read_text()
    assert "the held-out test run failed: RuntimeError: disk full (it is tried again the next time" in report
    broken["on"] = False
    again = run_study(path, _overrides(wd), objective_fn=fails_on_test, progress=False)  # no trial left to run
    assert [r["seed"] for r in again.user_attrs[ATTR_HELDOUT]["runs"]] == [0]
    assert "**fusion.fusion=mince**" in (wd / "reports" / "retry" / "report.md").read_text()


def test_no_held_out_run_for_a_suite_objective(write_spec, tmp_path):
    wd = tmp_path / "wd"
    calls = []

    def counting(cfg, **kw):
        calls.append(cfg.evaluation.perplexity.split)
        return split_aware_experiment(cfg, **kw) | {"fusellm/micro": 0.5}

    path = write_spec("suite", objective={"metric": "fusellm/micro", "direction": "maximize"}, seeds=[0])
    study = run_study(path, _overrides(wd), objective_fn=counting, progress=False)
    assert calls == ["validation", "validation"]
    assert study.user_attrs[ATTR_HELDOUT]["skipped"].startswith("the objective fusellm/micro is a suite score")
    assert "no held-out test run: the objective fusellm/micro is a suite score" in \
        (wd / "reports" / "suite" / "report.md").read_text()


def test_heldout_none_and_a_file_corpus_without_a_test_split_are_skipped(write_spec, tmp_path):
    from studies.heldout import skip_reason

    assert skip_reason(load_spec(write_spec("n", objective=BPB, heldout="none"))) == "the spec says heldout: none"
    text = tmp_path / "t.txt"
    text.write_text(("A paragraph of plain text for the corpus. " * 10 + "\n\n") * 10)
    files = ["corpus.kind=text_files", f"corpus.paths=[{str(text)!r}]"]
    assert skip_reason(load_spec(write_spec("f", objective=BPB, overrides=files), check=False)) == \
        "the corpus has no test split (set corpus.test_fraction)"
    with_test = files + ["corpus.test_fraction=0.2"]
    assert skip_reason(load_spec(write_spec("g", objective=BPB, overrides=with_test), check=False)) is None


def test_chosen_setting_takes_the_best_mean_among_settings_with_every_seed():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    dist = {"fusion.lam": optuna.distributions.CategoricalDistribution([0.5, 0.9, 1.0]),
            "seed": optuna.distributions.CategoricalDistribution([0, 1])}
    for lam, seed, value in [(0.5, 0, 2.0), (0.5, 1, 2.4), (0.9, 0, 2.1), (0.9, 1, 2.2), (1.0, 0, 1.0)]:
        study.add_trial(optuna.trial.create_trial(
            params={"fusion.lam": lam, "seed": seed}, distributions=dist, value=value,
            user_attrs={ATTR_RUNS: [{"seed": seed, "metrics": {"fusellm/bpb_avg": value}}]}))

    class Spec:
        objective = type("O", (), {"metric": "fusellm/bpb_avg", "direction": "minimize"})

    # lam 1.0 has the lowest value but one seed of two; of the complete ones 0.9 (2.15) beats 0.5 (2.2)
    params, mean = chosen_setting(Spec, study)
    assert params == {"fusion.lam": 0.9} and mean == pytest.approx(2.15)
    Spec.objective.direction = "maximize"
    assert chosen_setting(Spec, study)[0] == {"fusion.lam": 0.5}
