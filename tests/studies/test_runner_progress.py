"""What a study prints while it runs: each trial's start, its score with the running best, and a summary that
counts the trials that ran (a queued grid point is not a trial that ran)."""
from __future__ import annotations

import re

from pathlib import Path

from study_objectives import expected_micro, failing_on_avgce, fake_experiment

from studies.runner import run_study

GRID_2X2 = {
    "fusion.vocab_map": {"type": "categorical", "choices": ["em", "mined"]},
    "fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]},
}


def fast_overrides(wd: Path) -> list[str]:
    return [f"workdir={wd}", "study.heartbeat_interval=1", "study.grace_period=2"]

START = re.compile(r"\[g\] trial (\d+): fusion\.vocab_map=(\w+), fusion\.fusion=(\w+), seeds \[0\]")
SCORE = re.compile(r"\[g\] trial (\d+): fusellm/micro = ([\d.]+) in \d+ s; best so far ([\d.]+) \(trial (\d+)(, this one)?\)")


def _expected_lines(out: str, best: tuple[float, int] | None) -> tuple[float, int]:
    """Check every trial's start and score line against study_objectives' formula, the running best included;
    returns the best (value, trial) after these trials."""
    starts = {int(m[1]): (m[2], m[3]) for m in START.finditer(out)}
    scores = [m for m in SCORE.finditer(out)]
    assert scores and [int(m[1]) for m in scores] == sorted(starts)
    for m in scores:
        number = int(m[1])
        vocab_map, fusion = starts[number]
        value = expected_micro(fusion, vocab_map, 0)
        assert float(m[2]) == value
        if best is None or value > best[0]:
            best = (value, number)
        assert (float(m[3]), int(m[4])) == best and bool(m[5]) == (best[1] == number)
    return best


def test_trials_print_start_score_and_running_best_and_the_summary_counts_what_ran(write_spec, tmp_path, capsys):
    spec = write_spec("g", search_space=GRID_2X2, seeds=[0])
    wd = tmp_path / "wd"
    run_study(spec, fast_overrides(wd), n_trials=2, objective_fn=fake_experiment, progress=True)
    out = capsys.readouterr().out
    best = _expected_lines(out, None)
    settings = {n: s for n, s in ((int(m[1]), (m[2], m[3])) for m in START.finditer(out))}
    summary = out.strip().splitlines()[-1]
    # 2 of the 4 grid points ran: the summary must not call the queued ones trials that ran
    assert summary == (f"study g: 2 trials ran here (2 complete); 2 of 4 grid points done, 2 waiting, 0 running; "
                       f"best fusellm/micro = {best[0]:.4g} (trial {best[1]}: fusion.vocab_map={settings[best[1]][0]}, "
                       f"fusion.fusion={settings[best[1]][1]})")

    run_study(spec, fast_overrides(wd), objective_fn=fake_experiment, progress=True)  # the rest of the grid
    out = capsys.readouterr().out
    best = _expected_lines(out, best)
    assert best[0] == expected_micro("mince", "mined", 0)  # the best of the whole grid
    assert out.strip().splitlines()[-1].startswith(
        "study g: 2 trials ran here (2 complete); 4 of 4 grid points done, 0 waiting, 0 running; "
        "best fusellm/micro = 0.625 (trial ")


def test_failed_trials_are_counted_as_failed(write_spec, tmp_path, capsys):
    spec = write_spec("f", search_space=GRID_2X2, seeds=[0])
    run_study(spec, fast_overrides(tmp_path / "wd"), objective_fn=failing_on_avgce, progress="trials")
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum("failed: ValueError: deliberate failure for fusion=avgce" in x for x in lines) == 2
    assert lines[-1] == ("study f: 4 trials ran here (2 complete, 2 failed); 4 of 4 grid points done, 0 waiting, "
                         "0 running; best fusellm/micro = 0.625 (trial 2: fusion.vocab_map=mined, fusion.fusion=mince)")
