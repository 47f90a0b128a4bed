"""Document splitting time against document length (issue 19: one 1M-character document took about an hour).

`fusion.data.split_documents` cuts a document into pieces that fit a block under every tokenizer. The search
used to bisect over the whole rest of the document for every piece (each probe tokenizing up to the whole rest:
quadratic); it now guesses each piece's end from one offsets-tokenization of the document and checks a few
piece-sized candidates around the guess (linear).

Documents: real text from ../shared/data/text joined into one document of N characters, once with its line
breaks (pieces end at lines) and once as a single line (pieces end at words). Tokenizers: the Llama-like "▁"
32k and the GPT-NeoX-like "Ġ" 50k of bench_mined.py, trained here on that text (not timed).

- split_seconds_1m_chars: median wall seconds of 3 splits of the 1M-character document with line breaks,
  block 256 (the micro world's), both tokenizers; details give the CPU seconds of the process (the machine's
  load average is recorded too: on a shared machine wall time is mostly waiting), block 2048, the single-line
  variant and the scaling from 10k to 1M characters.

Run: python benchmarks/bench_split.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _results import record  # noqa: E402
from bench_mined import corpus_documents, train_byte_level, train_sentencepiece_style  # noqa: E402
from fusion.data import split_documents  # noqa: E402

COMMAND = "python benchmarks/bench_split.py"


def timed(doc: str, tokenizers, block_size: int, repeats: int = 3) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (all threads) over `repeats` splits."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        pieces = split_documents([doc], tokenizers, block_size)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    assert "".join(pieces) == doc
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence length is longer than the maximum" on purpose
    docs = corpus_documents()
    tokenizers = [train_sentencepiece_style(docs, 32000), train_byte_level(docs, 50000)]
    text = "\n\n".join(docs)
    lines = text[:1_000_000]
    one_line = " ".join(text.split())[:1_000_000]
    load_before = os.getloadavg()[0]
    scaling = {n: round(timed(lines[:n], tokenizers, 256, repeats=1)[0], 3)
               for n in (10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 1_000_000)}
    print("block 256, wall seconds by characters:", scaling, flush=True)
    wall, cpu = timed(lines, tokenizers, 256)
    wall_2048, cpu_2048 = timed(lines, tokenizers, 2048)
    wall_line, cpu_line = timed(one_line, tokenizers, 256)
    load = max(load_before, os.getloadavg()[0])
    record("split_seconds_1m_chars", round(wall, 3), "s", "< 5", COMMAND,
           cpu_seconds=round(cpu, 3), block_size=256, block_2048_seconds=round(wall_2048, 3),
           block_2048_cpu_seconds=round(cpu_2048, 3), single_line_seconds=round(wall_line, 3),
           single_line_cpu_seconds=round(cpu_line, 3), wall_seconds_by_chars_block_256=scaling,
           load_average=round(load, 1), cores=os.cpu_count(),
           tokenizers="sentencepiece-style 32k + byte-level 50k",
           before="10k/20k/40k/80k characters took 0.4/1.5/4.5/21 s, 1M about an hour (quadratic)")


if __name__ == "__main__":
    main()
