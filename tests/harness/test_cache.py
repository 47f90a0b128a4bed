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
    assert len(list((root / "stage").glob(".*.tmp-*"))) == 1  # the killed stage's leftover, never read
    out = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "DONE"
    # stage 0 was not rebuilt; stage 1 was restarted, stage 2 built once
    assert (root / "built.log").read_text().split() == ["0", "1", "1", "2"]
    assert StageCache(root).clean_stale() == 1
    for i in range(3):
        p = c.path(c.key("stage", {"i": i}))
        assert (p / "a.txt").read_text() == f"value {i}" and (p / "b.txt").read_text() == f"value {i * i}"


# ------------------------------------------------------------------------- manifests (issue 19, item 3)
def _build_two_files(d: Path, text: str = "hello") -> None:
    (d / "sub").mkdir()
    (d / "a.txt").write_text(text)
    (d / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib
    import json

    from harness.cache import MANIFEST

    c = StageCache(tmp_path)
    key = c.key("s", {"a": 1})
    path, _ = c.get_or_build(key, _build_two_files, meta={"stage": "s"})
    man = json.loads((path / MANIFEST).read_text())
    files = {f["path"]: (f["bytes"], f["sha256"]) for f in man["files"]}
    assert files["a.txt"] == (5, hashlib.sha256(b"hello").hexdigest())
    assert files["sub/b.bin"] == (1024, hashlib.sha256(bytes(range(256)) * 4).hexdigest())
    assert set(files) == {"a.txt", "sub/b.bin", "_meta.json"}  # not the manifest itself nor the marker
    assert c.status(key).state == "ok" and c.status(key, full=True).state == "ok"


def test_truncated_file_is_caught_by_the_cheap_check_and_rebuilt(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("s", {"a": 1})
    builds = []

    def build(d):
        builds.append(1)
        _build_two_files(d)

    path, _ = c.get_or_build(key, build)
    with open(path / "sub" / "b.bin", "r+b") as fh:
        fh.truncate(100)
    st = StageCache(tmp_path).status(key)  # a fresh process: sizes only
    assert st.state == "corrupt"
    assert st.describe() == (f"stage {key}: file sub/b.bin: 100 bytes, the manifest says 1024 (truncated or "
                             f"rewritten)")
    path2, cached = StageCache(tmp_path).get_or_build(key, build)
    assert not cached and len(builds) == 2 and (path2 / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 4
    assert StageCache(tmp_path).status(key, full=True).state == "ok"


def test_same_size_edit_is_caught_by_content_hashes_only(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("s", {"a": 1})
    path, _ = c.get_or_build(key, _build_two_files)
    (path / "a.txt").write_text("jello")  # one character, same size
    fresh = StageCache(tmp_path)
    assert fresh.status(key).state == "ok"  # the cheap check cannot see it
    full = fresh.status(key, full=True)
    assert full.state == "corrupt" and full.problems == [
        "file a.txt: content differs from the manifest (sha256 mismatch; edited or damaged)"]
    path2, cached = fresh.get_or_build(key, _build_two_files, full=True)
    assert not cached and (path2 / "a.txt").read_text() == "hello"


def test_added_or_missing_files_are_named(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("s", {"a": 1})
    path, _ = c.get_or_build(key, _build_two_files)
    (path / "sub" / "b.bin").unlink()
    (path / "extra.txt").write_text("x")
    assert c.status(key).problems == ["file sub/b.bin: missing",
                                      "file extra.txt: not in the manifest (added after the stage was built)"]


def test_caches_that_datasets_writes_next_to_a_cached_dataset_are_not_corruption(tmp_path):
    import datasets

    c = StageCache(tmp_path)
    key = c.key("s", {})
    path, _ = c.get_or_build(key, lambda d: datasets.Dataset.from_dict({"x": [1, 2, 3]}).save_to_disk(str(d / "ds")))
    mapped = datasets.load_from_disk(str(path / "ds")).map(lambda r: {"y": r["x"] * 2})  # a reader's map
    assert mapped["y"] == [2, 4, 6] and list((path / "ds").glob("cache-*.arrow"))
    assert c.status(key, full=True).state == "ok"


def test_dependent_follows_an_input_rebuilt_with_other_content(tmp_path):
    c = StageCache(tmp_path)
    a = c.key("a", {})
    b = c.key("b", {}, [a])
    c.get_or_build(a, lambda d: (d / "x").write_text("one"))
    c.get_or_build(b, lambda d: (d / "y").write_text("from one"), inputs={str(a): c.digest(a)})
    # the input is rebuilt identically (a deterministic stage): the dependent stays valid
    c.discard(a)
    c.get_or_build(a, lambda d: (d / "x").write_text("one"))
    assert StageCache(tmp_path).status(b).state == "ok"
    # rebuilt with other content: the dependent no longer matches what it was built from
    c.discard(a)
    c.get_or_build(a, lambda d: (d / "x").write_text("two"))
    st = StageCache(tmp_path).status(b)
    assert st.state == "corrupt" and st.problems == [
        f"input {a} has other content than this stage was built from (it was rebuilt)"]


def test_file_hashes_are_computed_once_per_file_version(tmp_path):
    import hashlib
    import json

    from harness.cache import FileHashes

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    store = tmp_path / "hashes.json"
    assert FileHashes(store).sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    # a later process takes the recorded hash for an unchanged file version without reading the file:
    # plant a marker value in the record and get it back
    data = json.loads(store.read_text())
    data[str(f.resolve())]["sha256"] = "recorded"
    store.write_text(json.dumps(data))
    assert FileHashes(store).sha256(f) == "recorded"
    # new content of the same size is a new version (mtime/ctime): hashed again
    f.write_bytes(b"b" * 1000)
    assert FileHashes(store).sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


# ------------------------------------------------------------------------- concurrency (issue 19, item 6)
WRITERS = textwrap.dedent("""
    import multiprocessing as mp, sys, traceback
    from pathlib import Path
    from harness.cache import StageCache
    root, mode, n_proc, n_keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def writer(barrier, crashes):
        c = StageCache(root)
        for i in range(n_keys):
            key = c.key("stage", {"i": i})
            def build(d, i=i):
                with open(Path(root) / "built.log", "a") as fh:
                    fh.write(f"{i}\\n")
                (d / "v.txt").write_text(f"value {i}")
            barrier.wait()  # all writers on the same key at the same moment: the worst case
            try:
                if mode == "publish":  # no lock: every writer builds and publishes every key
                    with c.atomic_dir(key) as tmp:
                        build(tmp)
                else:
                    c.get_or_build(key, build)
            except Exception:
                with crashes.get_lock():
                    crashes.value += 1
                traceback.print_exc()

    ctx = mp.get_context("fork")
    barrier, crashes = ctx.Barrier(n_proc), ctx.Value("i", 0)
    procs = [ctx.Process(target=writer, args=(barrier, crashes)) for _ in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print("CRASHES", crashes.value, "EXIT", *[p.exitcode for p in procs], flush=True)
""")


def _run_writers(tmp_path: Path, mode: str, n_proc: int = 6, n_keys: int = 300) -> int:
    """n_proc processes write the same n_keys stage keys in lockstep; returns how many writes raised."""
    script = tmp_path / "writers.py"
    script.write_text(WRITERS)
    root = tmp_path / "cache"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, str(script), str(root), mode, str(n_proc), str(n_keys)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.split()[-n_proc:] == ["0"] * n_proc, out.stderr[-2000:]
    c = StageCache(root)
    for i in range(n_keys):
        key = c.key("stage", {"i": i})
        assert c.status(key, full=True).state == "ok" and (c.path(key) / "v.txt").read_text() == f"value {i}"
    assert not list((root / "stage").glob(".*.tmp-*"))  # every losing copy was discarded
    return int(out.stdout.split()[1])


def test_six_concurrent_publishers_of_the_same_keys_never_crash(tmp_path):
    """Before: 8-12% of renames failed with "Directory not empty" when six processes published one key."""
    assert _run_writers(tmp_path, "publish") == 0


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    assert _run_writers(tmp_path, "build") == 0
    built = (tmp_path / "cache" / "built.log").read_text().split()
    assert sorted(built, key=int) == [str(i) for i in range(300)]  # each key built exactly once
