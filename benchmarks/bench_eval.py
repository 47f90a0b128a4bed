"""Evaluation benchmarks: examples/s per suite on a tiny model, and FuseLab's overhead over calling lm-eval directly.

    python benchmarks/bench_eval.py [--data-dir ../shared/data] [--repeats 3]

Figures (names from ../shared/BENCHMARKS.md and extras):
- eval_overhead_vs_lm_eval_ratio: evaluate(model_dir, ["commonsense"]) wall time / the same generated tasks run by
  `lm_eval.simple_evaluate(model="hf", ...)` with a TaskManager on the same folder; same model, limit, batch size,
  seeds. Runs alternate (A, B, A, B, ...); the ratio is of the medians.
- eval_examples_per_s_<suite>: examples scored per second of wall time (model load included), median of repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

import tiny  # noqa: E402
from _results import record  # noqa: E402
from harness.evaluation import EvalSettings, evaluate  # noqa: E402
from harness.evaluation.taskgen import write_suite_tasks  # noqa: E402

COMMAND = "python benchmarks/bench_eval.py"


def _direct_lm_eval(model_dir: Path, folder: Path, group: str, settings: EvalSettings) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    return simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": settings.dtype, "device": settings.device},
        tasks=[group], batch_size=settings.batch_size, limit=settings.limit, task_manager=manager,
        log_samples=False, random_seed=settings.seed, numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed, fewshot_random_seed=settings.seed, verbosity="WARNING")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-overhead", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny.sentencepiece_style()
        model_dir = tiny.save_pair(tiny.tiny_model("llama", tokenizer, seed=0), tokenizer, Path(tmp) / "tiny-llama")

        # Throughput per suite.
        suites = {"commonsense": EvalSettings(limit=20, batch_size=8, multipl_e_languages=()),
                  "bbh": EvalSettings(limit=2, max_gen_toks=16, multipl_e_languages=()),
                  "multipl_e": EvalSettings(limit=4, max_gen_toks=32)}
        for suite, settings in ({} if args.only_overhead else suites).items():
            rates, examples = [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                frame = evaluate(model_dir, [suite], settings, data_dir=args.data_dir)
                seconds = time.perf_counter() - start
                tasks = frame[~frame.task.isin(["fuselab_bbh", "fuselab_commonsense", "fuselab_multipl_e"])]
                examples = int(tasks.drop_duplicates("task").n.sum())
                rates.append(examples / seconds)
            record(f"eval_examples_per_s_{suite}", round(statistics.median(rates), 3), "examples/s", "report",
                   COMMAND, repeats=args.repeats, examples_per_run=examples, model="tiny llama (2x32, 200 vocab)",
                   settings=repr(settings), threads=args.threads, all_runs=[round(r, 3) for r in rates])

        # Overhead over lm-eval called directly on the same generated tasks.
        settings = EvalSettings(limit=50, batch_size=8, multipl_e_languages=())
        folder, group, _ = write_suite_tasks("commonsense", args.data_dir.resolve(), Path(tmp) / "tasks")
        runs = {"fuselab": [], "lm_eval": []}
        cpu = {"fuselab": [], "lm_eval": []}
        calls = {"fuselab": lambda: evaluate(model_dir, ["commonsense"], settings, data_dir=args.data_dir),
                 "lm_eval": lambda: _direct_lm_eval(model_dir, folder, group, settings)}
        for repeat in range(args.repeats + 2):
            # Alternate which side goes first: neighbours on this shared machine load it unevenly over time.
            for name in (("fuselab", "lm_eval") if repeat % 2 == 0 else ("lm_eval", "fuselab")):
                wall, process = time.perf_counter(), time.process_time()
                calls[name]()
                runs[name].append(time.perf_counter() - wall)
                cpu[name].append(time.process_time() - process)
        ratio = statistics.median(runs["fuselab"]) / statistics.median(runs["lm_eval"])
        cpu_ratio = statistics.median(cpu["fuselab"]) / statistics.median(cpu["lm_eval"])
        record("eval_overhead_vs_lm_eval_ratio", round(ratio, 4), "ratio", "<= 1.05", COMMAND,
               repeats=args.repeats + 2, fuselab_seconds=[round(s, 3) for s in runs["fuselab"]],
               lm_eval_seconds=[round(s, 3) for s in runs["lm_eval"]], cpu_time_ratio=round(cpu_ratio, 4),
               fuselab_cpu_seconds=[round(s, 3) for s in cpu["fuselab"]],
               lm_eval_cpu_seconds=[round(s, 3) for s in cpu["lm_eval"]],
               task="fuselab_commonsense (5 tasks) limit 50, batch 8", threads=args.threads,
               note="value: ratio of median wall times; cpu_time_ratio: ratio of median process CPU times")


if __name__ == "__main__":
    main()
