"""Output ensemble of language models with different tokenizers, as an lm-eval model.

The ensemble is scored by the very same lm-eval tasks as every other model (`fuselab-ensemble`).
Everything happens on one *pivot* tokenization (the target's tokenizer, or a chosen member's):

- A member that shares the pivot tokenizer (identical tokenizer.json) runs on the pivot token ids and
  contributes its full next-token distribution. So an ensemble of members with one tokenizer is plain
  probability averaging, and an ensemble of one model reproduces that model's log-likelihoods.
- Any other member runs once per text on its own tokenization. Its positions are aligned to the
  pivot's with a registered alignment (`fusion.registry.ALIGNMENTS`) and its vocabulary is mapped with
  a registered vocabulary map (`fusion.vocab.build_vocab_map`). It contributes at pivot position t
  (the prediction of pivot token t+1) only when, as in FuseLLM, t is aligned 1-to-1 to its position s
  and its token s maps to pivot token t, and, in addition, both tokens end at the same character, so
  the member conditions on exactly the pivot's prefix text (never on text the pivot has not seen yet).
  Elsewhere the member abstains and the combiner uses the members that do contribute.
- Coverage of the pivot vocabulary by a mapped member: its next-token probabilities (the full
  vocabulary, or only its top-k when `top_k` is set) are summed onto their mapped pivot ids; the
  mass that maps nowhere (unmapped ids, or outside the top-k) is spread uniformly over the pivot
  vocabulary. Every mapped distribution thus sums to 1 and is > 0 everywhere: log-likelihoods stay
  finite. A position where no member contributes gets the uniform distribution, log(1/V).

Known approximation: a member's tokenization of the prefix is taken from its tokenization of the
whole text (FuseLLM does the same); BPE boundaries inside a word can depend on the characters after it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import lm_eval.models  # noqa: F401  -- registers lm-eval's own models first (see FACTS.md)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import fusion.align  # noqa: F401  -- registers the alignments in ALIGNMENTS
from fusion.registry import ALIGNMENTS, Registry
from fusion.tokens import TokenizedText, tokenize_document
from fusion.vocab import build_vocab_map

# ----------------------------------------------------------------------------------------------
# Combiners: (logprobs [M, P, V], available bool [M, P], weights [M], history_ce [M, P]) -> [P, V]
#
# logprobs: each member's natural-log next-token distribution over the pivot vocabulary at P positions;
# available: whether the member contributes there; weights: the members' weights (>= 0);
# history_ce: the member's mean cross-entropy (nats per token) on the pivot tokens already seen before
# the position, where it contributed (inf where it has none). Output: log-probabilities [P, V].

log = logging.getLogger(__name__)

Combiner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENSEMBLE_COMBINERS: Registry = Registry("ensemble combiner")


def _uniform_where_none(out: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    none = ~available.any(dim=0)
    if none.any():
        out[none] = -math.log(out.shape[-1])
    return out


def _weighted_mixture(logprobs: torch.Tensor, available: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights[:, None].to(logprobs.dtype) * available.to(logprobs.dtype)          # [M, P]
    total = w.sum(dim=0, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    # log-space mixture: one member with weight 1 gives back its log-probs bit for bit (log 1 = 0)
    log_w = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
    out = torch.logsumexp(logprobs + log_w[..., None], dim=0)
    return _uniform_where_none(out, w > 0)


@ENSEMBLE_COMBINERS.register("mean", needs_history=False)
def mean_combiner(logprobs, available, weights, history_ce):
    """Uniform probability average over the members contributing at each position."""
    return _weighted_mixture(logprobs, available, torch.ones_like(weights))


@ENSEMBLE_COMBINERS.register("weighted", needs_history=False)
def weighted_combiner(logprobs, available, weights, history_ce):
    """Probability average with the given member weights, renormalised over contributing members."""
    return _weighted_mixture(logprobs, available, weights)


def _select(logprobs: torch.Tensor, available: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per position, the distribution of the available member with the lowest score (ties: first)."""
    rank = torch.where(available, score, torch.full_like(score, math.inf))
    # when every available member scores inf (no history yet) take the first available one
    first_available = available.float().argmax(dim=0)
    best = torch.where(torch.isinf(rank.min(dim=0).values), first_available, rank.argmin(dim=0))
    out = logprobs[best, torch.arange(logprobs.shape[1])].clone()
    return _uniform_where_none(out, available)


