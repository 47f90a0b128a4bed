"""Training data for the target: document splitting, packing into blocks, and the batch collator.

Reference FuseLLM behaviour: documents are tokenized without BOS and with EOS, concatenated and cut into
blocks of `block_size` tokens with attention across document boundaries ("packing without reset").
Both choices are options here (`add_bos`, `cross_document_attention`), so their effect can be measured.
"""
from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Callable, Iterable

import datasets
import numpy as np
import torch

from .loss import IGNORE_INDEX

_WORDS = re.compile(r"\s*\S+\s*|\s+")


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_documents(texts: list[str], tokenizers: list, block_size: int, reserve: int = 1) -> list[str]:
    """Split documents so that under every tokenizer each piece plus `reserve` special tokens (EOS) fits block_size.

    Pieces break at line boundaries, then at whitespace, and inside a word only when a single word is longer
    than a block. Each piece is the longest run of units (lines; words; characters) from where the previous
    piece ended that still fits. Whitespace stays attached to the end of the piece before the break, so
    "".join(pieces of a document) == the document. Documents that fit already are returned unchanged.
    Returns the pieces of all documents in order, as one flat list of strings.

    Time is linear in the document's length: each tokenizer reads a long document once, in chunks with character
    offsets, to guess where each piece ends; then only a few piece-sized candidates around each guess are
    tokenized again, to make the cut exact.
    """
    if block_size - reserve < 1:
        raise ValueError(f"block_size={block_size} leaves no room for text after {reserve} reserved token(s)")
    if not tokenizers:
        raise ValueError("split_documents needs at least one tokenizer (the target's and every source's)")
    budget = block_size - reserve
    counters = [_counter(tok) for tok in tokenizers]
    # A document longer than this many characters cannot fit under that tokenizer (no token covers more than
    # its string's length, x4 for normalisers that expand text): skip tokenizing it whole.
    hopeless = [4 * budget * _longest_token(tok) for tok in tokenizers]

    pieces: list[str] = []
    for text in texts:
        if all(len(text) <= limit for limit in hopeless) and all(count(text) <= budget for count in counters):
            pieces.append(text)
        else:
            pieces.extend(_split(text, tokenizers, counters, budget, level=0))
    return pieces


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` that computes exactly what `tokenizer(text)` returns, or None."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, name) is not getattr(PreTrainedTokenizerFast, name)
           for name in ("__call__", "_encode_plus")):
        return None  # a subclass that changes the text or the encoding on the Python side
    return tokenizer.backend_tokenizer


def _counter(tokenizer) -> Callable[[str], int]:
    """token_count(tokenizer, text) as a function; straight through the Rust tokenizer where that is identical."""
    backend = _backend(tokenizer)
    if backend is None:
        return lambda text: token_count(tokenizer, text)
    return lambda text: len(backend.encode(text, add_special_tokens=False))


def _longest_token(tokenizer) -> int:
    try:
        return max(max(map(len, tokenizer.get_vocab())), 1)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 1 << 30  # unknown: never assume a document is too long


def _units(text: str, level: int) -> list[str]:
    if level == 0:
        return text.splitlines(keepends=True)
    if level == 1:
        return _WORDS.findall(text)
    return list(text)


_GUESS_CHUNK_CHARS = 8192


def _token_starts(tokenizer, text: str, bounds: list[int]) -> list[int] | None:
    """Approximate character offset where each token of `text` starts (chunks cut at unit boundaries are
    tokenized separately: cheaper than one huge call, and only a guess is needed); None without offsets."""
    backend = _backend(tokenizer)
    if backend is None:
        return None
    cuts = [0]
    while cuts[-1] < len(text):
        k = bisect.bisect_left(bounds, cuts[-1] + _GUESS_CHUNK_CHARS)
        cuts.append(bounds[k] if k < len(bounds) else len(text))
    encodings = backend.encode_batch([text[a:b] for a, b in zip(cuts, cuts[1:])], add_special_tokens=False)
    starts: list[int] = []
    for offset, encoding in zip(cuts, encodings):
        starts.extend(offset + start for start, _ in encoding.offsets)
    return starts if all(a <= b for a, b in zip(starts, starts[1:])) else None


def _split(text: str, tokenizers: list, counters: list, budget: int, level: int) -> list[str]:
    """Pieces of `text`, which does not fit as a whole, cut at the units of `level` (or finer)."""
    units = _units(text, level)
    n = len(units)
    if n == 1 and level < 2:  # one unit that does not fit (a single line, a single word): cut it finer
        return _split(text, tokenizers, counters, budget, level + 1)
    bounds = [0]  # bounds[k]: character offset where unit k starts (bounds[n] == len(text))
    for unit in units:
        bounds.append(bounds[-1] + len(unit))
    starts = [_token_starts(tok, text, bounds) for tok in tokenizers]
    # The tokenizer with the most tokens is checked first: it is the one that usually says "does not fit".
    order = sorted(range(len(counters)), key=lambda i: -len(starts[i] or ()))

    def guess(first: int) -> int:
        # Where the piece starting at unit `first` ends if it keeps the document's own tokens: under each
        # tokenizer, `budget` tokens from the first token that starts in the piece. Off by a boundary token or
        # two; the searches below make the cut exact.
        end_char = len(text)
        for token_starts in starts:
            if token_starts is None:
                return first + 1
            i = bisect.bisect_left(token_starts, bounds[first])
            if i + budget < len(token_starts):
                end_char = min(end_char, token_starts[i + budget])
        return max(first + 1, bisect.bisect_right(bounds, end_char) - 1)

    def fits(first: int, end: int) -> bool:
        piece = "".join(units[first:end])
        return all(counters[i](piece) <= budget for i in order)

    pieces: list[str] = []
    first = 0
    while first < n:
        # The largest end with units[first:end] fitting (token counts grow with the text): gallop from the
        # guess to bracket it, then bisect the bracket.
        probe = min(guess(first), n)
        step = 1
        if fits(first, probe):
            low, high = probe, n
            while low < n:
                candidate = min(low + step, n)
                if not fits(first, candidate):
                    high = candidate - 1
                    break
                low, step = candidate, step * 2
        else:
            low, high = first, probe - 1
            while high > first:
                candidate = max(probe - step, first)
                if candidate == first or fits(first, candidate):
                    low = candidate
                    break
                high, step = candidate - 1, step * 2
        while low < high:
            mid = (low + high + 1) // 2
            if fits(first, mid):
                low = mid
            else:
                high = mid - 1
        if low == first:
            unit = units[first]
            if level == 2:
                raise ValueError(f"the single character {unit!r} does not fit a block under some tokenizer")
            pieces.extend(_split(unit, tokenizers, counters, budget, level + 1))
            first += 1
        else:
            pieces.append("".join(units[first:low]))
            first = low
    return pieces


def _with_bos(row: dict, bos_token_id: int) -> dict:
    out = dict(row)
    out["input_ids"] = [bos_token_id] + list(row["input_ids"])
    if "fused_ids" in row:
        k = int(row["k"])
        # The BOS position predicts the first token, for which no fused distribution exists: an empty row.
        out["fused_ids"] = [0] * k + list(row["fused_ids"])
        out["fused_probs"] = [0.0] * k + list(row["fused_probs"])
    return out


def pack_documents(rows: Iterable[dict], block_size: int) -> list[dict]:
    """Concatenate documents and cut them into blocks of block_size tokens (the last block may be shorter).

    rows: dicts with input_ids [n] and, for fusion, fused_ids / fused_probs [n * k] and k.
    Returns blocks with input_ids [<= block_size], position_ids [same] (restarting at 0 at each document
    and each block start, so that the collator can keep documents from attending to each other), and the
    matching fused_ids / fused_probs [len * k] and k when the rows have them.
    """
    blocks: list[dict] = []
    ids: list[int] = []
    positions: list[int] = []
    f_ids: list = []
    f_probs: list = []
    k = None
    for row in rows:
        has_fused = "fused_ids" in row
        if k is None and has_fused:
            k = int(row["k"])
        if has_fused != (k is not None) or (has_fused and int(row["k"]) != k):
            raise ValueError(f"document doc_id={row.get('doc_id')} has fused columns with k={row.get('k')} "
                             f"unlike the documents before it (k={k}): a fused dataset must have one k")
        n = len(row["input_ids"])
        ids.extend(row["input_ids"])
        positions.extend(range(n))
        if has_fused:
            f_ids.extend(row["fused_ids"])
            f_probs.extend(row["fused_probs"])
    for start in range(0, len(ids), block_size):
        end = min(start + block_size, len(ids))
        block_positions = np.asarray(positions[start:end])
        # A document cut by the block start restarts its positions at 0 too.
        first_doc_end = np.flatnonzero(block_positions == 0)
        head = first_doc_end[0] if len(first_doc_end) else len(block_positions)
        block_positions[:head] = np.arange(head)
        block = {"input_ids": ids[start:end], "position_ids": block_positions.tolist()}
        if k is not None:
            block["fused_ids"] = f_ids[start * k:end * k]
            block["fused_probs"] = f_probs[start * k:end * k]
            block["k"] = k
        blocks.append(block)
    return blocks


def prepare_train_dataset(dataset: datasets.Dataset, block_size: int, packing: bool = True, add_bos: bool = False,
                          bos_token_id: int | None = None, fusion: bool = True) -> datasets.Dataset:
    """A fused (or input_ids-only) dataset -> training examples of at most block_size tokens.

    dataset columns: input_ids list<int> [n] and, when `fusion`, fused_ids / fused_probs [n * k] and k.
    packing=True: blocks from `pack_documents`; packing=False: one example per document, each must fit.
    Returns a dataset with input_ids, position_ids (and fused_ids, fused_probs, k when `fusion`).
    """
    wanted = ["input_ids"] + (["fused_ids", "fused_probs", "k"] if fusion else [])
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise ValueError(f"training dataset lacks column(s) {missing} (has {dataset.column_names}); "
                         "lam < 1 needs a fused dataset, lam = 1 only input_ids")
    if add_bos and bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id; set add_bos=False or a BOS token")
    dataset = dataset.select_columns(wanted + (["doc_id"] if "doc_id" in dataset.column_names else []))

    def convert(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        if add_bos:
            rows = [_with_bos(r, bos_token_id) for r in rows]
        if packing:
            out_rows = pack_documents(rows, block_size)
        else:
            for r in rows:
                if len(r["input_ids"]) > block_size:
                    raise ValueError(f"document doc_id={r.get('doc_id')} has {len(r['input_ids'])} tokens, more "
                                     f"than block_size={block_size}; split it with fusion.data.split_documents "
                                     "or turn packing on")
                r["position_ids"] = list(range(len(r["input_ids"])))
                r.pop("doc_id", None)
            out_rows = rows
        return {c: [r[c] for r in out_rows] for c in wanted + ["position_ids"]}

    # the result goes to a private file of this process: never beside `dataset`'s own files (a published stage
    # folder, read by other runs at the same time, must not change)
    return dataset.map(convert, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       desc="packing" if packing else "checking lengths", cache_file_name=_private_cache_file())


_PRIVATE_DIR: list[Path] = []


def _private_cache_file() -> str:
    """A fresh file name in this process's temporary folder (removed when the process exits)."""
    import atexit
    import shutil
    import tempfile
    import uuid

    if not _PRIVATE_DIR:
        folder = Path(tempfile.mkdtemp(prefix="fuselab-train-data-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _PRIVATE_DIR.append(folder)
    return str(_PRIVATE_DIR[0] / f"{uuid.uuid4().hex}.arrow")


class FusionCollator:
    """Pads training examples into a batch.

    Returns input_ids [B, L] int64; labels [B, L] (-100 on padding); attention_mask [B, L], or, with
    cross_document_attention=False, position_ids [B, L] restarting at every document and no attention_mask
    (transformers then builds a block-diagonal causal mask from the position resets); and when the examples
    carry them fused_ids [B, L, K] int64 and fused_probs [B, L, K] float32 aligned with input_ids (padding: prob 0).
    """

    def __init__(self, pad_token_id: int, cross_document_attention: bool = True):
        self.pad_token_id = pad_token_id
        self.cross_document_attention = cross_document_attention

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        batch, longest = len(features), max(lengths)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, longest), dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            input_ids[row, :n] = ids
            labels[row, :n] = ids
            attention[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels}
        if self.cross_document_attention:
            out["attention_mask"] = attention
        else:
            # Padding restarts at 0 too, so it forms its own segment that no real token attends to.
            positions = torch.zeros((batch, longest), dtype=torch.long)
            for row, (f, n) in enumerate(zip(features, lengths)):
                own = f.get("position_ids")
                positions[row, :n] = torch.as_tensor(own if own is not None else range(n), dtype=torch.long)
                positions[row, n:] = torch.arange(longest - n)
            out["position_ids"] = positions
        if "fused_ids" in features[0]:
            k = int(features[0]["k"])
            fused_ids = torch.zeros((batch, longest, k), dtype=torch.long)
            fused_probs = torch.zeros((batch, longest, k), dtype=torch.float32)
            for row, (f, n) in enumerate(zip(features, lengths)):
                if len(f["fused_ids"]) != n * k or len(f["fused_probs"]) != n * k:
                    raise ValueError(f"example {row} has {len(f['fused_ids'])} fused ids for {n} tokens x k={k}")
                fused_ids[row, :n] = torch.as_tensor(f["fused_ids"], dtype=torch.long).view(n, k)
                fused_probs[row, :n] = torch.as_tensor(f["fused_probs"], dtype=torch.float32).view(n, k)
            out["fused_ids"] = fused_ids
            out["fused_probs"] = fused_probs
        return out
