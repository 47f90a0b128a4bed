"""Content-addressed stage cache: atomic, verified, shared safely by concurrent runs.

Every stage output is a directory `<root>/<stage>/<key>/`. The key is the hash of the stage's own
settings and its inputs' keys, so changing lambda retrains without re-extracting distributions.

Writing: outputs are built in `<root>/<stage>/.<key>.tmp-<pid>-<hex>/` (`fusion.publish.publish_dir`); when
the build returns, `_meta.json`, then `_MANIFEST.json` (every file's relative path, size in bytes and sha256, plus
the digests of the input stages it was built from), then the `_COMPLETE` marker are written, the tree is fsynced,
and the folder is renamed into place. A run killed at any point (even `kill -9`) leaves no directory that looks
complete.

Reading: `status(key)` checks a stage against its manifest: cheaply by default (every listed file present
with its recorded size, no file added but the caches `datasets` writes next to a saved dataset), by content
(sha256 of every file) with `full=True` (`fuselab verify`, the evaluation stages a report is made from, and
every stage a new build is about to read). A stage whose
files do not match is `corrupt`; the pipeline removes it (`discard`) and builds it again. A stage also
counts as corrupt when one of its inputs now has other content than when it was built (that input was
rebuilt, not deterministically), so dependents of a rebuilt stage follow it.

Concurrency: `lock(key)` is an exclusive file lock per stage key, so two runs of one config wait for each
other and reuse each other's outputs; publishing never crashes on a concurrent publisher of the same key
(the loser discards its copy).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fusion.publish import discard as discard_dir, publish_dir, publish_file, remove_stale
from harness.config import stable_hash
from harness.processes import pid_alive

COMPLETE = "_COMPLETE"
MANIFEST = "_MANIFEST.json"
META = "_meta.json"
LOCKS = "_locks"
HASHES = "_content_hashes.json"
MANIFEST_VERSION = 1
# _meta.json holds the build time: a deterministic rebuild must keep the stage's digest, so it is not in it
# (nor the files a stage declares `volatile`: measurements such as seconds or tokens per second)
_NOT_IN_DIGEST = {META}
_CHUNK = 8 * 1024 * 1024


class CorruptStageError(RuntimeError):
    """A cached stage's files do not match its manifest; the message names the stage and the file."""


@dataclass(frozen=True)
class StageKey:
    stage: str
    key: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}"


@dataclass
class StageStatus:
    """What a stage's folder holds. state: "missing" (not built), "ok" (matches its manifest), "unverified"
    (complete but built before manifests existed: used as is), "corrupt" (`problems` says which file and how)."""

    key: StageKey
    state: str
    problems: list[str] = field(default_factory=list)
    full: bool = False  # whether content hashes were compared (else sizes only)

    @property
    def usable(self) -> bool:
        return self.state in ("ok", "unverified")

    def describe(self) -> str:
        return f"stage {self.key}: " + "; ".join(self.problems)


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 8 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# Files readers add next to a saved dataset: `datasets` caches the result of map/filter/select there
# (cache-<fingerprint>.arrow, written as tmp* first). They are derived from the stage's files, not part of them.
_READER_CACHE = re.compile(r"cache-[0-9a-f]+\.arrow|tmp\w+")


def _reader_caches(root: Path) -> list[str]:
    return [(Path(d) / n).relative_to(root).as_posix() for d, _, files in os.walk(root) for n in files
            if Path(d) != root and _READER_CACHE.fullmatch(n)]


