"""Greedy generation on the ensemble distribution, reusing each member's keys/values between steps.

Every member conditions on the whole text so far at each step. A member's cache keeps the keys/values of the
longest prefix of its ids that did not change since the previous step (a cross-tokenizer member's tokenization
of the text so far can change at its end as characters arrive); only the ids after it run. Several requests
decode together: a member whose positions come from position ids alone runs them in one forward pass over a
hole-masked cache (`_KVBatch`), any other member one request at a time (`_KVSlot`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fusion.tokens import tokenize_document

from .combiners import running_mean_ce
from .members import Member, pivot_logprobs

log = logging.getLogger(__name__)

# what a model class that cannot take (or crop) a cache raises
_CACHE_ERRORS = (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError)


@dataclass
class _KVSlot:
    """One generation row's cache of one member: the ids whose keys/values `cache` holds."""
    ids: list[int] = field(default_factory=list)
    cache: Any = None


@dataclass
class _KVBatch:
    """The cache of one member for a batch of generation rows. Each row's tokens sit at increasing cache
    positions `pos[row]` (not contiguous: positions of tokens the row dropped, and padding, are masked out by
    `valid`), with their own position ids 0, 1, ..., so the holes change nothing for the model."""
    ids: list[list[int]]
    pos: list[list[int]]
    valid: torch.Tensor                   # bool [rows, cache length]
    cache: Any = None


@dataclass
class _GenRow:
    context: str
    until: list[str]
    max_new: int
    ctx_ids: list[int]
    ctx_decoded: str
    nll_sum: torch.Tensor                 # [M] members' summed CE (nats) on the text so far ("mince")
    nll_count: torch.Tensor               # [M]
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _no_cache(member: Member, err: Exception) -> None:
    # A model class that takes no `cache` (or cannot crop it): full forwards from now on.
    log.warning("ensemble member %s: no KV cache for generation (%s: %s); recomputing every step",
                member.name, type(err).__name__, err)
    member.kv_ok = member.batch_ok = False


@torch.inference_mode()
def last_logprobs(member: Member, ids: list[int], device: torch.device, slot: _KVSlot | None = None,
                  kv_cache: bool = True) -> torch.Tensor:
    """Natural-log distribution of the token after `ids`, float32 [1, member logits dim]. Asks the model
    for the last position's logits only (`logits_to_keep=1`): generation needs nothing else, and the
    output layer and log-softmax over every position of a long prompt would dominate each step (a
    262k-token vocabulary x 500 positions is 0.5 GB of float32 per step). With a `slot` (and `kv_cache`),
    only the ids after the longest prefix shared with the slot's previous call are run."""
    if slot is not None and kv_cache and member.kv_ok:
        try:
            return _last_logprobs_cached(member, ids, slot, device)
        except _CACHE_ERRORS as err:
            _no_cache(member, err)
            slot.ids, slot.cache = [], None
    x = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        logits = member.model(input_ids=x, logits_to_keep=1).logits
    except TypeError:  # a model class without `logits_to_keep`
        logits = member.model(input_ids=x).logits
    return torch.log_softmax(logits[0, -1:].float(), dim=-1).cpu()


def _last_logprobs_cached(member: Member, ids: list[int], slot: _KVSlot, device: torch.device) -> torch.Tensor:
    from transformers import DynamicCache

    old = slot.ids
    keep = min(_common_prefix(old, ids), len(ids) - 1)  # at least one id must run to get its logits
    cache = slot.cache
    if cache is None or keep == 0:
        # A cache built without the config holds every layer in full (no sliding-window layers), so it
        # can be cropped to any prefix; the attention masks still apply the model's sliding windows.
        cache, keep = DynamicCache(), 0
    elif keep < len(old):
        cache.crop(keep - len(old))
    if cache.get_seq_length() != keep:
        raise RuntimeError(f"cache holds {cache.get_seq_length()} positions, expected {keep}")
    slot.ids, slot.cache = [], None  # until this forward has succeeded
    x = torch.tensor([ids[keep:]], dtype=torch.long, device=device)
    out = member.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
    slot.ids, slot.cache = list(ids), cache
    return torch.log_softmax(out.logits[0, -1:].float(), dim=-1).cpu()


