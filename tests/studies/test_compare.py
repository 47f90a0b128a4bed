"""studies.compare: one contestant under two settings, paired on the same held-out documents."""
from __future__ import annotations

import json

import pytest

import tests.tiny as tiny
from harness.config import validate_config
from harness.executor import Executor
from harness.plan import build_plan
from studies.compare import compare, diagnostics_pair


def _cfg(wd, llama, gpt2, lam):
    notes = wd / "notes.jsonl"
    if not notes.exists():
        notes.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(tiny.TRAIN_TEXT[:8])))
    return validate_config({
        "name": "cmp", "workdir": str(wd / "work"), "target": {"name": "tl", "ref": str(llama)},
        "sources": [{"name": "tl", "ref": str(llama)}, {"name": "tg", "ref": str(gpt2)}],
        "corpus": {"kind": "jsonl", "paths": [str(notes)], "validation_fraction": 0.25},
        "fusion": {"top_k": 4, "extraction_batch_size": 4, "lam": lam},
        "training": {"block_size": 24, "per_device_batch_size": 2, "max_steps": 2, "logging_steps": 1},
        "baselines": {"clm": False, "ensemble": {"enabled": False}},
        "evaluation": {"suites": [], "perplexity": {"window": 16, "stride": 8, "max_docs_per_domain": 2}},
    })


def test_b_minus_a_on_the_same_documents(tmp_path, tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    a, b = (_cfg(tmp_path, tiny_llama_dir, tiny_gpt2_dir, lam) for lam in (0.9, 0.5))
    with pytest.raises(FileNotFoundError, match=r"eval/fusellm is not in the cache"):
        compare(a, b)
    values = {}
    for tag, cfg in (("A", a), ("B", b)):
        plan = build_plan(cfg)
        long = __import__("pandas").read_csv(Executor(plan, progress=False).ensure(plan.stages["eval/fusellm"])
                                             / "eval_long.csv")
        values[tag] = long[long["metric"] == "bits_per_byte"].set_index("task")["value"]
    table = compare(a, b).set_index("score")
    # for one domain the paired difference is B's bits per byte minus A's (bits over bytes of the same documents)
    assert table.loc["bpb_notes", "difference"] == pytest.approx(values["B"]["notes"] - values["A"]["notes"], abs=1e-9)
    assert (compare(a, a)["difference"] == 0).all()  # a setting against itself: no difference at all


def test_the_diagnostics_of_two_settings_side_by_side(tmp_path, tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    monkeypatch.delenv("FUSELAB_WORKDIR", raising=False)
    a, b = (_cfg(tmp_path, tiny_llama_dir, tiny_gpt2_dir, 0.9) for _ in range(2))
    b = b.model_copy(update={"fusion": b.fusion.model_copy(update={"vocab_map": "em"})})
    assert diagnostics_pair(a, b).empty  # nothing built yet
    for cfg in (a, b):
        plan = build_plan(cfg)
        Executor(plan, progress=False).ensure(plan.stages["diagnostics"])
    pair = diagnostics_pair(a, b)
    assert list(pair.index.get_level_values("source").unique()) == ["tg"]  # the sources only, not the target
    assert list(pair.columns[:2]) == ["share_usable A", "share_usable B"]
    assert ((pair >= 0) | pair.isna()).all().all()
    same = diagnostics_pair(a, a)
    assert (same["coverage A"] == same["coverage B"]).all()
