"""Top-k next-token distributions of one model over a corpus, stored ragged (no padding) as a `datasets.Dataset`.

Per document and position t the model's K most likely next tokens (ids int32, log-probabilities in nats,
float16 on disk) plus the document's mean cross-entropy and bits per byte on the model's own tokenization.
The reference stores int64 ids and logits padded to 2048 positions (~100 bytes/token); this is ~60 bytes/token
at K = 10, and the probability mass outside the top-k is recovered on read as 1 - sum(exp(logprobs)).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import torch

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class ExtractionStats:
    """tokens: positions run through the model (no padding); seconds: wall time of the forward passes (with the
    log_softmax and top-k); flops: estimated forward FLOPs, 2 * matmul parameters * tokens (attention scores not
    counted); *_per_s: per second of that wall time."""

    tokens: int
    seconds: float
    tokens_per_s: float
    flops: float
    flops_per_s: float


def features(store_dtype: str = "float16") -> datasets.Features:
    """The column types of an extracted distributions dataset (see docs/ARCHITECTURE.md)."""
    return datasets.Features({
        "doc_id": datasets.Value("int64"),
        "n_tokens": datasets.Value("int32"),
        "topk_ids": datasets.List(datasets.Value("int32")),
        "topk_logprobs": datasets.List(datasets.Value(store_dtype)),
        "ce": datasets.Value("float32"),
        "n_bytes": datasets.Value("int32"),
        "bpb": datasets.Value("float32"),
    })


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text the reference way: no BOS, EOS appended (same ids as fusion.tokens.tokenize_document)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos_token; set "
                         "tokenizer.eos_token before extracting distributions (documents end with EOS)")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos] for ids in encoded]


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: all of them but an input embedding not tied to the output layer
    (an embedding lookup costs no FLOPs). 2 * this is the forward FLOPs per token, 6 * this forward + backward."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if embedding is not None and (output is None or embedding.weight is not output.weight):
        total -= embedding.weight.numel()
    return total


def _model_name(model) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def extract_distributions(model, tokenizer, texts: list[str], doc_ids: list[int], k: int = 10, batch_size: int = 8,
                          max_length: int | None = None, store_dtype: str = "float16",
                          progress: bool = True, label: str | None = None) -> tuple[datasets.Dataset, ExtractionStats]:
    """Run `model` over `texts` once and keep the top-k next-token distribution at every position.

    texts: one string per document; doc_ids: one int per document (unique). Documents are batched by length
    (longest first, right padding) so little compute goes to padding; results do not depend on batch_size
    beyond float noise. log_softmax is taken over the full vocabulary in float32.
    Returns (dataset with one row per document sorted by doc_id: doc_id int64, n_tokens int32,
    topk_ids list<int32> [n_tokens * k], topk_logprobs list<store_dtype> [n_tokens * k] (nats),
    ce float32 (mean nats per predicted token, n_tokens - 1 predictions), n_bytes int32 (utf-8 bytes of the text),
    bpb float32 (total nats / (ln 2 * n_bytes))), ExtractionStats).
    max_length (default: the model's max_position_embeddings) guards against documents the model cannot see
    whole: a longer document is an error naming it.
    progress: a bar over the batches, named `label` (default: the model's name or path).
    """
    if len(texts) != len(doc_ids):
        raise ValueError(f"texts ({len(texts)}) and doc_ids ({len(doc_ids)}) must have the same length")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids must be unique")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size of {_model_name(model)} ({vocab_size})")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)

    all_ids = document_ids(tokenizer, texts)
    for doc_id, ids in zip(doc_ids, all_ids):
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"document doc_id={doc_id} has {len(ids)} tokens (with EOS) under "
                             f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')!r}, more than max_length="
                             f"{max_length} of {_model_name(model)}; split it first with "
                             "fusion.data.split_documents(texts, tokenizers, block_size)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(all_ids[i]))
    results: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    was_training = model.training
    model.eval()
    tokens = 0
    seconds = 0.0
    batches = range(0, len(order), batch_size)
    if progress:
        try:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"top-{k} of {label or _model_name(model)}", unit="batch")
        except ImportError:
            pass
    try:
        for start in batches:
            members = order[start:start + batch_size]
            longest = len(all_ids[members[0]])
            input_ids = torch.full((len(members), longest), pad_id, dtype=torch.long)
            attention = torch.zeros((len(members), longest), dtype=torch.long)
            for row, i in enumerate(members):
                input_ids[row, :len(all_ids[i])] = torch.tensor(all_ids[i])
                attention[row, :len(all_ids[i])] = 1
            began = time.perf_counter()
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                top_logprobs, top_ids = logprobs.topk(k, dim=-1)                       # [b, n, k]
                next_ids = input_ids[:, 1:].to(device).unsqueeze(-1)
                token_nll = -logprobs[:, :-1].gather(-1, next_ids).squeeze(-1)        # [b, n-1]
            seconds += time.perf_counter() - began
            top_ids = top_ids.to(torch.int32).cpu().numpy()
            top_logprobs = top_logprobs.cpu().numpy()
            token_nll = token_nll.double().cpu().numpy()
            for row, i in enumerate(members):
                n = len(all_ids[i])
                tokens += n
                results[i] = (top_ids[row, :n].reshape(-1), top_logprobs[row, :n].reshape(-1),
                              float(token_nll[row, :n - 1].sum()))
    finally:
        model.train(was_training)

    table = _to_table(texts, doc_ids, all_ids, results, k, store_dtype)
    flops = 2.0 * matmul_parameters(model) * tokens
    stats = ExtractionStats(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds else 0.0,
                            flops=flops, flops_per_s=flops / seconds if seconds else 0.0)
    return table, stats


def _to_table(texts, doc_ids, all_ids, results, k, store_dtype) -> datasets.Dataset:
    # Arrow list arrays are built from flat buffers + offsets: no per-element Python objects.
    rows = sorted(range(len(texts)), key=lambda i: doc_ids[i])
    n_tokens = np.array([len(all_ids[i]) for i in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(n_tokens.astype(np.int64) * k)])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{offsets[-1]} top-k entries exceed one Arrow list column (2^31); extract in shards")
    offsets = offsets.astype(np.int32)
    flat_ids = np.concatenate([results[i][0] for i in rows]) if rows else np.zeros(0, np.int32)
    flat_lp = (np.concatenate([results[i][1] for i in rows]) if rows else np.zeros(0, np.float32))
    n_bytes = np.array([len(texts[i].encode("utf-8")) for i in rows], dtype=np.int32)
    total_nll = np.array([results[i][2] for i in rows], dtype=np.float64)
    predicted = np.maximum(n_tokens.astype(np.float64) - 1, 1)
    ce = (total_nll / predicted).astype(np.float32)
    bpb = (total_nll / (math.log(2) * np.maximum(n_bytes, 1))).astype(np.float32)
    table = pa.table({
        "doc_id": pa.array(np.array([doc_ids[i] for i in rows], dtype=np.int64)),
        "n_tokens": pa.array(n_tokens),
        "topk_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids.astype(np.int32))),
        "topk_logprobs": pa.ListArray.from_arrays(pa.array(offsets),
                                                  pa.array(flat_lp.astype(STORE_DTYPES[store_dtype]))),
        "ce": pa.array(ce),
        "n_bytes": pa.array(n_bytes),
        "bpb": pa.array(bpb),
    })
    return datasets.Dataset(datasets.table.InMemoryTable(table.cast(features(store_dtype).arrow_schema)))


def topk_arrays(row: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One dataset row -> (ids int32 [n, k], logprobs float32 [n, k] in nats, tail float32 [n]).

    tail = 1 - sum(exp(logprobs)): the probability mass the model put outside its top-k (clipped at 0,
    since float16 rounding can push the sum a hair above 1).
    """
    ids = np.asarray(row["topk_ids"], dtype=np.int32)
    logprobs = np.asarray(row["topk_logprobs"], dtype=np.float32)
    if ids.size % k or ids.size != logprobs.size:
        raise ValueError(f"row doc_id={row.get('doc_id')} has {ids.size} ids and {logprobs.size} logprobs, "
                         f"not a multiple of k={k}: was it extracted with another k?")
    ids = ids.reshape(-1, k)
    logprobs = logprobs.reshape(-1, k)
    tail = np.clip(1.0 - np.exp(logprobs).sum(axis=1), 0.0, 1.0).astype(np.float32)
    return ids, logprobs, tail
