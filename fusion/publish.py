"""Atomic publication: write an output under a temporary sibling name, give it its final name when complete.

Every writer of a folder or file that others read (stage cache, micro world, converted models, merges, domain
experts, extraction shards, training results) builds it in `.<name>.tmp-<pid>-<hex>` next to the final path and
renames it only when the build returned; the rename is atomic within a filesystem, so a reader never sees a
half-written output under the final name. A writer that raises leaves nothing; one killed with `kill -9` leaves
its temporary, which `remove_stale` deletes once that process is gone (the callers that resume do so).

    with publish_dir(out) as tmp:      # tmp exists and is empty
        write_everything_into(tmp)     # out appears here, complete, or not at all
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# `.<name>.tmp-<pid>-<hex>` (being written) and `.<name>.discard-<pid>-<hex>` (moved aside to be removed)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|discard)-(?P<pid>\d+)-[0-9a-f]+$")
_RENAME_TRIES = 5


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A fresh name next to `final` for this process: `.<name>.<kind>-<pid>-<8 hex>` (kind: tmp | discard)."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_path(path: Path) -> None:
    """Flush one file or folder entry to disk; a file system that cannot (or a vanished path) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (itself included) to disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def discard(path: Path) -> None:
    """Remove a published folder so that no reader sees it half-deleted: renamed aside first, then deleted.
    A path that is already gone is fine (a concurrent writer discarded it)."""
    aside = temp_sibling(Path(path), "discard")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale(parent: Path, alive: Callable[[int], bool], name: str | None = None) -> int:
    """Delete the temporaries and discarded folders directly under `parent` whose writer process is gone
    (`alive(pid)` is False; a live writer's are kept). name: only those of the output called `name`.
    Returns how many were removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    removed = 0
    for path in parent.iterdir():
        m = _TEMP_NAME.match(path.name)
        if not m or (name is not None and m["name"] != name) or alive(int(m["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


class publish_dir:
    """`with publish_dir(final) as tmp:` builds a folder in `tmp` (a fresh empty sibling of `final`); when the
    block completes the tree is flushed (`fsync`) and renamed to `final`, the parent folder flushed after; when it
    raises (KeyboardInterrupt included), `tmp` is removed and `final` untouched.

    `final` already there at the rename (an empty folder is simply replaced):
    - exist_ok=False: FileExistsError naming `final`.
    - exist_ok=True: another writer published first. Theirs is kept and ours dropped when `is_complete(final)`
      (always, without `is_complete`). A folder that is not complete (e.g. written in place by an old version) is
      discarded and the rename retried when `replace_incomplete`, else FileExistsError naming it.
    After the block, `published` says whether this writer's folder got the name (False: another's was kept).
    """

    def __init__(self, final: Path, *, exist_ok: bool = False, fsync: bool = True,
                 is_complete: Callable[[Path], bool] | None = None, replace_incomplete: bool = False):
        self.final = Path(final)
        self.exist_ok, self.fsync = exist_ok, fsync
        self.is_complete, self.replace_incomplete = is_complete, replace_incomplete
        self.tmp = temp_sibling(self.final)
        self.published: bool | None = None

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                if self.fsync:
                    fsync_tree(self.tmp)
                self.published = self._rename()
                if self.published and self.fsync:
                    fsync_path(self.final.parent)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _rename(self) -> bool:
        """Rename tmp -> final; False when another writer's complete folder is kept instead."""
        for _ in range(_RENAME_TRIES):
            try:
                os.rename(self.tmp, self.final)  # atomic; replaces only an empty folder
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if not self.exist_ok:
                raise FileExistsError(f"{self.final} already exists (another writer published it first); "
                                      "remove it or choose another path")
            if self.is_complete is None or self.is_complete(self.final):
                return False
            if not self.replace_incomplete:
                raise FileExistsError(f"{self.final} exists but is not complete (not written by this publisher); "
                                      "remove it or choose another path")
            discard(self.final)
        raise RuntimeError(f"cannot publish {self.tmp} as {self.final}: the folder kept changing under "
                           "concurrent writers")


@contextmanager
def publish_file(final: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path of `final` to write; when the block completes that file replaces `final`
    (an existing file is overwritten, readers see the old or the new content, never a mix), flushed first with
    `fsync` (the parent folder after); when it raises, the temporary is removed and `final` untouched."""
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        if fsync:
            fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