@ENSEMBLE_COMBINERS.register("max_prob", needs_history=False)
def max_prob_combiner(logprobs, available, weights, history_ce):
    """Per position, the most confident member's distribution (highest top-1 probability)."""
    return _select(logprobs, available, -logprobs.max(dim=-1).values)


@ENSEMBLE_COMBINERS.register("mince", needs_history=True)
def mince_combiner(logprobs, available, weights, history_ce):
    """MinCE at evaluation time: per position, the member with the lowest cross-entropy on the text
    seen so far (causal: only tokens before the position count); the first member before any history."""
    return _select(logprobs, available, history_ce)


# ----------------------------------------------------------------------------------------------
# Members


@dataclass
class _Member:
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


# Model types whose attention positions come only from position_ids (rotary or learned absolute embeddings,
# no ALiBi), so a row's tokens may sit anywhere in a batched cache. Sliding-window configs are excluded.
_BATCHABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2",
                          "granite", "stablelm", "smollm3"}


def _bar(work, desc: str, disable: bool):
    """A tqdm bar over `work` (an iterable, or a total to `update`) unless lm-eval asked for none
    (`disable_tqdm`, set by harness.evaluation.evaluate(progress=False) or a quiet run)."""
    from tqdm.auto import tqdm

    if isinstance(work, int):
        return tqdm(total=work, desc=desc, unit="request", disable=disable, leave=False)
    return tqdm(work, desc=desc, unit="request", disable=disable, leave=False)


def _batchable(model) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _BATCHABLE_MODEL_TYPES:
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return not any("sliding" in str(t) for t in layer_types)
    return getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False


def _default_start_ids(tokenizer) -> list[int]:
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[-len(plain):] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def _prefix_id(tokenizer, name: str) -> int:
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


# ----------------------------------------------------------------------------------------------
# One scoring unit: a text, its pivot tokenization, and the positions whose distributions are needed


@dataclass
class _Segment:
    text: str                    # the text the pivot's text tokens cover
    pivot: TokenizedText         # pivot tokens of `text` (offsets into `text`)
    pivot_start: list[int]       # ids before the text tokens, covering no text (BOS / prefix token)
    member_start: str            # what members put before their text tokens: "prefix" (their BOS/EOS, for
                                 # an empty context), "default" (their tokenizer's own BOS, if any), "none"
    scored: np.ndarray           # int64 [P]: positions (into pivot_start + pivot ids) to score

    @property
    def input_ids(self) -> list[int]:
        return list(self.pivot_start) + [int(i) for i in self.pivot.ids]

    def observed(self) -> np.ndarray:
        """int64 [T]: the pivot token each position predicts (-1 at the last position)."""
        ids = np.asarray(self.input_ids, dtype=np.int64)
        return np.concatenate([ids[1:], [-1]])


def _slice_tokens(tt: TokenizedText, a: int, b: int, text: str) -> tuple[str, TokenizedText]:
    """Pivot tokens a..b-1 of a document and the text they cover, offsets rebased onto that text."""
    start, end = int(tt.offsets[a, 0]), int(tt.offsets[b - 1, 1])
    sub = text[start:end]
    return sub, TokenizedText(ids=tt.ids[a:b], tokens=list(tt.tokens[a:b]), offsets=tt.offsets[a:b] - start,
                              marker=tt.marker, n_bytes=len(sub.encode("utf-8")))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@register_model("fuselab-ensemble")
