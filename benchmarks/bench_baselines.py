"""Baseline benchmarks: output-ensemble evaluation cost and weight-merging times.

ensemble_eval_time_ratio: lm-eval time of an N-member EnsembleLM on a local multiple-choice task
(ARC-Easy rows from ../shared/data) / (sum of the N members' own lm-eval HFLM times, same task, same
limit), i.e. ensemble time / (N x single-model time). Measured side by side, medians of >= 3 repeats.
Extra fields time greedy generation (generate_until, few-shot-length prompts): the ensemble recomputing
every step one request at a time, with per-member KV caches one request at a time, and with KV caches and the
6 requests batched (the default), vs the members' own HFLM generation (batched too).
merge_seconds_<method>: merge_models wall time per mergekit method on locally built Llamas.

Run: python benchmarks/bench_baselines.py  [--limit 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import tiny  # noqa: E402
from _results import record  # noqa: E402

SHARED_DATA = Path(os.environ.get("FUSELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
COMMAND = "python benchmarks/bench_baselines.py"


def arc_rows(limit: int) -> list[dict]:
    path = SHARED_DATA / "commonsense" / "arc_easy_test.llmfoundry.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: set FUSELAB_SHARED_DATA to the shared data folder")
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


def write_task(root: Path, rows: list[dict]) -> str:
    data = root / "arc_bench.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "arc_bench.yaml").write_text(f"""task: fuselab_arc_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{query}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
