"""Perplexity per domain with sliding windows: token perplexity and bits per byte.

Convention for the first token: each text is scored as `[context] + tokens(text)` where the context token is the
tokenizer's BOS (or EOS when it has no BOS, as for GPT-2 style tokenizers: EOS is then the document separator the
model saw in training). Every token of the text is scored, no EOS is appended (its cost is not tied to any byte).
A tokenizer with neither BOS nor EOS leaves the first text token unscored (it has no context).

Windows (fusion.windows.plan_windows, over the N positions of a text, its context token included): `convention`
"strided" (FuseLab's, the default) cuts it into windows starting at 0, stride, 2*stride, ... of up to `window`
positions, each scoring only the tokens after the previous window's end; "lm_eval_rolling" uses lm-eval's
`loglikelihood_rolling` windows (disjoint, `window` = lm-eval's max_length, the last window with full context;
stride unused), so its totals equal lm-eval's HFLM on the same text. Either way each token is scored exactly
once. Per-window sums are accumulated in float64 in window order, so any batch_size gives the same totals (up
to matmul rounding).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from fusion.windows import plan_windows


def _context_token(tokenizer) -> int | None:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _model_max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.inference_mode()
def _window_nll(model, batch: list[list[int]], first_targets: list[int], pad_id: int, device) -> list[float]:
    """Summed nll (nats) per window: `batch` holds each window's positions [start, end) (the model reads all but
    the last), first_targets the offset of its first scored one."""
    length = max(len(ids) for ids in batch) - 1
    input_ids = torch.full((len(batch), length + 1), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids) - 1] = 1
    logits = model(input_ids=input_ids[:, :-1].to(device), attention_mask=attention.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, 1:].to(device)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
    sums = []
    for row, ids in enumerate(batch):
        # logits at position p predict token p+1: targets [first, len) are read at [first-1, len-1).
        sums.append(-float(token_lp[row, first_targets[row] - 1: len(ids) - 1].sum()))
    return sums


DOC_COLUMNS = ["domain", "doc", "n_tokens", "n_bytes", "nll_nats"]


def _domain_rows(domain: str, nll: float, n_tokens: int, n_bytes: int) -> dict:
    return {"domain": domain, "n_tokens": n_tokens, "n_bytes": n_bytes, "nll_nats": nll,
            "token_perplexity": math.exp(nll / n_tokens) if n_tokens else math.nan,
            "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else math.nan}


def perplexity_by_domain(model, tokenizer, texts_by_domain: dict[str, list[str]], *, window: int = 256,
                         stride: int = 128, batch_size: int = 8, per_document: bool = False,
                         progress: bool | str = False, convention: str = "strided"):
    """Score held-out texts per domain with an HF causal LM.

    Returns one row per domain: domain, n_tokens (scored tokens), n_bytes (utf-8 bytes of the texts),
    nll_nats (total negative log-likelihood, nats), token_perplexity = exp(nll_nats / n_tokens),
    bits_per_byte = nll_nats / (ln 2 * n_bytes) (the figure comparable across tokenizers).
    window/stride are in tokens; convention names the windows (fusion.windows.CONVENTIONS: "strided", FuseLab's;
    "lm_eval_rolling", lm-eval's loglikelihood_rolling: window = its max_length, stride unused); batch_size is
    windows per forward pass and does not change the result. per_document=True returns (that frame, one row per
    text: domain, doc (its index in the domain's list), n_tokens, n_bytes, nll_nats): the units bootstrap
    intervals and paired tests of bits per byte resample.
    progress: a bar over the windows (a string names it, e.g. the model's label).
    """
    max_positions = _model_max_positions(model)
    if max_positions is not None and window > max_positions:
        raise ValueError(f"perplexity: window={window} exceeds the model's {max_positions} positions; lower window")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    plan_windows(0, window, stride, convention)  # the settings checked before any work
    model.eval()
    device = next(model.parameters()).device
    context = _context_token(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (context or 0)
    rows, doc_rows = [], []
    bar = _bar(progress, lambda: sum(
        len(plan_windows(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + (context is not None),
                         window, stride, convention)) for texts in texts_by_domain.values() for t in texts))
    for domain, texts in texts_by_domain.items():
        jobs: list[tuple[list[int], int, int]] = []  # (window ids, first scored offset, document)
        n_tokens = n_bytes = 0
        for doc, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            sequence = ([context] if context is not None else []) + list(ids)
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(sequence) - 1
            doc_rows.append({"domain": domain, "doc": doc, "n_tokens": len(sequence) - 1,
                             "n_bytes": len(text.encode("utf-8")), "nll_nats": 0.0})
            for begin, end, first in plan_windows(len(sequence), window, stride, convention):
                jobs.append((sequence[begin:end], first - begin, doc))
        sums: list[float] = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start: start + batch_size]
            sums.extend(_window_nll(model, [c[0] for c in chunk], [c[1] for c in chunk], pad_id, device))
            if bar is not None:
                bar.update(len(chunk))
        per_doc: dict[int, list[float]] = {}
        for (_, _, doc), value in zip(jobs, sums):
            per_doc.setdefault(doc, []).append(value)
        for row in doc_rows[len(doc_rows) - len(texts):]:
            row["nll_nats"] = math.fsum(per_doc.get(row["doc"], []))
        rows.append(_domain_rows(domain, math.fsum(sums), n_tokens, n_bytes))
    if bar is not None:
        bar.close()
    return _frames(rows, doc_rows, per_document)


def _frames(rows: list[dict], doc_rows: list[dict], per_document: bool):
    """The per-domain table (and, with per_document, the per-document one) from the rows a scorer collected."""
    out = pd.DataFrame(rows, columns=["domain", "n_tokens", "n_bytes", "nll_nats", "token_perplexity",
                                      "bits_per_byte"])
    return (out, pd.DataFrame(doc_rows, columns=DOC_COLUMNS)) if per_document else out


def _bar(progress: bool | str, total):
    """A progress bar over windows named "perplexity <progress>" (or just "perplexity"), None when `progress`
    is off; `total()` counts the windows (only called when there is a bar)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    name = f"perplexity {progress}" if isinstance(progress, str) else "perplexity"
    return tqdm(total=total(), desc=name, unit="window", leave=False)


def lm_perplexity_by_domain(lm, texts_by_domain: dict[str, list[str]], *, window: int = 256,
                            stride: int = 128, per_document: bool = False, progress: bool | str = False,
                            convention: str = "strided"):
    """perplexity_by_domain for a model that scores text itself on a pivot tokenization (the output ensemble:
    baselines.ensemble.EnsembleLM.windowed_nll), with the same windows, the same first-token convention and
    the same columns (and the same per-document frame with per_document=True); token_perplexity is per pivot
    token. progress: a bar over the windows (a string names it)."""
    plan_windows(0, window, stride, convention)  # the settings checked before any work
    rows, doc_rows = [], []

    def n_windows(text: str) -> int:
        # positions: the pivot's context token + its tokens of the text
        return len(plan_windows(len(lm.pivot_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1,
                                window, stride, convention))

    bar = _bar(progress, lambda: sum(n_windows(t) for texts in texts_by_domain.values() for t in texts))
    for domain, texts in texts_by_domain.items():
        sums, n_tokens, n_bytes = [], 0, 0
        for doc, text in enumerate(texts):
            # positions: the pivot's context token + its tokens of the text
            n_text = len(lm.pivot_tokenizer(text, add_special_tokens=False)["input_ids"])
            windows = plan_windows(n_text + 1, window, stride, convention)
            nll, n = lm.windowed_nll(text, windows)
            if bar is not None:
                bar.update(len(windows))
            sums.append(nll)
            n_tokens += n
            n_bytes += len(text.encode("utf-8"))
            doc_rows.append({"domain": domain, "doc": doc, "n_tokens": n, "n_bytes": len(text.encode("utf-8")),
                             "nll_nats": float(nll)})
        rows.append(_domain_rows(domain, math.fsum(sums), n_tokens, n_bytes))
    if bar is not None:
        bar.close()
    return _frames(rows, doc_rows, per_document)
