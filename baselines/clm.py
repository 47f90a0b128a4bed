"""CLM-only continual training: the FuseLLM trainer with lambda = 1 on the same data.

There is no second training loop: `train_clm` is `fusion.trainer.train_target(..., lam=1.0)`, so the
baseline shares the fused run's schedule, packing, collator and DeepSpeed path, and differs only in the
loss (with lam = 1 the fusion term is skipped and the loss is exactly the HF causal-LM loss).
"""
from __future__ import annotations

from pathlib import Path

import datasets

from fusion.tokens import tokenize_document
from fusion.trainer import TrainResult, TrainSettings, train_target


def clm_dataset(tokenizer, texts: list[str]) -> datasets.Dataset:
    """Plain CLM training data: doc_id int64, input_ids list<int32> [n] per text, tokenized like the fused
    dataset (`tokenize_document`: no BOS, EOS appended), so CLM-only and FuseLLM see the same tokens."""
    ids = [tokenize_document(tokenizer, text).ids.tolist() for text in texts]
    features = datasets.Features({"doc_id": datasets.Value("int64"),
                                  "input_ids": datasets.Sequence(datasets.Value("int32"))})
    return datasets.Dataset.from_dict({"doc_id": list(range(len(texts))), "input_ids": ids}, features=features)


def train_clm(model, tokenizer, dataset: datasets.Dataset, output_dir: Path, settings: TrainSettings,
              deepspeed: str | None = None, verbose: bool = True, label: str = "clm") -> TrainResult:
    """Continue training `model` with the causal-LM loss only and save it (safetensors + tokenizer) to output_dir.

    dataset: the fused dataset (its fused_ids/fused_probs columns are ignored) or any dataset with
    input_ids list<int> [n] per document (e.g. `clm_dataset`). Losses in the result are nats per token.
    verbose=False drops the per-step progress lines (prefixed with `label`).
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"CLM training dataset has no input_ids column (columns: {dataset.column_names}); "
                         f"build one with baselines.clm.clm_dataset(tokenizer, texts)")
    return train_target(model, tokenizer, dataset, Path(output_dir), settings, lam=1.0, deepspeed=deepspeed,
                        verbose=verbose, label=label)
