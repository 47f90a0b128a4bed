"""Content-addressed stage cache with atomic outputs.

Every stage output is a directory `<root>/<stage>/<key>/`. The key is the hash of the stage's own
settings and its inputs' keys, so changing lambda retrains without re-extracting distributions.
Outputs are built in `<root>/<stage>/.tmp-<key>-<pid>/` and renamed into place when complete, with a
`_COMPLETE` marker written last: a run killed at any point (even `kill -9`) leaves no directory that
looks complete, and the next run recomputes exactly the stages that are missing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.config import stable_hash

COMPLETE = "_COMPLETE"


@dataclass(frozen=True)
class StageKey:
    stage: str
    key: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}"


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._redirects: dict[StageKey, Path] = {}

    @staticmethod
    def key(stage: str, settings: Any, input_keys: list[StageKey | str] = ()) -> StageKey:
        """Key = hash(stage name, its own settings, its inputs' keys)."""
        payload = {"stage": stage, "settings": settings, "inputs": sorted(str(k) for k in input_keys)}
        return StageKey(stage, stable_hash(payload))

    def path(self, key: StageKey) -> Path:
        return self._redirects.get(key, self.root / key.stage / key.key)

    def redirect(self, key: StageKey, path: Path) -> None:
        """Keep one stage's output elsewhere (e.g. one micro world shared by many work dirs)."""
        self._redirects[key] = Path(path)

    def exists(self, key: StageKey) -> bool:
        return (self.path(key) / COMPLETE).is_file()

    @contextmanager
    def atomic_dir(self, key: StageKey, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temporary directory; on success it becomes `path(key)` in one rename."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key.key}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / "_meta.json").write_text(json.dumps({"key": str(key), **(meta or {})}, indent=2, default=str))
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            _fsync_file(tmp / COMPLETE)
            if final.exists():  # an incomplete leftover from a killed run, or a concurrent writer won
                if (final / COMPLETE).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_file(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_stale(self) -> int:
        """Remove leftovers of killed runs (`.tmp-*` dirs of processes that no longer exist)."""
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                pid = int(tmp.name.split("-")[2])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed

    def get_or_build(self, key: StageKey, build, meta: dict | None = None) -> tuple[Path, bool]:
        """Return (path, was_cached); `build(tmp_dir)` writes the output into the temporary dir."""
        if self.exists(key):
            return self.path(key), True
        with self.atomic_dir(key, meta) as tmp:
            build(tmp)
        return self.path(key), False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
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


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))
