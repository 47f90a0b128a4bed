import math

import pytest
import torch

import tiny
from fusion.loss import fusion_loss


@pytest.fixture(scope="module")
def llama(sp_tokenizer):
    return tiny.tiny_model("llama", sp_tokenizer, seed=3)


def test_lam_one_is_exactly_the_hf_clm_loss(llama):
    torch.manual_seed(0)
    input_ids = torch.randint(4, llama.config.vocab_size, (2, 9))
    labels = input_ids.clone()
    labels[1, 6:] = -100
    with torch.no_grad():
        logits = llama(input_ids=input_ids).logits
        hf = llama(input_ids=input_ids, labels=labels).loss
        hf_ga = llama(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(23)).loss
    out = fusion_loss(logits, labels, None, None, lam=1.0)
    assert torch.equal(out["loss"], hf) and torch.equal(out["clm_loss"], hf)
    assert "fusion_loss" not in out          # skipped, not computed as zeros
    assert torch.equal(fusion_loss(logits, labels, None, None, lam=1.0, num_items_in_batch=torch.tensor(23))["loss"],
                       hf_ga)


def test_hand_computed_soft_ce_with_temperature():
    # log_softmax([0, ln 2, 0]) = [ln 1/4, ln 1/2, ln 1/4]; fused p = [0.8 on id 1, 0.2 on id 0], T = 2:
    # q = sqrt(p) renormalised = [2/3, 1/3]; soft CE = 2/3 ln 2 + 1/3 ln 4 = 4/3 ln 2
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2]])
    fused_ids = torch.tensor([[[1, 0], [2, 0], [0, 0]]])
    fused_probs = torch.tensor([[[0.8, 0.2], [0.0, 0.0], [0.5, 0.5]]])    # row 1 empty; row 2 has no label
    out = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.0, temperature=2.0)
    assert out["fusion_loss"].item() == pytest.approx(4 / 3 * math.log(2), abs=1e-6)
    # CLM: positions 0, 1 predict labels 1, 2 -> (ln 2 + ln 3) / 2
    assert out["clm_loss"].item() == pytest.approx((math.log(2) + math.log(3)) / 2, abs=1e-6)
    mixed = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.9, temperature=2.0)
    assert mixed["loss"].item() == pytest.approx(0.9 * out["clm_loss"].item() + 0.1 * out["fusion_loss"].item(),
                                                 abs=1e-6)


def test_attention_mask_positions_are_the_reference_mean():
    # Same tensors as above, plus a padding position (label -100). The reference averages the soft CE over the
    # attention mask: every real position, including the last one and the row without mass (which adds 0).
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2, -100]])
    fused_ids = torch.tensor([[[1, 0], [2, 0], [0, 0], [1, 2]]])
    fused_probs = torch.tensor([[[0.8, 0.2], [0.0, 0.0], [0.5, 0.5], [0.5, 0.5]]])
    # row 0: 4/3 ln 2 (as above); row 1: no mass, 0; row 2: both slots on id 0, log p(0) = ln 1/3 -> ln 3;
    # row 3: padding, excluded. Mean over the 3 real positions.
    out = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.0, temperature=2.0, positions="attention_mask")
    assert out["fusion_loss"].item() == pytest.approx((4 / 3 * math.log(2) + math.log(3)) / 3, abs=1e-6)
    default = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.0, temperature=2.0)
    assert default["fusion_loss"].item() == pytest.approx(4 / 3 * math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="loss positions must be one of"):
        fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.5, positions="all")


def dense_reference(logits, labels, fused_ids, fused_probs, lam, temperature):
    B, L, V = logits.shape
    logp = torch.log_softmax(logits.double(), -1)
    p = fused_probs.double() ** (1.0 / temperature)
    dense = torch.zeros(B, L, V, dtype=torch.float64).scatter_add_(-1, fused_ids, p)
    mass = dense.sum(-1, keepdim=True)
    dense = torch.where(mass > 0, dense / mass.clamp_min(1e-300), dense)
    next_labels = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)
    valid = (next_labels != -100) & (mass.squeeze(-1) > 0)
    fusion = (-(dense * logp).sum(-1))[valid].mean()
    clm = -logp[next_labels != -100].gather(-1, next_labels[next_labels != -100].unsqueeze(-1)).mean()
    return lam * clm + (1 - lam) * fusion, fusion


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_sparse_equals_dense_reference(temperature):
    g = torch.Generator().manual_seed(7)
    B, L, V, K = 3, 11, 37, 5
    logits = torch.randn(B, L, V, generator=g) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 7:] = -100
    labels[2, :2] = -100
    fused_ids = torch.randint(0, V, (B, L, K), generator=g)            # duplicates within a row included
    fused_probs = torch.rand(B, L, K, generator=g)
    fused_probs[:, :, 3:] *= (torch.rand(B, L, 1, generator=g) > 0.5)   # some padded slots
    fused_probs[1, 4] = 0                                                 # an empty row
    out = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.7, temperature=temperature)
    want_loss, want_fusion = dense_reference(logits, labels, fused_ids, fused_probs, 0.7, temperature)
    assert out["fusion_loss"].item() == pytest.approx(want_fusion.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(want_loss.item(), abs=1e-6)


def test_gradient_accumulation_normalisers():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    fused_ids = torch.randint(0, 13, (2, 6, 3), generator=g)
    fused_probs = torch.rand(2, 6, 3, generator=g)
    mean = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.5)
    # 10 predicted tokens and 10 valid fused rows here; twice as many over the accumulated batch halves both terms
    summed = fusion_loss(logits, labels, fused_ids, fused_probs, lam=0.5, num_items_in_batch=torch.tensor(20),
                         num_fused_in_batch=torch.tensor(20))
    assert summed["clm_loss"].item() == pytest.approx(mean["clm_loss"].item() / 2, rel=1e-6)
    assert summed["fusion_loss"].item() == pytest.approx(mean["fusion_loss"].item() / 2, rel=1e-6)


def test_gradients_flow_and_errors():
    logits = torch.randn(1, 4, 9, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4]])
    out = fusion_loss(logits, labels, torch.zeros(1, 4, 2, dtype=torch.long), torch.zeros(1, 4, 2), lam=0.5)
    assert out["fusion_loss"].item() == 0.0          # no valid fused row: the term is 0, the loss still backprops
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs fused_ids"):
        fusion_loss(logits, labels, None, None, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        fusion_loss(logits, labels, None, None, lam=1.5)
