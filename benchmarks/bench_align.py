"""Sequence alignment speed: offsets vs DTW, and FuseLab's DTW vs a plain Python DTW.

Documents of ~2k target tokens of real text (../shared/data/text: Shakespeare, a Wikipedia article, a
State of the Union speech) are tokenized by two tokenizers trained here on that text (the Llama-like
"▁" 32k target and the GPT-NeoX-like "Ġ" 50k source of bench_mined.py). Only alignment is timed:
tokenization happens once, before any clock starts.

- align_offsets_vs_dtw_speedup: sum over documents of median DTW time / median offsets time.
- align_dtw_vs_python_speedup: a plain Python DTW (lists, two nested loops, editdistance.eval per cell as
  the reference FuseLLM code does) vs fusion.align.dtw_align on the same document; paths must be identical.

Run: python benchmarks/bench_align.py
"""
from __future__ import annotations

import statistics
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import editdistance  # noqa: E402

from _results import record  # noqa: E402
from bench_mined import SHARED_TEXT, corpus_documents, train_byte_level, train_sentencepiece_style  # noqa: E402
from fusion.align import dtw_align, offsets_align  # noqa: E402
from fusion.tokens import TokenizedText, tokenize_document  # noqa: E402

COMMAND = "python benchmarks/bench_align.py"
DOC_TOKENS = 2000


def python_dtw(target: list[str], source: list[str], target_marker: str, source_marker: str) -> list[tuple[int, int]]:
    """The reference algorithm as plain Python: full accumulated matrix, then the traceback."""
    inf = float("inf")
    n, m = len(target), len(source)
    target = [t.replace(target_marker, "") for t in target]
    source = [s.replace(source_marker, "") for s in source]
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0
    for i in range(n):
        row, above = acc[i + 1], acc[i]
        for j in range(m):
            row[j + 1] = editdistance.eval(target[i], source[j]) + min(above[j + 1], row[j], above[j])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = acc[i][j] if i > 0 and j > 0 else inf
        up = acc[i][j + 1] if i > 0 else inf
        left = acc[i + 1][j] if j > 0 else inf
        # the reference's matrix is [source, target]: its ties go diagonal, source back (j here), target back
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        path.append((i, j))
    return path[::-1]


def benchmark_texts() -> list[tuple[str, str]]:
    shakespeare = (SHARED_TEXT / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    wiki = (SHARED_TEXT / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:40_000]
    with zipfile.ZipFile(SHARED_TEXT / "nltk" / "state_union.zip") as archive:
        speech = archive.read("state_union/1962-Kennedy.txt").decode("utf-8", errors="replace")
    return [("tinyshakespeare", shakespeare), ("wikitext-2 test", wiki), ("state_union 1962", speech)]


def cut_to_tokens(tokenizer, text: str, n_tokens: int) -> str:
    """The prefix of `text` that the tokenizer turns into about n_tokens tokens (EOS included)."""
    doc = tokenize_document(tokenizer, text, add_eos=False)
    if len(doc) < n_tokens:
        raise SystemExit(f"benchmark text too short: {len(doc)} tokens < {n_tokens}")
    return text[: int(doc.offsets[n_tokens - 2, 1])]


def median_seconds(fn, repeats: int, inner: int = 1) -> tuple[float, float]:
    """(median wall seconds per call, median CPU seconds per call) over `repeats` batches of `inner` calls.
    CPU time is reported too: on a shared 2-core machine a microsecond-scale call loses more of its wall
    time to preemption than a 50 ms one."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        wall.append((time.perf_counter() - start) / inner)
        cpu.append((time.process_time() - start_cpu) / inner)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    docs = corpus_documents()
    target_tok = train_sentencepiece_style(docs, 32_000)
    source_tok = train_byte_level(docs, 50_000)
    pairs: list[tuple[str, TokenizedText, TokenizedText]] = []
    for name, text in benchmark_texts():
        text = cut_to_tokens(target_tok, text, DOC_TOKENS)
        pairs.append((name, tokenize_document(target_tok, text), tokenize_document(source_tok, text)))

    dtw_total = offsets_total = dtw_cpu = offsets_cpu = 0.0
    details = []
    for name, target, source in pairs:
        dtw_s, dtw_c = median_seconds(lambda: dtw_align(target, source), repeats=3)
        offsets_s, offsets_c = median_seconds(lambda: offsets_align(target, source), repeats=5, inner=200)
        dtw_total, offsets_total = dtw_total + dtw_s, offsets_total + offsets_s
        dtw_cpu, offsets_cpu = dtw_cpu + dtw_c, offsets_cpu + offsets_c
        one_dtw = dtw_align(target, source).one_to_one()
        one_off = offsets_align(target, source).one_to_one()
        agree = float((one_dtw == one_off).mean())
        details.append(f"{name}: {len(target)}x{len(source)} tokens, dtw {dtw_s * 1e3:.1f} ms "
                       f"(cpu {dtw_c * 1e3:.1f}), offsets {offsets_s * 1e6:.1f} us (cpu {offsets_c * 1e6:.1f}), "
                       f"one_to_one agreement {agree:.3f}")
        print(details[-1])
    record("align_offsets_vs_dtw_speedup", round(dtw_total / offsets_total, 1), "x", ">= 1000", COMMAND,
           cpu_time_ratio=round(dtw_cpu / offsets_cpu, 1), documents=details,
           timing="wall clock; dtw median of 3, offsets median of 5 x 200 calls; tokenization excluded")

    name, target, source = pairs[0]
    fast_times, python_times = [], []
    for _ in range(3):  # interleaved so both see the same machine load
        start = time.perf_counter()
        fast = dtw_align(target, source).pairs.tolist()
        fast_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        slow = python_dtw(target.tokens, source.tokens, target.marker, source.marker)
        python_times.append(time.perf_counter() - start)
        if fast != [list(p) for p in slow]:
            raise SystemExit(f"fusion dtw and the plain Python DTW disagree on {name}")
    fast_s, python_s = statistics.median(fast_times), statistics.median(python_times)
    offsets_first, _ = median_seconds(lambda: offsets_align(target, source), repeats=5, inner=200)
    print(f"{name}: python dtw {python_s:.2f} s, fusion dtw {fast_s * 1e3:.1f} ms, paths identical")
    record("align_dtw_vs_python_speedup", round(python_s / fast_s, 1), "x", ">= 20", COMMAND,
           document=f"{name}: {len(target)}x{len(source)} tokens", python_seconds=round(python_s, 3),
           fusion_seconds=round(fast_s, 4), paths_identical=True,
           offsets_vs_python_dtw_speedup=round(python_s / offsets_first, 1),
           baseline="plain Python loops, editdistance.eval per cell (as the reference FuseLLM code)")


if __name__ == "__main__":
    main()