""")
    return "fuselab_arc_bench"


def timed_eval(lm, task: str, task_manager) -> float:
    import lm_eval

    start = time.perf_counter()
    lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, num_fewshot=0, random_seed=0,
                            bootstrap_iters=0, log_samples=False)
    return time.perf_counter() - start


def bench_ensemble(root: Path, limit: int, repeats: int) -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from baselines.ensemble import EnsembleLM

    rows = arc_rows(max(limit, 200))
    corpus = [r["query"] + " " + " ".join(r["choices"]) for r in rows]
    sp = tiny.sentencepiece_style(vocab_size=2000, texts=corpus)
    bpe = tiny.byte_level(vocab_size=2000, texts=corpus)
    # two members share the pivot tokenizer, the third is aligned and mapped (the paper's mixed pool)
    members = [(tiny.tiny_model("llama", sp, seed=0, hidden=256, layers=4), sp),
               (tiny.tiny_model("llama", sp, seed=1, hidden=256, layers=4), sp),
               (tiny.tiny_model("gpt2", bpe, seed=2, hidden=256, layers=4), bpe)]
    task = write_task(root, rows[:limit])
    tm = TaskManager(include_path=str(root))
    batch_size = 8
    ens = EnsembleLM(members, pivot=0, combiner="mean", alignment="offsets", vocab_map="em", batch_size=batch_size)
    singles = [HFLM(pretrained=m, tokenizer=t, batch_size=batch_size, device="cpu") for m, t in members]
    timed_eval(singles[0], task, tm)  # warm-up: dataset build, kernels
    ens_times, single_sums = [], []
    for _ in range(repeats):
        ens_times.append(timed_eval(ens, task, tm))
        single_sums.append(sum(timed_eval(s, task, tm) for s in singles))
    ratio = statistics.median(ens_times) / statistics.median(single_sums)

    # the same requests straight to loglikelihood(): model work only, without lm-eval's per-run task setup
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, (f"Question: {r['query']}\nAnswer:", " " + c), i)
                for i, r in enumerate(rows[:limit]) for c in r["choices"]]

    def ll_time(lm) -> float:
        start = time.perf_counter()
        lm.loglikelihood(requests, disable_tqdm=True)
        return time.perf_counter() - start

    ll_ens = statistics.median(ll_time(ens) for _ in range(repeats))
    ll_sum = statistics.median(sum(ll_time(s) for s in singles) for _ in range(repeats))
    # generation: few-shot-length prompts (several ARC questions each), 32 new tokens, no stop string
    prompts = ["\n\n".join(f"Question: {r['query']}\nAnswer: {r['choices'][0]}" for r in rows[i:i + 4]) + "\nQuestion:"
               for i in range(0, 4 * 6, 4)]
    gen_requests = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 32}), i)
                    for i, p in enumerate(prompts)]
    ens_full = EnsembleLM(members, pivot=0, combiner="mean", alignment="offsets", vocab_map="em",
                          batch_size=batch_size, kv_cache=False)
    ens_rows = EnsembleLM(members, pivot=0, combiner="mean", alignment="offsets", vocab_map="em", batch_size=1)

    def gen_time(lm) -> tuple[float, list[str]]:
        start = time.perf_counter()
        out = lm.generate_until(gen_requests, disable_tqdm=True)
        return time.perf_counter() - start, out

    gen_cached, gen_full, gen_rows, gen_single = [], [], [], []
    for _ in range(repeats):
        t, out_cached = gen_time(ens)
        gen_cached.append(t)
        t, out_full = gen_time(ens_full)
        gen_full.append(t)
        t, out_rows = gen_time(ens_rows)
        gen_rows.append(t)
        gen_single.append(sum(gen_time(s)[0] for s in singles))
    if not out_cached == out_full == out_rows:
        raise SystemExit("ensemble generation with the KV cache / batched differs from full recomputation")
    prompt_tokens = statistics.median(len(sp(p)["input_ids"]) for p in prompts)
    record("ensemble_eval_time_ratio", round(ratio, 3), "ratio", "report (<= 1.0 means shared work)", COMMAND,
           members="2 x llama (shared pivot tokenizer) + 1 x gpt2 (own tokenizer), hidden 256, 4 layers, vocab 2000",
           task=f"ARC-Easy multiple choice, {limit} docs, 0-shot", batch_size=batch_size, repeats=repeats,
           ensemble_seconds_median=round(statistics.median(ens_times), 3),
           single_models_sum_seconds_median=round(statistics.median(single_sums), 3),
           loglikelihood_only_ratio=round(ll_ens / ll_sum, 3), loglikelihood_only_ensemble_seconds=round(ll_ens, 3),
           loglikelihood_only_single_sum_seconds=round(ll_sum, 3), requests=len(requests),
           generation=f"{len(prompts)} prompts (median {prompt_tokens:.0f} pivot tokens), 32 greedy tokens",
           generation_kv_cache_batched_seconds=round(statistics.median(gen_cached), 3),
           generation_kv_cache_rows_seconds=round(statistics.median(gen_rows), 3),
           generation_recompute_seconds=round(statistics.median(gen_full), 3),
           generation_kv_cache_speedup=round(statistics.median(gen_full) / statistics.median(gen_rows), 2),
           generation_batching_speedup=round(statistics.median(gen_rows) / statistics.median(gen_cached), 2),
           generation_ratio_vs_single_models=round(statistics.median(gen_cached) / statistics.median(gen_single), 3),
           generation_outputs_identical=True,
           torch_threads=torch.get_num_threads())


def bench_merges(root: Path, repeats: int) -> None:
    from baselines.merging import MERGE_METHODS, merge_models

    tok = tiny.sentencepiece_style(vocab_size=2000, texts=[" ".join(r["query"] for r in arc_rows(400))])
    paths = [tiny.save_pair(tiny.tiny_model("llama", tok, seed=s, hidden=256, layers=4), tok, root / f"m{s}")
             for s in range(3)]
    n_params = sum(p.numel() for p in tiny.tiny_model("llama", tok, seed=0, hidden=256, layers=4).parameters())
    for method in MERGE_METHODS.names():
        spec = MERGE_METHODS.get(method)
        base = paths[0] if spec.needs_base else None
        models = paths[1:2] if spec.n_models == 1 else (paths[1:] if spec.needs_base else paths)
        times = []
        for r in range(repeats):
            out = root / f"merged-{method}-{r}"
            start = time.perf_counter()
            merge_models(models, method, out, base_model=base)
            times.append(time.perf_counter() - start)
        record(f"merge_seconds_{method}", round(statistics.median(times), 4), "s", "report", COMMAND,
               models=len(models), base=base is not None, parameters_per_model=n_params, repeats=repeats,
               all_seconds=[round(t, 4) for t in times])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="multiple-choice documents per evaluation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["ensemble", "merge"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread gives steadier side-by-side timings
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-baselines-") as tmp:
        root = Path(tmp)
        if args.only in (None, "merge"):
            bench_merges(root, args.repeats)
        if args.only in (None, "ensemble"):
            bench_ensemble(root, args.limit, args.repeats)


if __name__ == "__main__":
    main()
