"""Build (or load) the micro world: corpus, tokenizers, source models, target, local lm-eval tasks.

Layout of a world root::

    world.json              what was built (version, seed, sizes, models, tasks, validation bits/byte);
                            written last, its presence marks a complete world
    build_log.json          timings and machine load of the build (not part of the deterministic content)
    corpus/{train,validation,test}.jsonl   rows {"doc_id", "domain", "text"}
    models/<name>/          HF folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    tasks/                  lm-eval task YAMLs + data/*.jsonl, group "micro"
    logs/                   the source-training subprocesses' output

The build writes into a temporary sibling folder and renames it onto `root` only when complete,
so a killed build leaves nothing that looks complete; the next build removes such leftovers.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .corpus import DOMAINS, SPLITS, CorpusSizes, build_corpus
from .sources import SOURCE_SPECS, TARGET_NAME, TrainSizes
from .tasks import build_tasks, task_names, write_task_yamls
from fusion.publish import publish_dir, remove_stale
from harness.processes import pid_alive

MICRO_WORLD_VERSION = "3"  # 2: third source is MPT (was GPT-2); 3: intact-line tasks, specialised sources
WORLD_FILE = "world.json"


@dataclass(frozen=True)
class MicroSizes:
    """Every size that shapes the world; part of the cache key (``dataclasses.asdict(sizes)``)."""

    corpus: CorpusSizes = field(default_factory=CorpusSizes)
    train: TrainSizes = field(default_factory=TrainSizes)
    task_items: int = 200   # items per lm-eval task (fewer if the test split has fewer)


DEFAULT_SIZES = MicroSizes()


def micro_world_version() -> str:
    """Version of the build recipe; bumped whenever the same seed would give a different world."""
    return MICRO_WORLD_VERSION


@dataclass(frozen=True)
class MicroWorld:
    """A complete micro world on disk (see the module docstring for its layout)."""

    root: Path
    seed: int
    domains: list[str]                 # ["docs", "code", "arithmetic"]
    models: dict[str, Path]            # model name -> HF folder
    specialty: dict[str, str]          # model name -> the domain it was trained mainly on
    target: str                        # the target model's name (one of the sources, the Llama one)
    tasks_dir: Path                    # lm-eval task YAML + jsonl data; group "micro"

    def corpus(self, split: str) -> list[dict]:
        """Rows ``{"doc_id": int, "domain": str, "text": str}`` of `split` ("train", "validation", "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown micro corpus split {split!r}; expected one of {SPLITS}")
        with open(self.root / "corpus" / f"{split}.jsonl", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    def task_names(self) -> list[str]:
        """The leaf lm-eval task names (``micro_<domain>_mc``, ``micro_<domain>_gen``); the group is "micro"."""
        return task_names(self.domains)

    @property
    def info(self) -> dict:
        """The parsed world.json (sizes, model specs, task item counts, validation bits per byte)."""
        return json.loads((self.root / WORLD_FILE).read_text())

    @classmethod
    def load(cls, root: Path) -> "MicroWorld":
        """Open a complete world at `root`; rewrites the task YAMLs' data paths if the world was moved."""
        root = Path(root).resolve()
        info_path = root / WORLD_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{root} is not a complete micro world (no {WORLD_FILE}); "
                                    "build it with harness.micro.build_micro_world(root, seed)")
        info = json.loads(info_path.read_text())
        world = cls(root=root, seed=info["seed"], domains=list(info["domains"]),
                    models={name: root / m["path"] for name, m in info["models"].items()},
                    specialty={name: m["specialty"] for name, m in info["models"].items()},
                    target=info["target"], tasks_dir=root / "tasks")
        write_task_yamls(world.tasks_dir, world.domains)
        return world


def _check_cached(world: MicroWorld, seed: int, sizes: MicroSizes) -> MicroWorld:
    info = world.info
    wanted = {"version": MICRO_WORLD_VERSION, "seed": seed, "sizes": json.loads(json.dumps(asdict(sizes)))}
    for key, value in wanted.items():
        if info.get(key) != value:
            raise ValueError(f"micro world at {world.root} was built with {key}={info.get(key)!r}, not {value!r}; "
                             "use another root for this build (the cache key should include version, seed "
                             "and sizes) or delete the folder")
    return world


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[micro] {message}", file=sys.stderr, flush=True)


def _worker_env() -> dict:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # One thread per source: reproducible reductions, and the sources share the cores by running side by side.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONHASHSEED": "0"})
    return env


def _train_sources(tmp: Path, seed: int, sizes: MicroSizes, progress: bool, while_training) -> dict[str, dict]:
    """Train all sources in parallel subprocesses; run `while_training()` meanwhile; return their results."""
    (tmp / "logs").mkdir()
    (tmp / "jobs").mkdir()
    procs = {}
    env = _worker_env()
    for spec in SOURCE_SPECS:
        job = {"spec": asdict(spec), "seed": seed, "train_sizes": asdict(sizes.train),
               "corpus_dir": str(tmp / "corpus"), "out_dir": str(tmp / "models" / spec.name),
               "result_path": str(tmp / "jobs" / f"{spec.name}.result.json"), "parent_pid": os.getpid(),
               "progress": True}  # without `progress` its lines still go to logs/<name>.log
        job_path = tmp / "jobs" / f"{spec.name}.json"
        job_path.write_text(json.dumps(job, indent=1))
        log = open(tmp / "logs" / f"{spec.name}.log", "w")
        cmd = [sys.executable, "-m", "harness.micro.worker", str(job_path)]
        # With progress the worker's lines go to our stderr, else to its log; the log always keeps stdout.
        procs[spec.name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=None if progress else log), log)
    try:
        while_training()
        failed = []
        for name, (proc, log) in procs.items():
            proc.wait()
            log.close()
            if proc.returncode != 0:
                failed.append(name)
        if failed:
            tails = {n: (tmp / "logs" / f"{n}.log").read_text()[-2000:] for n in failed}
            raise RuntimeError(f"micro world: training source(s) {failed} failed "
                               f"(exit codes {[procs[n][0].returncode for n in failed]}); "
                               + " | ".join(f"{n}: {t}" for n, t in tails.items()))
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    results = {name: json.loads((tmp / "jobs" / f"{name}.result.json").read_text()) for name in procs}
    shutil.rmtree(tmp / "jobs")
    return results