def _stage_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in files:
            p = Path(dirpath) / name
            if p.parent == root and name in (MANIFEST, COMPLETE):
                continue
            if p.parent != root and _READER_CACHE.fullmatch(name):
                continue
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def build_manifest(root: Path, inputs: dict[str, str | None] | None = None, volatile: tuple[str, ...] = ()) -> dict:
    """The manifest of a finished stage folder: {"files": [{"path", "bytes", "sha256"}], "digest", "inputs"}.

    digest: sha256 of the file list (paths, sizes, hashes) without `_meta.json` and the `volatile` files
    (file names, at any depth, whose content may differ between identical rebuilds, e.g. timings): the identity of the
    stage's content, which its dependents record. inputs: {input stage key: its digest when this stage was built}.
    Every file, volatile or not, is verified.
    """
    files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _stage_files(root)]
    digest = stable_hash([[f["path"], f["bytes"], f["sha256"]] for f in files
                          if f["path"] not in _NOT_IN_DIGEST and f["path"].rsplit("/", 1)[-1] not in volatile], n=64)
    return {"version": MANIFEST_VERSION, "files": files, "digest": digest, "volatile": sorted(volatile),
            "inputs": dict(inputs or {})}


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._redirects: dict[StageKey, Path] = {}
        self._verified: dict[StageKey, str | None] = {}  # full checks passed in this process: key -> digest

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
        """Complete (published); says nothing about its files' integrity: see `status`."""
        return (self.path(key) / COMPLETE).is_file()

    # -- verification ---------------------------------------------------------------------------------
    def manifest(self, key: StageKey) -> dict | None:
        try:
            return json.loads((self.path(key) / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"unreadable": True}

    def status(self, key: StageKey, *, full: bool = False) -> StageStatus:
        """Check a stage against its manifest: sizes (and, with `full`, sha256 of every file)."""
        root = self.path(key)
        if not (root / COMPLETE).is_file():
            return StageStatus(key, "missing")
        if full and key in self._verified:
            return StageStatus(key, "ok", full=True)
        man = self.manifest(key)
        if man is None:
            return StageStatus(key, "unverified")
        if man.get("unreadable") or "files" not in man:
            return StageStatus(key, "corrupt", [f"file {MANIFEST}: unreadable (not the JSON the stage wrote)"], full)
        problems = []
        listed = {f["path"]: f for f in man["files"]}
        present = {p.relative_to(root).as_posix(): p for p in _stage_files(root)}
        for rel, rec in listed.items():
            p = present.get(rel)
            if p is None:
                problems.append(f"file {rel}: missing")
                continue
            size = p.stat().st_size
            if size != rec["bytes"]:
                problems.append(f"file {rel}: {size} bytes, the manifest says {rec['bytes']} (truncated or rewritten)")
            elif full and sha256_file(p) != rec["sha256"]:
                problems.append(f"file {rel}: content differs from the manifest (sha256 mismatch; edited or damaged)")
        for rel in sorted(set(present) - set(listed)):
            problems.append(f"file {rel}: not in the manifest (added after the stage was built)")
        for in_key, in_digest in (man.get("inputs") or {}).items():
            stage, _, k = in_key.partition("/")
            cur = self.manifest(StageKey(stage, k)) if in_digest else None
            if cur and cur.get("digest") and cur["digest"] != in_digest:
                problems.append(f"input {in_key} has other content than this stage was built from (it was rebuilt)")
        if problems:
            self._verified.pop(key, None)
            return StageStatus(key, "corrupt", problems, full)
        if full:
            # what a reader derived from these files is not verified: dropped, so a reader recomputes it
            # from the checked files instead of reusing a damaged copy
            for rel in sorted(set(_reader_caches(root)) - set(listed)):
                (root / rel).unlink(missing_ok=True)
            self._verified[key] = man.get("digest")
        return StageStatus(key, "ok", full=full)

    def digest(self, key: StageKey) -> str | None:
        """Content digest of a stage after a full check (memoised per process); None for a stage built before
        manifests. Raises CorruptStageError naming the stage and file when its content does not match."""
        if key in self._verified:
            return self._verified[key]
        st = self.status(key, full=True)
        if st.state == "corrupt":
            raise CorruptStageError(st.describe())
        if st.state == "missing":
            raise CorruptStageError(f"stage {key}: not built (an input is read before it exists)")
        return self._verified.get(key)

    def discard(self, key: StageKey) -> None:
        """Remove a stage (e.g. corrupt) so it is built again: renamed aside first, so no reader ever sees a
        half-deleted folder that still looks complete."""
        self._verified.pop(key, None)
        discard_dir(self.path(key))

    def stage_keys(self) -> list[StageKey]:
        """Every complete stage folder under the root (any config)."""
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(("_", ".")):
                out += [StageKey(d.name, s.name) for s in sorted(d.iterdir())
                        if not s.name.startswith(".") and (s / COMPLETE).is_file()]
        return out

    # -- writing --------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: StageKey, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
        """Exclusive lock on one stage key (flock: processes on this machine; released if the holder dies).
        Yields whether it had to wait for another holder (`on_wait()` is called before waiting)."""
        path = self.root / LOCKS / f"{key.stage}-{key.key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            waited = False
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield waited
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def atomic_dir(self, key: StageKey, meta: dict | None = None, inputs: dict[str, str | None] | None = None,
                   volatile: tuple[str, ...] = ()) -> Iterator[Path]:
        """Yield a temporary directory; on success it becomes `path(key)` in one rename, with its manifest.

        inputs: {input stage key: digest} recorded in the manifest (see `status`); volatile: files left out of
        the stage's digest (`build_manifest`). If another process published the same key first, this copy is
        discarded (the outputs of one key are interchangeable).
        """
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # an incomplete folder in the way (written in place by an old version) is replaced
        pub = publish_dir(final, exist_ok=True, is_complete=lambda p: (p / COMPLETE).is_file(),
                          replace_incomplete=True)
        with pub as tmp:
            yield tmp
            (tmp / META).write_text(json.dumps({"key": str(key), **(meta or {})}, indent=2, default=str))
            man = build_manifest(tmp, inputs, volatile)
            (tmp / MANIFEST).write_text(json.dumps(man, indent=1))
            (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if pub.published:
            self._verified[key] = man["digest"]

    def clean_stale(self) -> int:
        """Remove leftovers of killed runs (temporary and discarded stage folders of processes that no longer
        exist); -> how many."""
        return sum(remove_stale(d, pid_alive) for d in self.root.iterdir() if d.is_dir())

    def get_or_build(self, key: StageKey, build, meta: dict | None = None, *, full: bool = False,
                     inputs: dict[str, str | None] | None = None) -> tuple[Path, bool]:
        """Return (path, was_cached); `build(tmp_dir)` writes the output into the temporary dir.

        A cached stage is checked first (`status`, sizes or with `full` hashes); a corrupt one is discarded
        and built again. Concurrent callers of one key build it once (the others wait, then reuse it)."""
        if self.status(key, full=full).usable:
            return self.path(key), True
        with self.lock(key):
            st = self.status(key, full=full)
            if st.usable:
                return self.path(key), True
            if st.state == "corrupt":
                self.discard(key)
            with self.atomic_dir(key, meta, inputs) as tmp:
                build(tmp)
        return self.path(key), False


class FileHashes:
    """sha256 (and other per-file facts) remembered by file version in a small JSON file.

    A file version is (resolved path, size, mtime_ns, ctime_ns, inode): saving new weights of the same
    size changes mtime/ctime (and usually the inode), so the hash is computed again; an unchanged file
    is hashed once. `path=None` keeps the records in memory only.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._mem: dict[str, dict] = {}

    @staticmethod
    def _version(file: Path) -> tuple[str, list[int]]:
        st = file.stat()
        return str(file.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _load(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # a damaged cache only costs recomputation

    def get(self, file: Path, fact: str) -> Any:
        name, version = self._version(Path(file))
        rec = self._mem.get(name) or self._load().get(name)
        if rec and rec.get("version") == version and fact in rec:
            self._mem[name] = rec
            return rec[fact]
        return None

    def put(self, file: Path, fact: str, value: Any) -> None:
        name, version = self._version(Path(file))
        rec = self._mem.get(name)
        if not rec or rec.get("version") != version:
            rec = {"version": version}
        rec[fact] = value
        self._mem[name] = rec
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._load()
                old = data.get(name)
                data[name] = {**old, **rec} if old and old.get("version") == version else rec
                with publish_file(self.path, fsync=False) as tmp:
                    tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sha256(self, file: Path) -> str:
        """sha256 of `file`, computed (streamed) only for a file version not seen before."""
        cached = self.get(file, "sha256")
        if cached is None:
            cached = sha256_file(Path(file))
            self.put(file, "sha256", cached)
        return cached