def _batch_inputs(state: _KVBatch, ids_by_row: dict[int, list[int]], pad: int):
    """Per row, mask out the cached tokens after the longest prefix shared with its new ids and lay out the
    ids still to run -> (new ids per row, input ids [rows, width], position ids [rows, width], fresh bool
    [rows, width]); `state` records the rows' ids and cache positions."""
    n_rows, length = state.valid.shape
    new: dict[int, list[int]] = {}
    for row, ids in ids_by_row.items():
        keep = min(_common_prefix(state.ids[row], ids), len(ids) - 1)
        if keep < len(state.pos[row]):
            state.valid[row, state.pos[row][keep:]] = False
            del state.pos[row][keep:]
        new[row] = ids[len(state.pos[row]):]
        state.ids[row] = list(ids)
    width = max(len(t) for t in new.values())
    x = torch.full((n_rows, width), pad, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    fresh = torch.zeros((n_rows, width), dtype=torch.bool)
    for row, tokens in new.items():
        start = len(state.pos[row])
        x[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[row, :len(tokens)] = torch.arange(start, start + len(tokens))
        fresh[row, :len(tokens)] = True
        state.pos[row].extend(range(length, length + len(tokens)))
    return new, x, position_ids, fresh


@torch.inference_mode()
def last_logprobs_batched(member: Member, state: _KVBatch, ids_by_row: dict[int, list[int]],
                          device: torch.device) -> torch.Tensor:
    """Next-token log-probs [len(ids_by_row), member logits dim] (rows in ascending order) for several
    generation rows in one forward pass. Per row, the cached tokens after the longest prefix shared with
    its previous ids are masked out, and only its new ids run; rows not in `ids_by_row` (finished) run
    padding only."""
    from transformers import DynamicCache

    if state.cache is None:
        state.cache = DynamicCache()
    pad = member.tokenizer.pad_token_id if member.tokenizer.pad_token_id is not None else 0
    new, x, position_ids, fresh = _batch_inputs(state, ids_by_row, pad)
    state.valid = torch.cat([state.valid, fresh], dim=1)
    out = member.model(input_ids=x.to(device), attention_mask=state.valid.long().to(device),
                       position_ids=position_ids.to(device), cache=state.cache, use_cache=True,
                       logits_to_keep=x.shape[1])
    if state.cache.get_seq_length() != state.valid.shape[1]:
        raise RuntimeError(f"batched cache holds {state.cache.get_seq_length()} positions, expected "
                           f"{state.valid.shape[1]}")
    rows = sorted(new)
    last = out.logits[torch.tensor(rows), torch.tensor([len(new[r]) - 1 for r in rows])]
    return torch.log_softmax(last.float(), dim=-1).cpu()


class GreedyDecoder:
    """Decodes one chunk of generate_until requests together on an EnsembleLM's combined distribution.

    Stops a row at the first `until` string (cut off), at the pivot's EOS token, or after its max_gen_toks
    pivot tokens. "mince" ranks members by their mean CE on the context and the tokens generated so far."""

    def __init__(self, ensemble):
        self.ens = ensemble

    def generate(self, args: list[tuple]) -> list[str]:
        """args: lm-eval's (context, gen_kwargs) per request -> the generated text per request."""
        rows = [self._new_row(context, gen_kwargs) for context, gen_kwargs in args]
        n = len(rows)
        states: list = [_KVBatch(ids=[[] for _ in rows], pos=[[] for _ in rows],
                                 valid=torch.zeros((n, 0), dtype=torch.bool))
                        if member.batch_ok and n > 1 else [_KVSlot() for _ in rows] for member in self.ens.members]
        while True:
            active = [i for i, row in enumerate(rows) if not row.done]
            if not active:
                break
            combined, per_member = self._step(rows, active, states)
            for k, i in enumerate(active):
                self._advance(rows[i], int(combined[k].argmax()), per_member[:, k])
        return [row.text for row in rows]

    def _new_row(self, context: str, gen_kwargs) -> _GenRow:
        ens, tok = self.ens, self.ens.pivot_tokenizer
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        ctx_ids = list(ens.pivot_start_ids) + tok(context, add_special_tokens=False)["input_ids"]
        if not ctx_ids:
            ctx_ids = [ens.pivot_prefix_id]
        nll_sum, nll_count = ens.context_nll(context)
        max_new = int(gen_kwargs.get("max_gen_toks", ens.max_gen_toks))
        return _GenRow(context=context, until=list(until), max_new=max_new, ctx_ids=ctx_ids,
                       ctx_decoded=tok.decode(ctx_ids, skip_special_tokens=True), nll_sum=nll_sum,
                       nll_count=nll_count, done=max_new <= 0)

    def _advance(self, row: _GenRow, nxt: int, member_logprobs: torch.Tensor) -> None:
        """Append pivot token `nxt` to the row (member_logprobs [M, V]: the members' pivot log-probs at this
        step, for the "mince" history), or finish it at EOS, a stop string or its token limit."""
        tok = self.ens.pivot_tokenizer
        if nxt == tok.eos_token_id:
            row.done = True
            return
        row.nll_sum = row.nll_sum - member_logprobs[:, nxt]
        row.nll_count = row.nll_count + 1
        row.generated.append(nxt)
        row.text = tok.decode(row.ctx_ids + row.generated, skip_special_tokens=True)[len(row.ctx_decoded):]
        hits = [row.text.index(s) for s in row.until if s and s in row.text]
        if hits:
            row.text = row.text[:min(hits)]
            row.done = True
        elif len(row.generated) >= row.max_new:
            row.done = True

    def _member_ids(self, member: Member, row: _GenRow) -> list[int]:
        """The member's input ids for a generation row's text so far (context + generated)."""
        if member.shares_pivot:
            ids = row.ctx_ids + row.generated
        else:
            own = tokenize_document(member.tokenizer, row.context + row.text, add_eos=False)
            start = list(member.start_ids) or ([member.prefix_id] if not len(own) else [])
            ids = start + [int(i) for i in own.ids]
        return ids[-member.max_length:]

    def _member_logprobs(self, m: int, rows: list[_GenRow], active: list[int], states: list) -> torch.Tensor:
        """Member m's next-token log-probs [A, member logits dim] for the active rows, batched when it can;
        a member whose batched forward fails falls back to one row at a time (states[m] becomes slots)."""
        ens, member = self.ens, self.ens.members[m]
        ids_by_row = {i: self._member_ids(member, rows[i]) for i in active}
        state = states[m]
        if isinstance(state, _KVBatch) and member.batch_ok and ens.kv_cache and member.kv_ok:
            try:
                return last_logprobs_batched(member, state, ids_by_row, ens.device)
            except (*_CACHE_ERRORS, IndexError) as err:
                log.warning("ensemble member %s: batched generation failed (%s: %s); one row at a time",
                            member.name, type(err).__name__, err)
                member.batch_ok = False
        if isinstance(state, _KVBatch):  # fall back: a fresh slot per row
            state = states[m] = [_KVSlot() for _ in rows]
        return torch.cat([last_logprobs(member, ids_by_row[i], ens.device, state[i], ens.kv_cache) for i in active])

    @torch.inference_mode()
    def _step(self, rows: list[_GenRow], active: list[int], states: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step for the `active` rows: combined pivot log-probs [A, V] and per member [M, A, V].
        states[m]: member m's caches for these rows, a `_KVBatch` or one `_KVSlot` per row."""
        ens, positions = self.ens, np.arange(len(active))
        stacked = [pivot_logprobs(member, self._member_logprobs(m, rows, active, states), positions, ens.vocab_size,
                                  ens.top_k) for m, member in enumerate(ens.members)]
        per_member = torch.stack(stacked)                                           # [M, A, V]
        history = torch.stack([running_mean_ce(rows[i].nll_sum, rows[i].nll_count) for i in active], dim=1)
        available = torch.ones(per_member.shape[:2], dtype=torch.bool)
        return ens.combiner(per_member, available, ens.weights, history), per_member
