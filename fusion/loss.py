"""The FuseLLM training objective: lambda * CLM + (1 - lambda) * soft cross-entropy to the fused top-k.

The reference implementation densifies every fused distribution to [B, L, |V|] in the collator. The soft
cross-entropy only needs the student's log-probabilities at the K fused ids: a gather of [B, L, K] values
from the log_softmax the CLM term computes anyway, so the target is never densified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> the label each position predicts, [B, L]: position t gets labels[t+1], the last -100.

    Same convention as transformers' ForCausalLMLoss, which shifts inside the loss.
    """
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


LOSS_POSITIONS = ("next_label", "attention_mask")


def valid_fusion_positions(labels: torch.Tensor, fused_probs: torch.Tensor,
                           positions: str = "next_label") -> torch.Tensor:
    """bool [B, L]: the positions the fusion term averages over.

    labels [B, L] (unshifted, -100 = ignore / padding); fused_probs [B, L, K].
    positions="next_label": positions whose next token is a training target and whose fused row has mass
    (the last position of a sequence predicts nothing in it, so it carries no target).
    positions="attention_mask": every real (non-padding) position, the last one of each sequence and rows
    without mass included, as the reference averages its soft cross-entropy over the attention mask (a row
    without mass adds 0 to the sum but still counts in the mean).
    """
    if positions == "next_label":
        return (shift_labels(labels) != IGNORE_INDEX) & (fused_probs.sum(dim=-1) > 0)
    if positions == "attention_mask":
        return labels != IGNORE_INDEX
    raise ValueError(f"loss positions must be one of {LOSS_POSITIONS}, got {positions!r}")


def clm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The HF causal-LM loss in nats per predicted token (scalar).

    logits [B, L, V]; labels [B, L] with -100 = ignore, shifted inside. With `num_items_in_batch` (the number of
    predicted tokens over all gradient-accumulation micro-batches) it is sum / num_items, as the HF Trainer does.
    The operations mirror `transformers.loss.loss_utils.ForCausalLMLoss` one for one so that lambda = 1 is
    bit-identical to the model's own `forward(labels=...)` loss.
    """
    vocab_size = logits.shape[-1]
    flat_logits = logits.float().view(-1, vocab_size)
    targets = shift_labels(labels).contiguous().view(-1).to(flat_logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="mean")
    total = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def fused_target(fused_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """fused_probs [B, L, K] -> the target distribution over the K slots, p^(1/T) renormalised, [B, L, K] float32.

    All-zero rows stay all-zero (they carry no target and are masked out of the loss).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = fused_probs.float()
    if temperature != 1.0:
        probs = probs.pow(1.0 / temperature)
    total = probs.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, probs / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(probs))


def fusion_loss(logits: torch.Tensor, labels: torch.Tensor, fused_ids: torch.Tensor | None,
                fused_probs: torch.Tensor | None, lam: float, temperature: float = 1.0,
                num_items_in_batch=None, num_fused_in_batch=None,
                positions: str = "next_label") -> dict[str, torch.Tensor]:
    """lam * CLM + (1 - lam) * soft-CE(student, fused top-k renormalised with temperature), in nats per token.

    logits [B, L, V]; labels [B, L] (-100 = ignore, HF convention: shifted inside); fused_ids [B, L, K] int;
    fused_probs [B, L, K] (position t = distribution of token t+1; rows summing to 0 are ignored).
    The fusion term is a mean over the positions `valid_fusion_positions(labels, fused_probs, positions)` selects
    (default: next label != -100 and row mass > 0; "attention_mask": every real position, the reference), or,
    under gradient accumulation, sum / `num_fused_in_batch` (those positions over all micro-batches), like the
    CLM term's `num_items_in_batch`.
    Returns {"loss", "clm_loss", "fusion_loss"}. With lam = 1 the fusion term is not computed at all
    ("fusion_loss" is absent and fused_ids/fused_probs may be None): "loss" is exactly the HF CLM loss.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the CLM weight lambda) must be in [0, 1], got {lam}")
    if lam == 1.0:
        clm = clm_loss(logits, labels, num_items_in_batch)
        return {"loss": clm, "clm_loss": clm}
    if fused_ids is None or fused_probs is None:
        raise ValueError(f"lam={lam} < 1 needs fused_ids and fused_probs (a fused dataset); "
                         "only lam=1 (CLM-only) trains from input_ids alone")
    # One log_softmax serves both terms, and one gather reads the label and the K fused ids together: the
    # backward then scatters into a single [B, L, V] gradient, exactly as cross_entropy alone does, so the
    # fusion term adds only [B, L, K] work to the CLM loss.
    if fused_ids.shape != fused_probs.shape or fused_ids.shape[:2] != logits.shape[:2]:
        raise ValueError(f"fused_ids {tuple(fused_ids.shape)} and fused_probs {tuple(fused_probs.shape)} must both "
                         f"be [B, L, K] with B, L of logits {tuple(logits.shape)}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = shift_labels(labels).to(logprobs.device)
    clm_mask = targets != IGNORE_INDEX
    ids = torch.cat([targets.clamp_min(0).unsqueeze(-1), fused_ids.to(logprobs.device).long()], dim=-1)
    gathered = logprobs.gather(-1, ids)                                           # [B, L, 1 + K]
    clm_total = -gathered[..., 0].masked_fill(~clm_mask, 0.0).sum()
    clm_denominator = num_items_in_batch if num_items_in_batch is not None else clm_mask.sum()
    if torch.is_tensor(clm_denominator):
        clm_denominator = clm_denominator.to(clm_total.device)
    clm = clm_total / clm_denominator
    valid = valid_fusion_positions(labels, fused_probs, positions).to(logprobs.device)
    target = fused_target(fused_probs.to(logprobs.device), temperature) * valid.unsqueeze(-1)
    total, count = -(target * gathered[..., 1:]).sum(), valid.sum()
    denominator = num_fused_in_batch if num_fused_in_batch is not None else count
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    # No valid row (e.g. a batch of one-token documents): the term is 0 but stays in the graph.
    fused = total / denominator if int(denominator) > 0 else total * 0.0
    loss = lam * clm + (1.0 - lam) * fused
    return {"loss": loss, "clm_loss": clm, "fusion_loss": fused}
