"""Ensemble members: loading, full forward passes, and each member's view of the pivot's positions and vocabulary."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fusion.tokens import tokenize_document
from fusion.vocab import build_vocab_map

from .segments import Segment

# Model types whose attention positions come only from position_ids (rotary or learned absolute embeddings,
# no ALiBi), so a row's tokens may sit anywhere in a batched cache. Sliding-window configs are excluded.
_BATCHABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2",
                          "granite", "stablelm", "smollm3"}


@dataclass
class Member:
    name: str
    model: Any
    tokenizer: Any
    shares_pivot: bool
    start_ids: list[int]                 # special ids the tokenizer puts before text by default (e.g. BOS)
    prefix_id: int                       # conditioning token for an empty context (BOS, else EOS)
    max_length: int
    to_pivot: torch.Tensor | None = None  # int64 [member vocab]: pivot id or -1 (cross-tokenizer members)
    kv_ok: bool = True                    # False once the model refused a cache (then: full forwards)
    batch_ok: bool = False                # generation may batch requests (position ids fully define positions)


def _batchable(model) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _BATCHABLE_MODEL_TYPES:
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return not any("sliding" in str(t) for t in layer_types)
    return getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False


def default_start_ids(tokenizer) -> list[int]:
    """The special ids `tokenizer` puts before a text by default (e.g. [BOS]; [] for none)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[-len(plain):] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def prefix_id(tokenizer, name: str) -> int:
    """The token an empty context is conditioned on: BOS, else EOS."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"ensemble member {name!r}: tokenizer has neither a BOS nor an EOS token to condition an "
                     f"empty context on; set tokenizer.bos_token or tokenizer.eos_token")


def _same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    try:
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    except AttributeError:
        return False


def _model_max_length(model, cap: int) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def _load_folder(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"ensemble member {path}: not a local HF model folder (no config.json); pass a folder "
                         f"written by save_pretrained or a (model, tokenizer) pair")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


def load_pairs(members, dtype: torch.dtype) -> tuple[list[tuple], list[str]]:
    """(model, tokenizer) pairs and default names from `members`: (model, tokenizer) pairs or local HF folders
    (loaded in `dtype`)."""
    if isinstance(members, str):
        raise ValueError(f"EnsembleLM: members={members!r} is a string; give a list of (model, tokenizer) pairs or "
                         f"HF folders (a '|'-separated string is lm-eval's --model_args form: "
                         f"EnsembleLM.create_from_arg_string)")
    if not members:
        raise ValueError("EnsembleLM: members is empty; give (model, tokenizer) pairs or HF folders")
    pairs, names = [], []
    for i, m in enumerate(members):
        if isinstance(m, (str, Path)):
            pairs.append(_load_folder(m, dtype))
            names.append(str(m))
        else:
            model, tok = m
            pairs.append((model, tok))
            names.append(getattr(model, "name_or_path", "") or f"member{i}")
    return pairs, names


def make_member(name: str, model, tokenizer, pivot_tokenizer, vocab_map: str, device: torch.device,
                max_length: int) -> Member:
    """A member on `device` (eval mode); a cross-tokenizer member gets its `vocab_map` onto the pivot vocabulary."""
    model.to(device).eval()
    shares = _same_tokenizer(tokenizer, pivot_tokenizer)
    member = Member(name=name, model=model, tokenizer=tokenizer, shares_pivot=shares,
                    start_ids=default_start_ids(tokenizer), prefix_id=prefix_id(tokenizer, name),
                    max_length=_model_max_length(model, max_length), batch_ok=_batchable(model))
    if not shares:
        vmap = build_vocab_map(vocab_map, tokenizer, pivot_tokenizer)
        member.to_pivot = torch.as_tensor(vmap.source_to_target.astype(np.int64))
    return member


@torch.inference_mode()
def forward_logprobs(member: Member, inputs: list[list[int]], batch_size: int,
                     device: torch.device) -> list[torch.Tensor]:
    """Natural-log next-token distributions, float32 [len(ids), member logits dim] per input."""
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    out: list[torch.Tensor | None] = [None] * len(inputs)
    pad = member.tokenizer.pad_token_id if member.tokenizer.pad_token_id is not None else 0
    for a in range(0, len(order), batch_size):
        chunk = order[a:a + batch_size]
        width = max(len(inputs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        # Right padding needs no attention mask: under the causal mask real positions never see the pads
        # after them, and without a padding mask attention keeps its fast causal path (as lm-eval's HFLM).
        logits = member.model(input_ids=ids.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            out[i] = logprobs[row, :len(inputs[i])]
    return out  # type: ignore[return-value]


def _aligned_positions(member: Member, seg: Segment, own, align: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(pivot text positions t, member text positions s) where the member stands for the pivot: aligned
    1-to-1, the same token (unless the alignment accepts any pair), ending at the same character."""
    alignment = align(seg.pivot, own)
    s = alignment.one_to_one().astype(np.int64)
    t = np.nonzero(s >= 0)[0]
    s = s[t]
    # an alignment whose pairs already mean "same prefix" (accept "any", fusion.boundary) needs no
    # token agreement; the same-end check still keeps the member on the pivot's prefix text
    same_token = (member.to_pivot.numpy()[own.ids[s]] == seg.pivot.ids[t]) | (alignment.accept == "any")
    ok = same_token & (own.offsets[s, 1] == seg.pivot.offsets[t, 1])
    return t[ok], s[ok]