def _write_corpus(tmp: Path, seed: int, sizes: MicroSizes) -> dict[str, list[dict]]:
    """Build the corpus and write tmp/corpus/<split>.jsonl; -> rows per split."""
    rows = build_corpus(seed, sizes.corpus)
    (tmp / "corpus").mkdir()
    for split in SPLITS:
        _write_jsonl(tmp / "corpus" / f"{split}.jsonl", rows[split])
    return rows


def _specialists_ok(bpb: dict[str, dict[str, float]], seed: int) -> bool:
    """Whether every source has the lowest validation bits per byte on its own domain (warns if not)."""
    ok = all(min(bpb, key=lambda n: bpb[n][spec.domain]) == spec.name for spec in SOURCE_SPECS)
    if not ok:
        warnings.warn(f"micro world seed {seed}: not every source has the lowest validation bits per byte "
                      f"on its own domain: {bpb}", stacklevel=4)
    return ok


def _world_info(seed: int, sizes: MicroSizes, rows: dict[str, list[dict]], task_counts: dict[str, int],
                bpb: dict[str, dict[str, float]], specialists_ok: bool) -> dict:
    """The content of world.json."""
    return {
        "version": MICRO_WORLD_VERSION, "seed": seed, "sizes": asdict(sizes),
        "python": platform.python_version(), "domains": list(DOMAINS), "target": TARGET_NAME,
        "models": {spec.name: {"path": f"models/{spec.name}", "specialty": spec.domain, **asdict(spec)}
                   for spec in SOURCE_SPECS},
        "tasks": {"group": "micro", "items": task_counts},
        "corpus": {split: {d: {"documents": sum(r["domain"] == d for r in rows[split]),
                               "chars": sum(len(r["text"]) for r in rows[split] if r["domain"] == d)}
                           for d in DOMAINS} for split in SPLITS},
        "validation_bpb": bpb, "specialists_ok": specialists_ok,
    }


def _build_log(seconds: float, corpus_seconds: float, load_before, results: dict[str, dict]) -> dict:
    """The content of build_log.json: timings and machine load (not part of the deterministic content)."""
    return {"seconds": seconds, "corpus_seconds": corpus_seconds, "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "sources": {n: {k: r[k] for k in ("seconds", "final_loss", "train_tokens")} for n, r in results.items()}}


def _build_into(tmp: Path, root: Path, seed: int, sizes: MicroSizes, progress: bool) -> tuple[float, tuple]:
    """Write a complete world into `tmp` (tasks with data paths under `root`); -> (seconds, load before)."""
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    rows = _write_corpus(tmp, seed, sizes)
    corpus_seconds = time.perf_counter() - t0
    _log(progress, f"corpus: {sum(len(r) for r in rows.values())} documents in {corpus_seconds:.1f} s; "
                   f"training {len(SOURCE_SPECS)} sources side by side")

    task_counts: dict[str, int] = {}

    def make_tasks() -> None:
        task_counts.update(build_tasks(rows["test"], list(DOMAINS), seed, sizes.task_items,
                                       tasks_dir=root / "tasks", write_dir=tmp / "tasks"))

    results = _train_sources(tmp, seed, sizes, progress, make_tasks)
    bpb = {name: results[name]["validation_bpb"] for name in results}
    info = _world_info(seed, sizes, rows, task_counts, bpb, _specialists_ok(bpb, seed))
    seconds = time.perf_counter() - t0
    log = _build_log(seconds, corpus_seconds, load_before, results)
    (tmp / "build_log.json").write_text(json.dumps(log, indent=1, sort_keys=True) + "\n")
    (tmp / WORLD_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return seconds, load_before


def build_micro_world(root: Path, seed: int = 0, progress: bool = True, *,
                      sizes: MicroSizes = DEFAULT_SIZES) -> MicroWorld:
    """Build the micro world at `root` from nothing, or return it if `root` already holds a complete one.

    Deterministic: the same seed, sizes and machine give a byte-identical corpus and identical weights.
    Takes ~3 minutes on 2 idle cores (three sources trained side by side, one thread each; the target, 400
    steps to the others' 240, finishes alone).
    Raises ValueError if `root` holds a world of another version, seed or sizes, or an incomplete folder.
    """
    root = Path(root).resolve()
    if (root / WORLD_FILE).is_file():
        return _check_cached(MicroWorld.load(root), seed, sizes)
    if root.exists():
        raise ValueError(f"{root} exists but is not a complete micro world (no {WORLD_FILE}); "
                         "delete it or pass another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(root.parent, pid_alive, name=root.name)  # temporary folders of killed builds
    pub = publish_dir(root, exist_ok=True, is_complete=lambda p: (p / WORLD_FILE).is_file())
    with pub as tmp:
        seconds, load_before = _build_into(tmp, root, seed, sizes, progress)
    if not pub.published:  # another build of the same root finished first; theirs is as good as ours
        return _check_cached(MicroWorld.load(root), seed, sizes)
    _log(progress, f"built {root} in {seconds:.0f} s (load average before {load_before[0]:.1f})")
    return MicroWorld.load(root)
