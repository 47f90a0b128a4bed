"""MinED vocabulary map at paper scale: a 32k-token source vocabulary onto a 50k-token target vocabulary.

Two tokenizers are trained here with the `tokenizers` library on the real text in ../shared/data/text
(a Llama-like sentencepiece-style "▁" BPE at 32k and a GPT-NeoX-like byte-level "Ġ" BPE at 50k, the
paper's OpenLLaMA/MPT -> Llama-2 situation), their vocabularies normalised with `normalized_vocab`, and
`fusion.vocab.mined_map` timed (median of 3). The map is checked against a brute-force scan on a random
sample of 500 source tokens.

Run: python benchmarks/bench_mined.py
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import editdistance  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from _results import record  # noqa: E402
from fusion.tokens import normalized_vocab  # noqa: E402
from fusion.vocab import mined_map  # noqa: E402

SHARED_TEXT = Path(os.environ.get("FUSELAB_SHARED_DATA", ROOT.parent / "shared" / "data")) / "text"
COMMAND = "python benchmarks/bench_mined.py"


def corpus_documents() -> list[str]:
    """All real text in ../shared/data/text as a list of documents (read-only, never copied)."""
    if not SHARED_TEXT.is_dir():
        raise SystemExit(f"shared text folder {SHARED_TEXT} is absent: set FUSELAB_SHARED_DATA to the data folder")
    docs: list[str] = []
    docs.append((SHARED_TEXT / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    for split in ("valid", "test"):
        docs += (SHARED_TEXT / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8").split("\n = ")
    with open(SHARED_TEXT / "pubmed_qa_labeled.llmfoundry.jsonl", encoding="utf-8") as fh:
        docs += [json.loads(line)["context"] for line in fh]
    with open(SHARED_TEXT / "lambada_openai.llmfoundry.jsonl", encoding="utf-8") as fh:
        docs += [(row := json.loads(line))["context"] + row["continuation"] for line in fh]
    for name in ("inaugural", "state_union", "webtext"):
        with zipfile.ZipFile(SHARED_TEXT / "nltk" / f"{name}.zip") as archive:
            for member in archive.namelist():
                if member.endswith(".txt"):
                    docs.append(archive.read(member).decode("utf-8", errors="replace"))
    return [d for d in docs if d.strip()]


def _chunks(docs: list[str], size: int = 10_000):
    for doc in docs:
        for start in range(0, len(doc), size):
            yield doc[start:start + size]


def train_sentencepiece_style(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-like: Metaspace "▁" BPE with byte fallback ("<0xNN>" tokens for unseen bytes)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                 prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=1000,
                                  show_progress=False)
    tok.train_from_iterator(_chunks(docs), trainer)
    # The trainer registers the byte pieces as special added tokens; in Llama they are ordinary vocabulary
    # (ids 3..258), so keep them in the model vocab and drop them from the added-token list.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def train_byte_level(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-NeoX-like: byte-level "Ġ" BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chunks(docs), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")


def brute_force(source_text: str, target_vocab: list[str]) -> int:
    best, best_id = None, -1
    for idx, text in enumerate(target_vocab):
        d = editdistance.eval(source_text, text)
        if best is None or d < best:
            best, best_id = d, idx
    return best_id


def main() -> None:
    docs = corpus_documents()
    t0 = time.perf_counter()
    source_tok = train_sentencepiece_style(docs, 32_000)
    target_tok = train_byte_level(docs, 50_000)
    print(f"trained tokenizers in {time.perf_counter() - t0:.1f} s: source {len(source_tok)}, target {len(target_tok)}")
    source_vocab = normalized_vocab(source_tok)
    target_vocab = normalized_vocab(target_tok)
    exact = len(set(source_vocab) & set(target_vocab))
    print(f"source {len(source_vocab)} tokens, target {len(target_vocab)}, {exact} distinct texts in both")

    times = []
    result = None
    for _ in range(3):
        start = time.perf_counter()
        result = mined_map(source_vocab, target_vocab, workers=-1)
        times.append(time.perf_counter() - start)
        print(f"mined_map: {times[-1]:.2f} s")
    mapped = result.source_to_target

    rng = random.Random(0)
    sample = rng.sample(range(len(source_vocab)), 500)
    mismatches = [i for i in sample if brute_force(source_vocab[i], target_vocab) != mapped[i]]
    if mismatches:
        raise SystemExit(f"MinED differs from brute force for source ids {mismatches[:10]}")
    print("identical to brute force on 500 sampled source tokens")

    record("mined_map_seconds_32k_50k", round(statistics.median(times), 2), "s", "<= 120", COMMAND,
           repeats=[round(t, 2) for t in times], source_vocab=len(source_vocab), target_vocab=len(target_vocab),
           exact_matches=sum(1 for i, text in enumerate(source_vocab) if target_vocab[mapped[i]] == text),
           pairs_scanned=f"{len(source_vocab)} x {len(target_vocab)} minus exact matches",
           tokenizers="trained on ../shared/data/text: Metaspace BPE (byte fallback) 32k, byte-level BPE 50k")


if __name__ == "__main__":
    main()
