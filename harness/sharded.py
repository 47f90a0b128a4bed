"""Distribution extraction sharded across processes (torchrun), merged into one dataset.

Every rank runs `fusion.distributions.extract_distributions` on its own slice of the documents and saves
its rows; the parent concatenates the shards and sorts by doc_id. The result is identical, bit for bit,
to a single-process extraction with the same batch size, because the shards are cut along the batches
that a single process would form: documents are ordered as `extract_distributions` orders them (longest
first under the model's own tokenizer), cut into batches of `batch_size`, and whole batches are dealt to
ranks (each to the rank with the fewest tokens so far). A rank's slice, kept in that global order,
re-forms exactly those batches, so every forward pass sees the same padded inputs.

No process group is needed (ranks never exchange tensors); torchrun gives each process its RANK, LOCAL_RANK and
WORLD_SIZE, restarts nothing, and fails the whole job if one rank fails. With device `cuda` (or `auto` on a GPU
node) rank r computes on cuda:LOCAL_RANK (harness.runtime.resolve_device): one process per GPU. On GPUs the
merged result equals one process's up to the dtype's rounding (kernels may differ between GPUs and batch
shapes); on the CPU it is bit for bit.

Worker entry point: `python -m harness.sharded JOB.json` (what torchrun starts in each process).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fusion.publish import publish_dir, remove_stale
from harness.processes import pid_alive

REPO_ROOT = Path(__file__).resolve().parents[1]


class ShardedExtractionError(RuntimeError):
    """A rank failed or a shard is missing; the message names the rank and its log file."""


def shard_plan(lengths: list[int], world_size: int, batch_size: int) -> list[list[int]]:
    """Document indices per rank: [world_size][...], each list in the global longest-first order.

    lengths: tokens per document under the model's tokenizer (EOS included), in input order.
    Batches are those a single process forms (stable sort by -length, chunks of batch_size); each goes
    whole to the rank with the fewest tokens so far (ties: lowest rank), so ranks stay balanced.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].extend(batch)
        # padded work: every row of a batch is as long as its first (longest) document
        load[rank] += lengths[batch[0]] * len(batch)
    return shards


def merge_shards(shard_dirs: list[str | Path], expected_doc_ids: list[int] | None = None):
    """Concatenate saved shard datasets and sort by doc_id -> one in-memory `datasets.Dataset`.

    Raises ShardedExtractionError when a doc_id is missing or appears twice.
    """
    import datasets

    parts = [datasets.load_from_disk(str(p)) for p in shard_dirs]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ShardedExtractionError(f"no rows in shards {[str(p) for p in shard_dirs]}")
    merged = datasets.concatenate_datasets(parts).sort("doc_id").flatten_indices(keep_in_memory=True)
    ids = merged["doc_id"]
    if len(set(ids)) != len(ids):
        raise ShardedExtractionError("a document appears in more than one shard (the ranks disagreed on the plan)")
    if expected_doc_ids is not None and sorted(ids) != sorted(expected_doc_ids):
        missing = sorted(set(expected_doc_ids) - set(ids))[:5]
        raise ShardedExtractionError(f"merged shards miss doc_ids {missing}...")
    return merged


def extract_distributions_sharded(model_spec, texts: list[str], doc_ids: list[int], work_dir: str | Path, *,
                                  nproc: int, k: int = 10, batch_size: int = 8, max_length: int | None = None,
                                  store_dtype: str = "float16", threads_per_proc: int | None = None,
                                  cache_dir: str | Path | None = None, timeout_s: float | None = None,
                                  progress: bool = False, device: str = "cpu", dtype: str | None = None,
                                  attn_implementation: str | None = None):
    """Top-k distributions of one model over `texts`, computed by `nproc` torchrun processes.

    model_spec: harness.config.ModelSpec (or a local HF folder path); it is resolved here, once, so the
    ranks never convert a packaged/GGUF model concurrently (a `micro:` ref needs the world: pass its
    resolved folder instead). texts/doc_ids as in extract_distributions.
    work_dir: job file, per-rank logs and shards (left in place for inspection; the caller owns it).
    threads_per_proc: torch threads per rank (default: CPU cores // nproc, at least 1).
    device: runtime.device as configured ("cpu", "auto", "cuda", "cuda:N"), resolved by each rank: "cuda" and a
    GPU-backed "auto" put rank r on cuda:LOCAL_RANK. dtype: the run dtype (default the spec's).
    Returns (dataset sorted by doc_id with the columns of extract_distributions, ExtractionStats summed over
    ranks: tokens and flops add up, seconds is the slowest rank's forward time). Each rank's stats.json under
    work_dir/shards/ records the device it ran on.
    """
    from harness.config import ModelSpec
    from harness.models import resolve

    _check_request(texts, doc_ids, nproc, device)
    spec = model_spec if isinstance(model_spec, ModelSpec) else ModelSpec(ref=str(model_spec))
    resolved = resolve(spec, cache_dir=Path(cache_dir) if cache_dir else None)
    local_spec = spec.model_copy(update={"ref": resolved, "name": spec.label})
    work = Path(work_dir)
    threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
    job_path = _write_job(work, texts, doc_ids, {
        "model": local_spec.model_dump(mode="json"), "k": k, "batch_size": batch_size, "max_length": max_length,
        "store_dtype": store_dtype, "threads": threads, "progress": progress, "device": device, "dtype": dtype,
        "attn_implementation": attn_implementation})
    _run_ranks(job_path, nproc, threads, timeout_s, spec.label)
    return _collect_shards(work, nproc, doc_ids)