class EnsembleLM(LM):
    """An output ensemble of causal LMs, possibly with different tokenizers, scored on a pivot tokenization.

    members: list of (model, tokenizer) pairs or local HF folders (a "|"-separated string from lm-eval's
        model_args). pivot: index of the member whose tokenizer is the pivot, or a tokenizer (e.g. the
        FuseLLM target's). combiner: a name in ENSEMBLE_COMBINERS. weights: one per member ("weighted").
    alignment: a name in fusion's ALIGNMENTS ("offsets", "dtw"); vocab_map: "em" | "mined".
    top_k: None maps a cross-tokenizer member's full distribution, k keeps its top-k only.
    batch_size: requests per forward batch; max_length: pivot/member context cap in tokens.
    kv_cache: generation reuses each member's keys/values for the longest prefix of its ids that did
        not change since the previous step (a cross-tokenizer member's tokenization of the text so far
        can change at its end as characters arrive); False recomputes every step (same outputs, slower).
    """

    def __init__(self, members, pivot: int | Any = 0, combiner: str = "mean", weights=None,
                 alignment: str = "offsets", vocab_map: str = "em", top_k: int | None = None,
                 batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 device: str = "cpu", dtype: str = "float32", names: list[str] | None = None,
                 kv_cache: bool = True):
        super().__init__()
        torch_dtype = getattr(torch, str(dtype))
        if isinstance(members, str):
            members = [m for m in members.split("|") if m]
        if not members:
            raise ValueError("EnsembleLM: members is empty; give (model, tokenizer) pairs or HF folders")
        pairs, member_names = [], []
        for i, m in enumerate(members):
            if isinstance(m, (str, Path)):
                pairs.append(_load_folder(m, torch_dtype))
                member_names.append(str(m))
            else:
                model, tok = m
                pairs.append((model, tok))
                member_names.append(getattr(model, "name_or_path", "") or f"member{i}")
        if names is not None:
            member_names = list(names)
        if isinstance(pivot, str) and pivot.lstrip("-").isdigit():
            pivot = int(pivot)
        if isinstance(pivot, int) and not -len(pairs) <= pivot < len(pairs):
            raise ValueError(f"EnsembleLM: pivot={pivot} but there are {len(pairs)} members; give a member index "
                             f"or the target's tokenizer")
        self.pivot_tokenizer = pairs[pivot][1] if isinstance(pivot, int) else pivot
        self.combiner_name = combiner
        self.combiner: Combiner = ENSEMBLE_COMBINERS.get(combiner)
        self.needs_history = ENSEMBLE_COMBINERS.meta(combiner).get("needs_history", False)
        if isinstance(weights, str):
            weights = [float(w) for w in weights.split("|")]
        if weights is not None and len(weights) != len(pairs):
            raise ValueError(f"EnsembleLM: {len(weights)} weights for {len(pairs)} members; give one per member")
        if weights is not None and any(w < 0 for w in weights):
            raise ValueError(f"EnsembleLM: weights must be >= 0, got {weights}")
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(pairs), dtype=torch.float32)
        self.alignment_name = alignment
        self.align = ALIGNMENTS.get(alignment)
        self.top_k = None if top_k in (None, "None", "") else int(top_k)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"EnsembleLM: batch_size={batch_size!r}; give a positive integer (no 'auto')")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.kv_cache = kv_cache if isinstance(kv_cache, bool) else str(kv_cache).lower() in ("1", "true", "yes")
        self._device = torch.device(device)
        self.vocab_size = len(self.pivot_tokenizer)
        self.pivot_start_ids = _default_start_ids(self.pivot_tokenizer)
        self.pivot_prefix_id = _prefix_id(self.pivot_tokenizer, "pivot")

        self.members: list[_Member] = []
        for name, (model, tok) in zip(member_names, pairs):
            model.to(self._device).eval()
            shares = _same_tokenizer(tok, self.pivot_tokenizer)
            member = _Member(name=name, model=model, tokenizer=tok, shares_pivot=shares,
                             start_ids=_default_start_ids(tok), prefix_id=_prefix_id(tok, name),
                             max_length=_model_max_length(model, self.max_length), batch_ok=_batchable(model))
            if not shares:
                vmap = build_vocab_map(vocab_map, tok, self.pivot_tokenizer)
                member.to_pivot = torch.as_tensor(vmap.source_to_target.astype(np.int64))
            self.members.append(member)

    # -- lm-eval plumbing ------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's `--model_args` (parsed) plus its `--batch_size` / `--device`; a key given in the model
        arguments wins (lm-eval always passes its default batch size)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**extra, **arg_dict})

    @property
    def device(self):
        return self._device

    # -- member forward passes ----------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, member: _Member, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Natural-log next-token distributions, float32 [len(ids), member logits dim] per input."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out: list[torch.Tensor | None] = [None] * len(inputs)
        pad = member.tokenizer.pad_token_id if member.tokenizer.pad_token_id is not None else 0
        for a in range(0, len(order), self.batch_size):
            chunk = order[a:a + self.batch_size]
            width = max(len(inputs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            # Right padding needs no attention mask: under the causal mask real positions never see the pads
            # after them, and without a padding mask attention keeps its fast causal path (as lm-eval's HFLM).
            logits = member.model(input_ids=ids.to(self._device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                out[i] = logprobs[row, :len(inputs[i])]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _last_logprobs(self, member: _Member, ids: list[int], slot: _KVSlot | None = None) -> torch.Tensor:
        """Natural-log distribution of the token after `ids`, float32 [1, member logits dim]. Asks the model
        for the last position's logits only (`logits_to_keep=1`): generation needs nothing else, and the
        output layer and log-softmax over every position of a long prompt would dominate each step (a
        262k-token vocabulary x 500 positions is 0.5 GB of float32 per step). With a `slot` (and `kv_cache`),
        only the ids after the longest prefix shared with the slot's previous call are run."""
        if slot is not None and self.kv_cache and member.kv_ok:
            try:
                return self._last_logprobs_cached(member, ids, slot)
            except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as err:
                self._no_cache(member, err)
                slot.ids, slot.cache = [], None
        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        try:
            logits = member.model(input_ids=x, logits_to_keep=1).logits
        except TypeError:  # a model class without `logits_to_keep`
            logits = member.model(input_ids=x).logits
        return torch.log_softmax(logits[0, -1:].float(), dim=-1).cpu()

    @staticmethod
    def _no_cache(member: _Member, err: Exception) -> None:
        # A model class that takes no `cache` (or cannot crop it): full forwards from now on.
        log.warning("ensemble member %s: no KV cache for generation (%s: %s); recomputing every step",
                    member.name, type(err).__name__, err)
        member.kv_ok = member.batch_ok = False

    def _last_logprobs_cached(self, member: _Member, ids: list[int], slot: _KVSlot) -> torch.Tensor:
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
        x = torch.tensor([ids[keep:]], dtype=torch.long, device=self._device)
        out = member.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        slot.ids, slot.cache = list(ids), cache
        return torch.log_softmax(out.logits[0, -1:].float(), dim=-1).cpu()

    @torch.inference_mode()
    def _last_logprobs_batched(self, member: _Member, state: _KVBatch, ids_by_row: dict[int, list[int]]) -> torch.Tensor:
        """Next-token log-probs [len(ids_by_row), member logits dim] (rows in ascending order) for several
        generation rows in one forward pass. Per row, the cached tokens after the longest prefix shared with
        its previous ids are masked out, and only its new ids run; rows not in `ids_by_row` (finished) run
        padding only."""
        from transformers import DynamicCache

        if state.cache is None:
            state.cache = DynamicCache()
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
        pad = member.tokenizer.pad_token_id if member.tokenizer.pad_token_id is not None else 0
        x = torch.full((n_rows, width), pad, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        fresh = torch.zeros((n_rows, width), dtype=torch.bool)
        for row, tokens in new.items():
            start = len(state.pos[row])
            x[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            position_ids[row, :len(tokens)] = torch.arange(start, start + len(tokens))
            fresh[row, :len(tokens)] = True
            state.pos[row].extend(range(length, length + len(tokens)))
        state.valid = torch.cat([state.valid, fresh], dim=1)
        out = member.model(input_ids=x.to(self._device), attention_mask=state.valid.long().to(self._device),
                           position_ids=position_ids.to(self._device), cache=state.cache, use_cache=True,
                           logits_to_keep=width)
        if state.cache.get_seq_length() != state.valid.shape[1]:
            raise RuntimeError(f"batched cache holds {state.cache.get_seq_length()} positions, expected "
                               f"{state.valid.shape[1]}")
        rows = sorted(new)
        last = out.logits[torch.tensor(rows), torch.tensor([len(new[r]) - 1 for r in rows])]
        return torch.log_softmax(last.float(), dim=-1).cpu()

    def _member_view(self, member: _Member, seg: _Segment) -> tuple[list[int], np.ndarray]:
        """The member's input ids for a segment and pos_map int64 [T]: the member position whose
        distribution stands for pivot position t, or -1 where the member abstains."""
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
                alignment = self.align(seg.pivot, own)
                s = alignment.one_to_one().astype(np.int64)
                t = np.nonzero(s >= 0)[0]
                s = s[t]
                # an alignment whose pairs already mean "same prefix" (accept "any", fusion.boundary) needs no
                # token agreement; the same-end check still keeps the member on the pivot's prefix text
                same_token = (member.to_pivot.numpy()[own.ids[s]] == seg.pivot.ids[t]) | (alignment.accept == "any")
                ok = same_token & (own.offsets[s, 1] == seg.pivot.offsets[t, 1])
                pos_map[n_ps + t[ok]] = n_ms + s[ok]
        cut = max(0, len(ids) - member.max_length)
        if cut:
            ids = ids[cut:]
            pos_map = np.where(pos_map >= cut, pos_map - cut, -1)
        return ids, pos_map

    def _pivot_rows(self, member: _Member, logprobs: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The member's distributions at its positions `rows`, as pivot-vocabulary log-probs [R, V]."""
        V = self.vocab_size
        lp = logprobs[torch.as_tensor(rows, dtype=torch.long)]
        if member.shares_pivot:
            if lp.shape[-1] >= V:
                return lp[:, :V]
            return torch.cat([lp, torch.full((lp.shape[0], V - lp.shape[-1]), -math.inf)], dim=-1)
        to_pivot = member.to_pivot
        n = min(lp.shape[-1], to_pivot.shape[0])
        probs = lp[:, :n].exp()
        if self.top_k is not None and self.top_k < n:
            top = probs.topk(self.top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        target = to_pivot[:n]
        keep = target >= 0
        mapped = torch.zeros((lp.shape[0], V), dtype=torch.float32)
        mapped.index_add_(1, target[keep], probs[:, keep])
        lost = (1.0 - mapped.sum(dim=-1, keepdim=True)).clamp(min=0.0)
        return (mapped + lost / V).log()

    def _distributions(self, segments: list[_Segment], nll_totals: list | None = None):
        """Per segment: combined log-probs [P, V] at its scored positions.

        nll_totals: when a list, each segment appends (nats summed [M], positions counted [M]): every
        member's own cross-entropy on the pivot tokens where it contributes (MinCE history for generation).
        """
        per_member = []
        for member in self.members:
            views = [self._member_view(member, seg) for seg in segments]
            logprobs = self._forward(member, [v[0] for v in views])
            per_member.append((views, logprobs))
        results = []
        for k, seg in enumerate(segments):
            obs = seg.observed()
            T = len(obs)
            needed = seg.scored if not (self.needs_history or nll_totals is not None) else np.arange(T)
            stacked, avail = [], []
            for member, (views, logprobs) in zip(self.members, per_member):
                pos_map = views[k][1]
                have = pos_map[needed] >= 0
                rows = np.where(have, pos_map[needed], 0)
                stacked.append(self._pivot_rows(member, logprobs[k], rows))
                avail.append(torch.as_tensor(have))
            lp = torch.stack(stacked)                 # [M, N, V]
            av = torch.stack(avail)                   # [M, N]
            history = torch.full(av.shape, math.inf)
            if self.needs_history or nll_totals is not None:
                o = torch.as_tensor(obs)
                counted = av & (o >= 0)[None]
                nll = torch.where(counted, -lp.gather(-1, o.clamp(min=0)[None, :, None].expand(len(lp), -1, 1))[..., 0],
                                  torch.zeros(()))
                # mean CE over positions strictly before t (causal), inf before the first one
                if nll_totals is not None:
                    nll_totals.append((nll.sum(dim=1), counted.sum(dim=1)))
                csum = torch.cumsum(nll, dim=1) - nll
                ccount = torch.cumsum(counted.float(), dim=1) - counted.float()
                history = torch.where(ccount > 0, csum / ccount.clamp(min=1), torch.full_like(csum, math.inf))
                idx = torch.as_tensor(seg.scored)
                lp, av, history = lp[:, idx], av[:, idx], history[:, idx]
            results.append(self.combiner(lp, av, self.weights, history))
        return results

    # -- requests ---------------------------------------------------------------------------------

    def _pair_segment(self, context: str, continuation: str) -> _Segment:
        tok = self.pivot_tokenizer
        if context == "":
            whole = tokenize_document(tok, continuation, add_eos=False)
            if len(whole) and int(whole.ids[0]) == self.pivot_prefix_id:
                # lm-eval: a text that starts with the prefix token conditions on that token itself
                return _Segment(text=continuation, pivot=whole, pivot_start=[], member_start="prefix",
                                scored=np.arange(len(whole) - 1, dtype=np.int64))
            return _Segment(text=continuation, pivot=whole, pivot_start=[self.pivot_prefix_id], member_start="prefix",
                            scored=np.arange(len(whole), dtype=np.int64))
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # lm-eval's convention: trailing context spaces belong to the continuation
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        text = context + continuation
        whole = tokenize_document(tok, text, add_eos=False)
        ctx = tokenize_document(tok, context, add_eos=False)
        n_ctx = len(ctx)
        if not np.array_equal(whole.ids[:n_ctx], ctx.ids):
            # A token straddles the context/continuation boundary. lm-eval's HFLM then scores the context's
            # own tokens followed by whole[n_ctx:]; we do the same so that every model is scored alike.
            whole = TokenizedText(ids=np.concatenate([ctx.ids, whole.ids[n_ctx:]]),
                                  tokens=list(ctx.tokens) + list(whole.tokens[n_ctx:]),
                                  offsets=np.concatenate([ctx.offsets, whole.offsets[n_ctx:]]),
                                  marker=whole.marker, n_bytes=whole.n_bytes)
        n_ps = len(self.pivot_start_ids)
        scored = np.arange(n_ps + n_ctx - 1, n_ps + len(whole) - 1, dtype=np.int64)
        return _Segment(text=text, pivot=whole, pivot_start=list(self.pivot_start_ids), member_start="default",
                        scored=scored)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of ensemble log-probs of the continuation's pivot tokens in nats, all greedy?) per request."""
        # one pivot tokenization per request, shared by every member
        segments = [self._pair_segment(*req.args) for req in requests]
        # longest first over all requests, as lm-eval does, so that batches hold similar lengths (little padding)
        order = sorted(range(len(requests)), key=lambda i: -len(segments[i].input_ids))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = _bar(len(requests), "ensemble loglikelihood", disable_tqdm)
        for a in range(0, len(order), self.batch_size):
            chunk = order[a:a + self.batch_size]
            for i, lp in zip(chunk, self._distributions([segments[i] for i in chunk])):
                seg = segments[i]
                target = torch.as_tensor(seg.observed()[seg.scored])
                if len(target) == 0:
                    results[i] = (0.0, True)
                    continue
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, (score, greedy))
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _rolling_segments(self, text: str) -> list[_Segment]:
        tok = self.pivot_tokenizer
        whole = tokenize_document(tok, text, add_eos=False)
        n = len(whole)
        if n == 0:
            return []
        # lm-eval's own windowing over token *indices*, so every window knows its character span
        windows = map(lm_utils.make_disjoint_window,
                      lm_utils.get_rolling_token_windows(token_list=list(range(n)), prefix_token=-1,
                                                         max_seq_len=self.max_length, context_len=1))
        segments = []
        for context, pred in windows:
            inputs = (context + pred)[:-1]
            if inputs and inputs[0] == -1:
                sub_text, sub = _slice_tokens(whole, 0, pred[-1] + 1, text)
                start, member_start = [self.pivot_prefix_id], "prefix"
                first = 0
            else:
                sub_text, sub = _slice_tokens(whole, inputs[0], pred[-1] + 1, text)
                start, member_start = [], "none"
                first = inputs[0]
            # the positions predicting pred tokens, in this segment's numbering
            offset = len(start) - first
            scored = np.asarray([p + offset - 1 for p in pred], dtype=np.int64)
            segments.append(_Segment(text=sub_text, pivot=sub, pivot_start=start, member_start=member_start,
                                     scored=scored))
        return segments

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total ensemble log-likelihood (nats) of each text on the pivot tokenization, conditioned on
        the pivot's prefix token; texts longer than max_length use lm-eval's disjoint rolling windows."""
        results = []
        for req in _bar(requests, "ensemble loglikelihood_rolling", disable_tqdm):
            (text,) = req.args
            total = 0.0
            segments = self._rolling_segments(text)
            for a in range(0, len(segments), self.batch_size):
                chunk = segments[a:a + self.batch_size]
                for seg, lp in zip(chunk, self._distributions(chunk)):
                    target = torch.as_tensor(seg.observed()[seg.scored])
                    total += float(lp.gather(-1, target[:, None]).sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def windowed_nll(self, text: str, windows) -> tuple[float, int]:
        """Ensemble negative log-likelihood (nats) of `text` on the pivot tokenization, scored window by window.

        Positions are those of [pivot prefix token] + pivot tokens of `text` (position p > 0 is text token p-1);
        `windows` is a list of (begin, end, first_scored) over them, as harness.evaluation.perplexity's
        sliding_windows makes, and every position in [first_scored, end) is scored with the positions
        [begin, position) as context. -> (nats, number of pivot tokens in the text).
        """
        whole = tokenize_document(self.pivot_tokenizer, text, add_eos=False)
        n = len(whole)
        segments = []
        for begin, end, first in windows:
            if not 0 <= begin < first <= end <= n + 1:
                raise ValueError(f"EnsembleLM.windowed_nll: window {(begin, end, first)} is outside the "
                                 f"{n + 1} positions of this text")
            if begin == 0:
                sub_text, sub = _slice_tokens(whole, 0, end - 1, text) if end > 1 else ("", whole)
                start, member_start, shift = [self.pivot_prefix_id], "prefix", 0
            else:
                sub_text, sub = _slice_tokens(whole, begin - 1, end - 1, text)
                start, member_start, shift = [], "none", begin
            scored = np.arange(first - 1 - shift, end - 1 - shift, dtype=np.int64)
            segments.append(_Segment(text=sub_text, pivot=sub, pivot_start=start, member_start=member_start,
                                     scored=scored))
        total = 0.0
        for a in range(0, len(segments), self.batch_size):
            chunk = segments[a:a + self.batch_size]
            for seg, lp in zip(chunk, self._distributions(chunk)):
                target = torch.as_tensor(seg.observed()[seg.scored])
                total -= float(lp.double().gather(-1, target[:, None]).sum())
        return total, n

    def _member_ids(self, member: _Member, row: _GenRow) -> list[int]:
        """The member's input ids for a generation row's text so far (context + generated)."""
        if member.shares_pivot:
            ids = row.ctx_ids + row.generated
        else:
            own = tokenize_document(member.tokenizer, row.context + row.text, add_eos=False)
            start = list(member.start_ids) or ([member.prefix_id] if not len(own) else [])
            ids = start + [int(i) for i in own.ids]
        return ids[-member.max_length:]

    @torch.inference_mode()
    def _step(self, rows: list[_GenRow], active: list[int], states: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step for the `active` rows: combined pivot log-probs [A, V] and per member [M, A, V].
        states[m]: member m's caches for these rows, a `_KVBatch` or one `_KVSlot` per row."""
        stacked = []
        for m, member in enumerate(self.members):
            ids_by_row = {i: self._member_ids(member, rows[i]) for i in active}
            state = states[m]
            lp = None
            if isinstance(state, _KVBatch) and member.batch_ok and self.kv_cache and member.kv_ok:
                try:
                    lp = self._last_logprobs_batched(member, state, ids_by_row)
                except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError, IndexError) as err:
                    log.warning("ensemble member %s: batched generation failed (%s: %s); one row at a time",
                                member.name, type(err).__name__, err)
                    member.batch_ok = False
            if lp is None:
                if isinstance(state, _KVBatch):  # fall back: a fresh slot per row
                    state = states[m] = [_KVSlot() for _ in rows]
                lp = torch.cat([self._last_logprobs(member, ids_by_row[i], state[i]) for i in active])
            stacked.append(self._pivot_rows(member, lp, np.arange(len(active))))
        per_member = torch.stack(stacked)                                           # [M, A, V]
        history = torch.stack([torch.where(rows[i].nll_count > 0, rows[i].nll_sum / rows[i].nll_count.clamp(min=1),
                                           torch.full_like(rows[i].nll_sum, math.inf)) for i in active], dim=1)
        available = torch.ones(per_member.shape[:2], dtype=torch.bool)
        return self.combiner(per_member, available, self.weights, history), per_member

    def _context_nll(self, context: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Members' summed CE (nats) [M] and counted pivot tokens [M] on `context`; zeros unless "mince"."""
        total = torch.zeros(len(self.members))
        count = torch.zeros(len(self.members))
        if not self.needs_history or not context:
            return total, count
        collected: list = []
        segments = self._rolling_segments(context)
        for a in range(0, len(segments), self.batch_size):
            chunk = segments[a:a + self.batch_size]
            self._distributions(chunk, nll_totals=collected)
        for s, c in collected:
            total, count = total + s, count + c.float()
        return total, count

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding on the ensemble distribution; stops at the first `until` string (cut off),
        at the pivot's EOS token, or after max_gen_toks pivot tokens. Every member conditions on the whole
        text so far at each step, reusing its keys/values for the unchanged prefix (`kv_cache`). Up to
        `batch_size` requests decode together: a member whose model type takes its positions from position ids
        alone (llama, qwen2, gpt2, gpt_neox, ...; no sliding window, no ALiBi) runs them in one forward pass,
        any other member one request at a time. "mince" picks, at each step, the member with the lowest mean
        CE on the context and the tokens generated so far."""
        results: list[str] = []
        bar = _bar(len(requests), "ensemble generate_until", disable_tqdm)
        for a in range(0, len(requests), self.batch_size):
            chunk = requests[a:a + self.batch_size]
            for req, text in zip(chunk, self._generate_chunk([req.args for req in chunk])):
                results.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
            bar.update(len(chunk))
        bar.close()
        return results

    def _generate_chunk(self, args: list[tuple]) -> list[str]:
        tok = self.pivot_tokenizer
        rows: list[_GenRow] = []
        for context, gen_kwargs in args:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            ctx_ids = list(self.pivot_start_ids) + tok(context, add_special_tokens=False)["input_ids"]
            if not ctx_ids:
                ctx_ids = [self.pivot_prefix_id]
            nll_sum, nll_count = self._context_nll(context)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            rows.append(_GenRow(context=context, until=list(until), max_new=max_new, ctx_ids=ctx_ids,
                                ctx_decoded=tok.decode(ctx_ids, skip_special_tokens=True), nll_sum=nll_sum,
                                nll_count=nll_count, done=max_new <= 0))
        n = len(rows)
        states: list = [_KVBatch(ids=[[] for _ in rows], pos=[[] for _ in rows], valid=torch.zeros((n, 0), dtype=torch.bool))
                        if member.batch_ok and n > 1 else [_KVSlot() for _ in rows] for member in self.members]
        while True:
            active = [i for i, row in enumerate(rows) if not row.done]
            if not active:
                break
            combined, per_member = self._step(rows, active, states)
            for k, i in enumerate(active):
                row = rows[i]
                nxt = int(combined[k].argmax())
                if nxt == tok.eos_token_id:
                    row.done = True
                    continue
                row.nll_sum = row.nll_sum - per_member[:, k, nxt]
                row.nll_count = row.nll_count + 1
                row.generated.append(nxt)
                row.text = tok.decode(row.ctx_ids + row.generated, skip_special_tokens=True)[len(row.ctx_decoded):]
                hits = [row.text.index(s) for s in row.until if s and s in row.text]
                if hits:
                    row.text = row.text[:min(hits)]
                    row.done = True
                elif len(row.generated) >= row.max_new:
                    row.done = True
        return [row.text for row in rows]
