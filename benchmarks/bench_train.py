"""Target-training and extraction figures, measured side by side on this machine:

- fusion_step_vs_clm_ratio: FuseLLM training step (lam=0.9, K=10) / CLM-only step (lam=1), same model and blocks,
  each step = collate + FusionTrainer.training_step (forward, loss, backward) + clip + AdamW step; steps of the
  two kinds alternate, median of each.
- fusion_peak_mem_vs_dense_ratio: peak live torch CPU memory of forward + loss + backward with the sparse loss
  (gather at the K ids) / the reference's dense-target variant ([B, L, V] target built from the top-k, then
  soft cross-entropy over the vocabulary), from the PyTorch memory profiler's timeline.
- train_flops_utilisation / extraction_flops_utilisation: achieved FLOP/s (6 resp. 2 x matmul parameters x tokens
  per second) / the fp32 matmul peak measured in this run (median of torch.mm 2048^3).
Real text: Tiny Shakespeare from ../shared/data/text; a sentencepiece-style BPE of 4000 tokens trained on it.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tiny  # noqa: E402  (tests/tiny.py: local tokenizer training and tiny model configs)
from _results import record  # noqa: E402
from fusion.data import FusionCollator, prepare_train_dataset, split_documents  # noqa: E402
from fusion.distributions import document_ids, extract_distributions, matmul_parameters, topk_arrays  # noqa: E402
from fusion.loss import fusion_loss, shift_labels  # noqa: E402
from fusion.trainer import FusionTrainer, TrainSettings, training_arguments  # noqa: E402

SHARED = Path(os.environ.get("FUSELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
COMMAND = "python benchmarks/bench_train.py"
BLOCK, BATCH, K = 256, 4, 10


def corpus_documents(n_chars: int) -> list[str]:
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()[:n_chars]
    return [s.strip() for s in text.split("\n\n") if s.strip()]


def long_documents(docs: list[str], min_chars: int) -> list[str]:
    """Speeches joined until each document has >= min_chars characters (~1 block), so matmuls are full-sized."""
    out, current = [], ""
    for doc in docs:
        current = f"{current}\n\n{doc}" if current else doc
        if len(current) >= min_chars:
            out.append(current)
            current = ""
    return out


def fused_dataset(model, tokenizer, docs: list[str]) -> datasets.Dataset:
    """The target's own top-K as the fused distribution: shapes and id spread as in a real fused dataset."""
    dist, _ = extract_distributions(model, tokenizer, docs, list(range(len(docs))), k=K, batch_size=8,
                                    progress=False)
    rows = []
    for ids, row in zip(document_ids(tokenizer, docs), dist):
        top_ids, logprobs, _ = topk_arrays(row, K)
        rows.append({"doc_id": row["doc_id"], "input_ids": ids, "fused_ids": top_ids.ravel().tolist(),
                     "fused_probs": np.exp(logprobs).ravel().tolist(), "k": K})
    return datasets.Dataset.from_list(rows)


def matmul_peak_flops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    return 2 * n ** 3 / statistics.median(times)


def make_trainer(model, lam: float, tmp: str) -> FusionTrainer:
    settings = TrainSettings(block_size=BLOCK, per_device_batch_size=BATCH, lr=1e-4, max_steps=1000,
                             warmup_ratio=0.0)
    trainer = FusionTrainer(model=model, args=training_arguments(tmp, settings), lam=lam)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    return trainer


def timed_step(trainer: FusionTrainer, collator: FusionCollator, features: list[dict]) -> tuple[float, float]:
    """One optimizer step -> (wall seconds, process CPU seconds: both torch threads, less exposed to other
    sessions on this shared machine)."""
    began, began_cpu = time.perf_counter(), time.process_time()
    # get_batch_samples counts the normalisers (predicted tokens, valid fused rows) as in Trainer.train
    batches, num_items = trainer.get_batch_samples(iter([collator(features)]), 1, torch.device("cpu"))
    trainer.training_step(trainer.model, batches[0], num_items)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - began, time.process_time() - began_cpu


def dense_reference_loss(logits, labels, fused_ids, fused_probs, lam):
    """The reference's formulation: a dense [B, L, V] target, soft cross-entropy over the whole vocabulary."""
    target = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(-1, fused_ids, fused_probs)
    mass = target.sum(-1, keepdim=True)
    target = torch.where(mass > 0, target / mass.clamp_min(1e-30), target)
    logprobs = torch.log_softmax(logits.float(), -1)
    valid = (shift_labels(labels) != -100) & (mass.squeeze(-1) > 0)
    fusion = -(target * logprobs).sum(-1)[valid].mean()
    clm = F.cross_entropy(logits.float().flatten(0, 1), shift_labels(labels).flatten(), ignore_index=-100)
    return lam * clm + (1 - lam) * fusion


