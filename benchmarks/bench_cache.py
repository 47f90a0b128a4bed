"""cache_bytes_per_token_k10: on-disk bytes of a saved top-10 distributions dataset per token, one model.

Real text (Tiny Shakespeare speeches from ../shared/data/text), a tokenizer trained on it, a tiny Llama.
The reference stores int64 ids + fp32 logits padded to 2048 positions (~100 bytes/token/model before padding);
here int32 ids (40 bytes) + float16 logprobs (20 bytes) per token, ragged.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import tiny  # noqa: E402  (tests/tiny.py: local tokenizer training and tiny model configs)
from _results import record  # noqa: E402
from fusion.data import split_documents  # noqa: E402
from fusion.distributions import extract_distributions  # noqa: E402

SHARED = Path(os.environ.get("FUSELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
N_DOCS = 300


def documents(n: int) -> list[str]:
    """Speeches of Tiny Shakespeare (blank-line separated), merged in pairs so documents are ~100-200 tokens."""
    speeches = [s.strip() for s in (SHARED / "text" / "tinyshakespeare.txt").read_text().split("\n\n") if s.strip()]
    return ["\n\n".join(speeches[i:i + 2]) for i in range(0, 2 * n, 2)]


def main() -> None:
    torch.set_num_threads(2)
    docs = documents(N_DOCS)
    tokenizer = tiny.sentencepiece_style(vocab_size=2000, texts=docs)
    docs = split_documents(docs, [tokenizer], block_size=512)
    model = tiny.tiny_model("llama", tokenizer, seed=0, hidden=64, layers=2)
    ds, stats = extract_distributions(model, tokenizer, docs, list(range(len(docs))), k=10, batch_size=16,
                                      max_length=512, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        ds.save_to_disk(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    tokens = int(sum(ds["n_tokens"]))
    record("cache_bytes_per_token_k10", round(size / tokens, 3), "bytes/token", "<= 62",
           "python benchmarks/bench_cache.py", documents=len(docs), tokens=tokens, bytes_on_disk=size,
           source="tinyshakespeare.txt speeches (pairs)", model="tiny llama h64, sp-BPE vocab 2000", k=10,
           store_dtype="float16")


if __name__ == "__main__":
    main()
