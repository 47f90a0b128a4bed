"""fusion.publish: a folder or file gets its final name complete, or not at all."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion.publish import discard, publish_dir, publish_file, remove_stale, temp_sibling

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_temp_sibling_is_hidden_next_to_final_and_names_this_process(tmp_path):
    tmp = temp_sibling(tmp_path / "model")
    assert tmp.parent == tmp_path
    assert re.fullmatch(rf"\.model\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
    discarded = temp_sibling(tmp_path / "model", "discard").name
    assert re.fullmatch(rf"\.model\.discard-{os.getpid()}-[0-9a-f]{{8}}", discarded)
    assert temp_sibling(tmp_path / "model") != tmp  # a fresh name per call


def test_success_renames_the_whole_tree(tmp_path):
    final = tmp_path / "out"
    pub = publish_dir(final)
    with pub as tmp:
        assert tmp.is_dir() and not list(tmp.iterdir()) and tmp.parent == tmp_path
        assert not final.exists()  # nothing under the final name while the block runs
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert pub.published is True
    assert (final / "a.txt").read_text() == "alpha" and (final / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary became `out`


def test_an_exception_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    pub = publish_dir(final)
    with pytest.raises(KeyboardInterrupt):
        with pub as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [] and pub.published is None


def test_final_existing_is_an_error_by_default_and_theirs_is_untouched(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "theirs.txt").write_text("theirs")
    with pytest.raises(FileExistsError, match=re.escape(f"{final} already exists")):
        with publish_dir(final) as tmp:
            (tmp / "ours.txt").write_text("ours")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in final.iterdir()] == ["theirs.txt"]


def test_an_empty_folder_in_the_way_is_replaced(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with publish_dir(final) as tmp:
        (tmp / "ours.txt").write_text("ours")
    assert [p.name for p in final.iterdir()] == ["ours.txt"]


def test_exist_ok_keeps_the_complete_copy_another_writer_published_first(tmp_path):
    final = tmp_path / "out"
    pub = publish_dir(final, exist_ok=True, is_complete=lambda p: (p / "DONE").is_file())
    with pub as tmp:
        (tmp / "DONE").write_text("ours")
        final.mkdir()  # another writer publishes while this one is still building
        (final / "DONE").write_text("theirs")
    assert pub.published is False
    assert (final / "DONE").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exist_ok_without_a_completeness_test_keeps_whatever_is_there(tmp_path):
    final = tmp_path / "out"
    pub = publish_dir(final, exist_ok=True)
    with pub as tmp:
        (tmp / "ours.txt").write_text("ours")
        final.mkdir()
        (final / "theirs.txt").write_text("theirs")
    assert pub.published is False and [p.name for p in final.iterdir()] == ["theirs.txt"]


def test_an_incomplete_folder_in_the_way_is_replaced_only_when_asked(tmp_path):
    final = tmp_path / "out"
    done = dict(is_complete=lambda p: (p / "DONE").is_file())
    final.mkdir()
    (final / "partial.txt").write_text("left by a writer that wrote in place")
    with pytest.raises(FileExistsError, match=re.escape(f"{final} exists but is not complete")):
        with publish_dir(final, exist_ok=True, **done) as tmp:
            (tmp / "DONE").write_text("ours")
    assert [p.name for p in final.iterdir()] == ["partial.txt"]
    pub = publish_dir(final, exist_ok=True, replace_incomplete=True, **done)
    with pub as tmp:
        (tmp / "DONE").write_text("ours")
    assert pub.published is True and [p.name for p in final.iterdir()] == ["DONE"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the incomplete folder was discarded, not kept aside


def test_no_fsync_publishes_the_same(tmp_path):
    with publish_dir(tmp_path / "out", fsync=False) as tmp:
        (tmp / "a.txt").write_text("alpha")
    assert (tmp_path / "out" / "a.txt").read_text() == "alpha"


def test_publish_file_replaces_the_file_or_leaves_it_untouched(tmp_path):
    final = tmp_path / "result.json"
    final.write_text("old")
    with publish_file(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.json.tmp-")
        tmp.write_text("new")
        assert final.read_text() == "old"
    assert final.read_text() == "new"
    with pytest.raises(ValueError):
        with publish_file(final, fsync=False) as tmp:
            tmp.write_text("never")
            raise ValueError("digest mismatch")
    assert final.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_discard_removes_a_folder_and_tolerates_a_missing_one(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "sub" / "x").write_text("x")
    discard(tmp_path / "out")
    discard(tmp_path / "gone")
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fusion.publish import publish_dir
    with publish_dir(Path(sys.argv[1])) as tmp:
        (tmp / "half.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-build: nothing gets to clean up
""")


def test_a_killed_writer_leaves_only_its_temporary_which_remove_stale_deletes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")], env=env)
    assert proc.wait(60) == -signal.SIGKILL
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and re.fullmatch(rf"\.out\.tmp-{proc.pid}-[0-9a-f]{{8}}", left[0].name)
    assert (left[0] / "half.txt").read_text() == "half"
    assert not (tmp_path / "out").exists()
    # a live writer's temporary (this process) and files that only look alike are kept
    with publish_dir(tmp_path / "mine") as mine:
        (tmp_path / ".out.tmp-notapid-00").mkdir()
        (tmp_path / "out.tmp-1-ab").mkdir()
        assert remove_stale(tmp_path, _alive) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, ".out.tmp-notapid-00", "out.tmp-1-ab"])


def test_remove_stale_of_one_name_and_of_discarded_folders(tmp_path):
    for name in (".a.tmp-11-0a", ".b.tmp-11-0b", ".a.discard-12-0c", ".a.tmp-13-0d"):
        (tmp_path / name).mkdir()
    (tmp_path / ".a.tmp-14-0e").write_text("a file")
    dead = {11, 12, 14}
    assert remove_stale(tmp_path, lambda pid: pid not in dead, name="a") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.tmp-13-0d", ".b.tmp-11-0b"]
    assert remove_stale(tmp_path / "missing", lambda pid: False) == 0