def loss_only_times(vocab: int, repeats: int = 20) -> dict:
    """The loss alone (forward + backward from logits), the only part of a step that differs: min and median ms."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, BLOCK, vocab, generator=g)
    labels = torch.randint(0, vocab, (BATCH, BLOCK), generator=g)
    ids, probs = torch.randint(0, vocab, (BATCH, BLOCK, K), generator=g), torch.rand(BATCH, BLOCK, K, generator=g)
    times = {"fusion": [], "clm": []}
    for _ in range(repeats):
        for name, lam in (("fusion", 0.9), ("clm", 1.0)):
            leaf = logits.clone().requires_grad_()
            began = time.perf_counter()
            fusion_loss(leaf, labels, ids if lam < 1 else None, probs if lam < 1 else None, lam)["loss"].backward()
            times[name].append(1000 * (time.perf_counter() - began))
    return {name: {"min": round(min(t), 1), "median": round(statistics.median(t), 1)} for name, t in times.items()}


def peak_bytes(fn) -> int:
    """Peak live bytes of torch CPU allocations while fn() runs (PyTorch memory profiler timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return int(np.asarray(sizes).sum(axis=1).max())


def main() -> None:
    torch.set_num_threads(2)
    import tempfile
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    docs = corpus_documents(400_000)
    tokenizer = tiny.sentencepiece_style(vocab_size=4000, texts=docs)
    docs = split_documents(docs, [tokenizer], BLOCK)

    # --- step ratio and memory: small target (hidden 256, 4 layers, vocab ~4000, block 256) ---
    model = tiny.tiny_model("llama", tokenizer, seed=0, hidden=256, layers=4)
    data = fused_dataset(model, tokenizer, docs[:400])
    blocks = prepare_train_dataset(data, BLOCK)
    fused_features = [blocks[i] for i in range(len(blocks))]
    clm_features = [{"input_ids": f["input_ids"]} for f in fused_features]
    collator = FusionCollator(tokenizer.pad_token_id)
    fusion_trainer, clm_trainer = make_trainer(model, 0.9, tmp), make_trainer(model, 1.0, tmp)
    n_steps, fusion_times, clm_times = 24, [], []
    for step in range(n_steps + 2):
        chosen = [(step * BATCH + j) % len(fused_features) for j in range(BATCH)]
        pair = [(fusion_trainer, [fused_features[i] for i in chosen], fusion_times),
                (clm_trainer, [clm_features[i] for i in chosen], clm_times)]
        for trainer, feats, times in (pair if step % 2 == 0 else pair[::-1]):
            elapsed = timed_step(trainer, collator, feats)
            if step >= 2:                        # two warm-up steps of each kind
                times.append(elapsed)
    fusion_wall, clm_wall = [f[0] for f in fusion_times], [c[0] for c in clm_times]
    ratio = statistics.median(fusion_wall) / statistics.median(clm_wall)
    paired_wall = statistics.median(f / c for f, c in zip(fusion_wall, clm_wall))
    paired_cpu = statistics.median(f[1] / c[1] for f, c in zip(fusion_times, clm_times))
    loss_only = loss_only_times(len(tokenizer))
    record("fusion_step_vs_clm_ratio", round(ratio, 4), "x", "<= 1.15", COMMAND,
           method=f"median wall time of {n_steps} FuseLLM steps / of {n_steps} CLM steps, alternated on the same "
                  "batches (collate + forward + loss + backward + clip + AdamW)",
           paired_wall_ratio_median=round(paired_wall, 4), paired_cpu_time_ratio_median=round(paired_cpu, 4),
           min_wall_ratio=round(min(fusion_wall) / min(clm_wall), 4),
           fusion_step_ms=round(1000 * statistics.median(fusion_wall), 1),
           clm_step_ms=round(1000 * statistics.median(clm_wall), 1), steps_each=n_steps,
           loss_only_fwd_bwd_ms=loss_only,
           model=f"llama hidden 256, 4 layers, vocab {len(tokenizer)}, {matmul_parameters(model)} matmul params",
           batch=f"{BATCH} x {BLOCK} tokens, K={K}, lam=0.9 vs 1.0")

    batch = collator(fused_features[:BATCH])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}

    def sparse_step():
        logits = model(**inputs).logits
        fusion_loss(logits, batch["labels"], batch["fused_ids"], batch["fused_probs"], 0.9)["loss"].backward()

    def dense_step():
        logits = model(**inputs).logits
        dense_reference_loss(logits, batch["labels"], batch["fused_ids"], batch["fused_probs"], 0.9).backward()

    model.zero_grad(set_to_none=True)
    sparse_step(), dense_step()        # warm-up, and gradients allocated alike in both measurements
    sparse_peak, dense_peak = peak_bytes(sparse_step), peak_bytes(dense_step)
    record("fusion_peak_mem_vs_dense_ratio", round(sparse_peak / dense_peak, 4), "x", "report", COMMAND,
           sparse_peak_mib=round(sparse_peak / 2 ** 20, 1), dense_peak_mib=round(dense_peak / 2 ** 20, 1),
           scope="forward + loss + backward of one batch (parameter grads included), torch CPU allocations",
           batch=f"{BATCH} x {BLOCK} tokens, vocab {len(tokenizer)}, K={K}")

    # --- FLOP/s utilisation: a wider model so that matmuls dominate. This machine is shared and its available
    # compute drifts within seconds, so the matmul peak is measured right before and after each measured piece
    # of work and each piece is compared with the mean of its two adjacent peaks.
    big = tiny.tiny_model("llama", tokenizer, seed=0, hidden=768, layers=4)
    long_docs = split_documents(long_documents(docs[400:], 1000), [tokenizer], BLOCK)
    params = matmul_parameters(big)
    extraction = []
    for repeat in range(3):
        before = matmul_peak_flops(repeats=3)
        docs_here = long_docs[16 * repeat:16 * (repeat + 1)]
        _, stats = extract_distributions(big, tokenizer, docs_here, list(range(len(docs_here))), k=K, batch_size=8,
                                         progress=False)
        peak = (before + matmul_peak_flops(repeats=3)) / 2
        extraction.append((stats.flops_per_s / peak, stats.flops_per_s, peak, stats.tokens))
    utilisation = statistics.median(e[0] for e in extraction)
    record("extraction_flops_utilisation", round(utilisation, 4), "fraction", ">= 0.3", COMMAND,
           achieved_gflops=[round(e[1] / 1e9, 2) for e in extraction],
           peak_gflops=[round(e[2] / 1e9, 2) for e in extraction], tokens=[e[3] for e in extraction],
           method="median of 3 extraction runs (16 documents of <= 256 tokens, batch 8), each / mean of the "
                  "fp32 matmul peaks (torch.mm 2048^3) measured right before and after it",
           model=f"llama hidden 768, 4 layers, vocab {len(tokenizer)}, {params} matmul params",
           flops="2 x matmul params x tokens (attention scores not counted)")

    big_data = fused_dataset(big, tokenizer, long_docs[48:64])
    big_features = [r for r in prepare_train_dataset(big_data, BLOCK)]
    trainer = make_trainer(big, 0.9, tmp)
    training = []
    for step in range(4):
        feats = [big_features[(step * BATCH + j) % len(big_features)] for j in range(BATCH)]
        before = matmul_peak_flops(repeats=3)
        elapsed, _ = timed_step(trainer, collator, feats)
        peak = (before + matmul_peak_flops(repeats=3)) / 2
        achieved = 6 * params * sum(len(f["input_ids"]) for f in feats) / elapsed
        if step:                                 # the first step warms up AdamW's state
            training.append((achieved / peak, achieved, peak, elapsed))
    utilisation = statistics.median(t[0] for t in training)
    record("train_flops_utilisation", round(utilisation, 4), "fraction", ">= 0.3", COMMAND,
           achieved_gflops=[round(t[1] / 1e9, 2) for t in training],
           peak_gflops=[round(t[2] / 1e9, 2) for t in training], step_s=[round(t[3], 3) for t in training],
           method="median of 3 training steps (after 1 warm-up), each / mean of the fp32 matmul peaks measured "
                  "right before and after it",
           model=f"llama hidden 768, 4 layers, vocab {len(tokenizer)}, {params} matmul params",
           batch=f"{BATCH} x {BLOCK} tokens", flops="6 x matmul params x tokens (attention scores not counted); "
                                                   "lam=0.9, K=10, collate + forward + backward + clip + AdamW")

if __name__ == "__main__":
    main()
