"""Stage cache: content-addressed keys and atomic, resumable outputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness.cache import COMPLETE, StageCache


def test_key_changes_exactly_when_an_input_changes(tmp_path):
    c = StageCache(tmp_path)
    base = c.key("fused", {"fusion": "mince", "top_k": 10}, ["aligned/abc", "distributions/def"])
    # same settings, inputs in another order, dict keys in another order -> same key
    same = c.key("fused", {"top_k": 10, "fusion": "mince"}, ["distributions/def", "aligned/abc"])
    assert same == base
    changed = [
        c.key("fused", {"fusion": "avgce", "top_k": 10}, ["aligned/abc", "distributions/def"]),  # own setting
        c.key("fused", {"fusion": "mince", "top_k": 10}, ["aligned/abX", "distributions/def"]),  # an input's key
        c.key("fused", {"fusion": "mince", "top_k": 10}, ["aligned/abc"]),  # an input removed
        c.key("train", {"fusion": "mince", "top_k": 10}, ["aligned/abc", "distributions/def"]),  # stage name
    ]
    assert len({k.key for k in changed} | {base.key}) == 5


def test_lambda_changes_training_key_only():
    from harness.config import load_config
    from harness.pipeline import build_plan

    qs = Path(__file__).resolve().parents[2] / "studies" / "micro_quickstart.yaml"
    a = build_plan(load_config(qs, ["workdir=/tmp/fuselab-keytest"]))
    b = build_plan(load_config(qs, ["workdir=/tmp/fuselab-keytest", "fusion.lam=0.5"]))
    differ = sorted(n for n in a.stages if a.stages[n].key != b.stages[n].key)
    assert differ == ["eval/fusellm", "train/fusellm"]
    c = build_plan(load_config(qs, ["workdir=/tmp/fuselab-keytest", "fusion.vocab_map=em"]))
    differ = sorted(n for n in a.stages if a.stages[n].key != c.stages[n].key)
    assert "corpus" not in differ and not any(n.startswith("distributions/") for n in differ)
    assert {"vocab/neox-code", "aligned/neox-code", "fused", "train/fusellm", "eval/fusellm"} <= set(differ)


def test_atomic_dir_publishes_only_complete_outputs(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("s", {"a": 1})
    try:
        with c.atomic_dir(key) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not c.exists(key) and not c.path(key).exists()
    assert list((tmp_path / "s").iterdir()) == []
    path, cached = c.get_or_build(key, lambda d: (d / "out.txt").write_text("done"))
    assert not cached and (path / "out.txt").read_text() == "done" and (path / COMPLETE).is_file()
    path2, cached2 = c.get_or_build(key, lambda d: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert cached2 and path2 == path


SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.cache import StageCache
    c = StageCache(sys.argv[1])
    log = Path(sys.argv[1]) / "built.log"
    for i in range(3):
        key = c.key("stage", {"i": i})
        def build(d, i=i):
            with open(log, "a") as fh:
                fh.write(f"{i}\\n")
            (d / "a.txt").write_text(f"value {i}")
            if i == 1 and len(sys.argv) > 2:
                print("SLOW", flush=True)
                time.sleep(60)
            (d / "b.txt").write_text(f"value {i * i}")
        c.get_or_build(key, build)
    print("DONE", flush=True)
""")


def test_killed_mid_stage_resumes_to_same_outputs(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(root), "slow"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "SLOW"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    c = StageCache(root)
    assert c.exists(c.key("stage", {"i": 0}))
    assert not c.exists(c.key("stage", {"i": 1}))
    assert len(list((root / "stage").glob(".tmp-*"))) == 1  # the killed stage's leftover, never read
    out = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "DONE"
    # stage 0 was not rebuilt; stage 1 was restarted, stage 2 built once
    assert (root / "built.log").read_text().split() == ["0", "1", "1", "2"]
    assert StageCache(root).clean_stale() == 1
    for i in range(3):
        p = c.path(c.key("stage", {"i": i}))
        assert (p / "a.txt").read_text() == f"value {i}" and (p / "b.txt").read_text() == f"value {i * i}"