def _check_request(texts: list[str], doc_ids: list[int], nproc: int, device: str) -> None:
    from harness.runtime import device_count, resolve_device

    if len(texts) != len(doc_ids):
        raise ValueError(f"texts ({len(texts)}) and doc_ids ({len(doc_ids)}) must have the same length")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    resolve_device(device)  # a missing GPU fails here, naming runtime.device, not in every rank
    if device in ("cuda", "auto") and device_count() and nproc > device_count():
        raise ValueError(f"nproc={nproc} ranks on cuda:LOCAL_RANK need {nproc} GPUs, torch sees {device_count()}; "
                         f"use nproc <= {device_count()} (runtime.extraction_nproc / --nproc)")


def _write_job(work: Path, texts: list[str], doc_ids: list[int], settings: dict) -> Path:
    """A fresh `work` folder holding documents.jsonl and job.json (`settings` plus the paths); -> job.json."""
    if work.exists():
        shutil.rmtree(work)
    (work / "shards").mkdir(parents=True)
    with open(work / "documents.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, text in zip(doc_ids, texts):
            fh.write(json.dumps({"doc_id": int(doc_id), "text": text}) + "\n")
    job = {**settings, "documents": str(work / "documents.jsonl"), "out": str(work / "shards")}
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    return job_path


def _run_ranks(job_path: Path, nproc: int, threads: int, timeout_s: float | None, label: str) -> None:
    """torchrun `nproc` workers on the job; per-rank logs under <work>/logs."""
    logs = job_path.parent / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(logs), "--redirects", "3", "-m", "harness.sharded", str(job_path)]
    proc = subprocess.run(cmd, env=_worker_env(threads), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise ShardedExtractionError(
            f"sharded extraction of {label} with {nproc} processes failed (exit {proc.returncode}); "
            f"per-rank logs under {logs}; last output:\n{tail}")


def _collect_shards(work: Path, nproc: int, doc_ids: list[int]):
    """(merged dataset, ExtractionStats summed over the ranks) from the shards under <work>/shards."""
    from fusion.distributions import ExtractionStats

    shard_dirs = [work / "shards" / f"rank-{r:05d}" for r in range(nproc)]
    absent = [str(p) for p in shard_dirs if not (p / "stats.json").is_file()]
    if absent:
        raise ShardedExtractionError(f"ranks finished but shards are missing: {absent}; see logs under "
                                     f"{work / 'logs'}")
    merged = merge_shards([p / "dataset" for p in shard_dirs], expected_doc_ids=list(doc_ids))
    per_rank = [json.loads((p / "stats.json").read_text()) for p in shard_dirs]
    tokens = sum(s["tokens"] for s in per_rank)
    flops = sum(s["flops"] for s in per_rank)
    seconds = max(s["seconds"] for s in per_rank)
    stats = ExtractionStats(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds else 0.0,
                            flops=flops, flops_per_s=flops / seconds if seconds else 0.0)
    return merged, stats


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_worker(job_path: str | Path) -> None:
    """One rank: read the job, extract this rank's slice, save it under `<out>/rank-NNNNN/`."""
    import torch

    from fusion.distributions import document_ids, extract_distributions
    from harness.config import ModelSpec
    from harness.models import load_model
    from harness.runtime import resolve_device

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(job["threads"]))
    device = resolve_device(job.get("device", "cpu"))  # cuda -> cuda:LOCAL_RANK
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    docs = [json.loads(line) for line in Path(job["documents"]).read_text(encoding="utf-8").splitlines() if line]
    loaded = load_model(ModelSpec.model_validate(job["model"]), device=device, dtype=job.get("dtype"),
                        attn_implementation=job.get("attn_implementation"))
    texts = [d["text"] for d in docs]
    lengths = [len(ids) for ids in document_ids(loaded.tokenizer, texts)]
    mine = shard_plan(lengths, world, int(job["batch_size"]))[rank]
    t0 = time.perf_counter()
    ds, stats = extract_distributions(
        loaded.model, loaded.tokenizer, [texts[i] for i in mine], [docs[i]["doc_id"] for i in mine],
        k=int(job["k"]), batch_size=int(job["batch_size"]), max_length=job["max_length"],
        store_dtype=job["store_dtype"], progress=bool(job["progress"]) and rank == 0)
    out = Path(job["out"]) / f"rank-{rank:05d}"
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, pid_alive, name=out.name)  # an earlier attempt's leftover
    with publish_dir(out, fsync=False) as tmp:
        ds.save_to_disk(str(tmp / "dataset"))
        (tmp / "stats.json").write_text(json.dumps({**asdict(stats), "rank": rank, "world_size": world,
                                                    "documents": len(mine), "wall_s": time.perf_counter() - t0,
                                                    "device": str(next(loaded.model.parameters()).device)}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.sharded JOB.json   (started by torchrun; see extract_distributions_sharded)")
    run_worker(sys.argv[1])