def member_view(member: Member, seg: Segment, align: Callable) -> tuple[list[int], np.ndarray]:
    """The member's input ids for a segment and pos_map int64 [T]: the member position whose
    distribution stands for pivot position t, or -1 where the member abstains. align: a registered
    alignment (fusion.registry.ALIGNMENTS) for cross-tokenizer members."""
    n_ps = len(seg.pivot_start)
    T = n_ps + len(seg.pivot)
    if member.shares_pivot:
        ids = seg.input_ids
        pos_map = np.arange(T, dtype=np.int64)
    else:
        own = tokenize_document(member.tokenizer, seg.text, add_bos=False, add_eos=False)
        start = {"prefix": [member.prefix_id], "default": list(member.start_ids), "none": []}[seg.member_start]
        n_ms = len(start)
        ids = start + [int(i) for i in own.ids]
        pos_map = np.full(T, -1, dtype=np.int64)
        if n_ps and n_ms:
            pos_map[n_ps - 1] = n_ms - 1      # both condition on the empty text
        if len(own) and len(seg.pivot):
            t, s = _aligned_positions(member, seg, own, align)
            pos_map[n_ps + t] = n_ms + s
    cut = max(0, len(ids) - member.max_length)
    if cut:
        ids = ids[cut:]
        pos_map = np.where(pos_map >= cut, pos_map - cut, -1)
    return ids, pos_map


def pivot_logprobs(member: Member, logprobs: torch.Tensor, rows: np.ndarray, vocab_size: int,
                   top_k: int | None) -> torch.Tensor:
    """The member's distributions at its positions `rows`, as pivot-vocabulary log-probs [R, vocab_size].
    A cross-tokenizer member's probabilities (its top_k only, when set) are summed onto their mapped pivot
    ids; the mass mapped nowhere is spread uniformly."""
    V = vocab_size
    lp = logprobs[torch.as_tensor(rows, dtype=torch.long)]
    if member.shares_pivot:
        if lp.shape[-1] >= V:
            return lp[:, :V]
        return torch.cat([lp, torch.full((lp.shape[0], V - lp.shape[-1]), -math.inf)], dim=-1)
    to_pivot = member.to_pivot
    n = min(lp.shape[-1], to_pivot.shape[0])
    probs = lp[:, :n].exp()
    if top_k is not None and top_k < n:
        top = probs.topk(top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
    target = to_pivot[:n]
    keep = target >= 0
    mapped = torch.zeros((lp.shape[0], V), dtype=torch.float32)
    mapped.index_add_(1, target[keep], probs[:, keep])
    lost = (1.0 - mapped.sum(dim=-1, keepdim=True)).clamp(min=0.0)
    return (mapped + lost / V).log()
