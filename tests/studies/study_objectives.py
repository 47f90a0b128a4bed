"""Injected study objectives for the runner tests that need a failing, slow or synchronised trial.

They stand in for `harness.pipeline.run_experiment` (same keyword arguments) and return metrics computed
from the trial's config, so the expected values are known exactly:
fusellm/micro = 0.5 (mince) or 0.25 (avgce), + 0.125 for vocab_map=mined, + 0.01 * seed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def expected_micro(fusion: str, vocab_map: str, seed: int) -> float:
    return {"mince": 0.5, "avgce": 0.25}[fusion] + (0.125 if vocab_map == "mined" else 0.0) + 0.01 * seed


def fake_experiment(cfg, *, tracker, parent_run_id, trial):
    micro = expected_micro(cfg.fusion.fusion, cfg.fusion.vocab_map, cfg.seed)
    return {"fusellm/micro": micro, "fusellm/bpb_avg": 2.0 - micro, "clm/micro": 0.375}


def failing_on_avgce(cfg, *, tracker, parent_run_id, trial):
    if cfg.fusion.fusion == "avgce":
        raise ValueError(f"deliberate failure for fusion={cfg.fusion.fusion}")
    return fake_experiment(cfg, tracker=tracker, parent_run_id=parent_run_id, trial=trial)


def slow_experiment(cfg, *, tracker, parent_run_id, trial):
    """Marks `<FUSELAB_TEST_MARKERS>/started-<trial>` then sleeps FUSELAB_TEST_SLEEP seconds. With
    FUSELAB_TEST_WORKERS=n, the first trial of each worker waits until n workers have started one
    (so that two workers really overlap however unevenly the machine starts them)."""
    markers = Path(os.environ["FUSELAB_TEST_MARKERS"])
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"started-{trial.number}").write_text(str(os.getpid()))
    n_workers = int(os.environ.get("FUSELAB_TEST_WORKERS", "0"))
    if n_workers:
        (markers / f"worker-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while len(list(markers.glob("worker-*"))) < n_workers and time.monotonic() < deadline:
            time.sleep(0.2)
    time.sleep(float(os.environ.get("FUSELAB_TEST_SLEEP", "1")))
    return fake_experiment(cfg, tracker=tracker, parent_run_id=parent_run_id, trial=trial)


def split_aware_experiment(cfg, *, tracker, parent_run_id, trial):
    """fusellm/bpb_avg = 2 - micro on the validation split, 2.5 - micro / 2 on the test split (the held-out
    run's); clm/bpb_avg = 1.5 and 1.75; it records which split and suites it was asked for."""
    micro = expected_micro(cfg.fusion.fusion, cfg.fusion.vocab_map, cfg.seed)
    test = cfg.evaluation.perplexity.split == "test"
    return {"fusellm/bpb_avg": 2.5 - micro / 2 if test else 2.0 - micro, "clm/bpb_avg": 1.75 if test else 1.5,
            "n_suites": float(len(cfg.evaluation.suites)), "trial_given": float(trial is not None)}
