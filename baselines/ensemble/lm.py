"""EnsembleLM: the output ensemble as an lm-eval model (`fuselab-ensemble`); see the package docstring."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

import lm_eval.models  # noqa: F401  -- registers lm-eval's own models first (see FACTS.md)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import fusion.align  # noqa: F401  -- registers the alignments in ALIGNMENTS
from fusion.registry import ALIGNMENTS

from .combiners import ENSEMBLE_COMBINERS, Combiner, causal_mean_ce, observed_nll
from .generation import GreedyDecoder
from .members import (Member, default_start_ids, forward_logprobs, load_pairs, make_member, member_view,
                      pivot_logprobs, prefix_id)
from .segments import Segment, pair_segment, rolling_segments, window_segments


def _bar(work, desc: str, disable: bool):
    """A tqdm bar over `work` (an iterable, or a total to `update`) unless lm-eval asked for none
    (`disable_tqdm`, set by harness.evaluation.evaluate(progress=False) or a quiet run)."""
    from tqdm.auto import tqdm

    if isinstance(work, int):
        return tqdm(total=work, desc=desc, unit="request", disable=disable, leave=False)
    return tqdm(work, desc=desc, unit="request", disable=disable, leave=False)


def _split(value, cast=str) -> list:
    return [cast(v) for v in value.split("|") if v] if isinstance(value, str) else value


def parse_model_args(args: dict) -> dict:
    """EnsembleLM keyword arguments from lm-eval's `--model_args` (after lm-eval's own conversion of "true",
    "None" and numbers): "|"-separated members, names and weights; digit strings for pivot, top_k,
    batch_size; "1" / "true" / "yes" for kv_cache."""
    out = dict(args)
    for key in ("members", "names"):
        if key in out:
            out[key] = _split(out[key])
    if isinstance(out.get("weights"), (str, int, float)):
        out["weights"] = _split(str(out["weights"]), float)
    if isinstance(out.get("pivot"), str) and out["pivot"].lstrip("-").isdigit():
        out["pivot"] = int(out["pivot"])
    if isinstance(out.get("top_k"), str):
        out["top_k"] = int(out["top_k"]) if out["top_k"] not in ("None", "") else None
    if isinstance(out.get("batch_size"), str) and out["batch_size"].isdigit():
        out["batch_size"] = int(out["batch_size"])
    if "kv_cache" in out and not isinstance(out["kv_cache"], bool):
        out["kv_cache"] = str(out["kv_cache"]).lower() in ("1", "true", "yes")
    return out


def _checked_weights(weights, n_members: int) -> torch.Tensor:
    if weights is not None and len(weights) != n_members:
        raise ValueError(f"EnsembleLM: {len(weights)} weights for {n_members} members; give one per member")
    if weights is not None and any(w < 0 for w in weights):
        raise ValueError(f"EnsembleLM: weights must be >= 0, got {weights}")
    return torch.tensor(weights if weights is not None else [1.0] * n_members, dtype=torch.float32)


def _pivot_tokenizer(pivot, pairs: list[tuple]):
    if isinstance(pivot, int) and not -len(pairs) <= pivot < len(pairs):
        raise ValueError(f"EnsembleLM: pivot={pivot} but there are {len(pairs)} members; give a member index "
                         f"or the target's tokenizer")
    return pairs[pivot][1] if isinstance(pivot, int) else pivot


@register_model("fuselab-ensemble")
class EnsembleLM(LM):
    """An output ensemble of causal LMs, possibly with different tokenizers, scored on a pivot tokenization.

    members: list of (model, tokenizer) pairs or local HF folders. pivot: index of the member whose tokenizer
        is the pivot, or a tokenizer (e.g. the FuseLLM target's). combiner: a name in ENSEMBLE_COMBINERS.
        weights: one per member ("weighted").
    alignment: a name in fusion's ALIGNMENTS ("offsets", "dtw"); vocab_map: "em" | "mined".
    top_k: None maps a cross-tokenizer member's full distribution, k keeps its top-k only.
    batch_size: requests per forward batch; max_length: pivot/member context cap in tokens.
    kv_cache: generation reuses each member's keys/values for the longest prefix of its ids that did
        not change since the previous step (a cross-tokenizer member's tokenization of the text so far
        can change at its end as characters arrive); False recomputes every step (same outputs, slower).
    From lm-eval (`--model_args`), strings are parsed by create_from_arg_string / create_from_arg_obj
    (parse_model_args): "|"-separated members, names and weights.
    """

    def __init__(self, members, pivot: int | Any = 0, combiner: str = "mean", weights=None,
                 alignment: str = "offsets", vocab_map: str = "em", top_k: int | None = None,
                 batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 device: str = "cpu", dtype: str = "float32", names: list[str] | None = None,
                 kv_cache: bool = True):
        super().__init__()
        pairs, member_names = load_pairs(members, getattr(torch, str(dtype)))
        if names is not None:
            member_names = list(names)
        self.pivot_tokenizer = _pivot_tokenizer(pivot, pairs)
        self.combiner_name = combiner
        self.combiner: Combiner = ENSEMBLE_COMBINERS.get(combiner)
        self.needs_history = ENSEMBLE_COMBINERS.meta(combiner).get("needs_history", False)
        self.weights = _checked_weights(weights, len(pairs))
        self.alignment_name = alignment
        self.align = ALIGNMENTS.get(alignment)
        self.top_k = None if top_k is None else int(top_k)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"EnsembleLM: batch_size={batch_size!r}; give a positive integer (no 'auto')")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.kv_cache = bool(kv_cache)
        self._device = torch.device(device)
        self.vocab_size = len(self.pivot_tokenizer)
        self.pivot_start_ids = default_start_ids(self.pivot_tokenizer)
        self.pivot_prefix_id = prefix_id(self.pivot_tokenizer, "pivot")
        self.members: list[Member] = [
            make_member(name, model, tok, self.pivot_tokenizer, vocab_map, self._device, self.max_length)
            for name, (model, tok) in zip(member_names, pairs)]

    # -- lm-eval plumbing ------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's `--model_args` (parsed) plus its `--batch_size` / `--device`; a key given in the model
        arguments wins (lm-eval always passes its default batch size)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**parse_model_args({**extra, **arg_dict}))

    @property
    def device(self):
        return self._device

    # -- members on segments ------------------------------------------------------------------------

    def _member_view(self, member: Member, seg: Segment) -> tuple[list[int], np.ndarray]:
        """The member's input ids for a segment and its pos_map int64 [T] (members.member_view)."""
        return member_view(member, seg, self.align)

    def _pivot_rows(self, member: Member, logprobs: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The member's distributions at its positions `rows`, as pivot-vocabulary log-probs [R, V]."""
        return pivot_logprobs(member, logprobs, rows, self.vocab_size, self.top_k)

    def _distributions(self, segments: list[Segment], nll_totals: list | None = None):
        """Per segment: combined log-probs [P, V] at its scored positions.

        nll_totals: when a list, each segment appends (nats summed [M], positions counted [M]): every
        member's own cross-entropy on the pivot tokens where it contributes (MinCE history for generation).
        """
        per_member = []
        for member in self.members:
            views = [self._member_view(member, seg) for seg in segments]
            per_member.append((views, forward_logprobs(member, [v[0] for v in views], self.batch_size,
                                                       self._device)))
        with_history = self.needs_history or nll_totals is not None
        results = []
        for k, seg in enumerate(segments):
            observed = seg.observed()
            needed = np.arange(len(observed)) if with_history else seg.scored
            stacked, avail = [], []
            for member, (views, logprobs) in zip(self.members, per_member):
                pos_map = views[k][1]
                have = pos_map[needed] >= 0
                stacked.append(self._pivot_rows(member, logprobs[k], np.where(have, pos_map[needed], 0)))
                avail.append(torch.as_tensor(have))
            lp, av = torch.stack(stacked), torch.stack(avail)                  # [M, N, V], [M, N]
            history = torch.full(av.shape, float("inf"))
            if with_history:
                nll, counted = observed_nll(lp, av, torch.as_tensor(observed))
                if nll_totals is not None:
                    nll_totals.append((nll.sum(dim=1), counted.sum(dim=1)))
                idx = torch.as_tensor(seg.scored)
                lp, av, history = lp[:, idx], av[:, idx], causal_mean_ce(nll, counted)[:, idx]
            results.append(self.combiner(lp, av, self.weights, history))
        return results

    def _scored(self, segments: list[Segment], nll_totals: list | None = None):
        """(segment, combined log-probs [P, V]) per segment, `batch_size` segments per forward batch."""
        for a in range(0, len(segments), self.batch_size):
            chunk = segments[a:a + self.batch_size]
            yield from zip(chunk, self._distributions(chunk, nll_totals=nll_totals))

    # -- requests ---------------------------------------------------------------------------------

    def _pair_segment(self, context: str, continuation: str) -> Segment:
        return pair_segment(self.pivot_tokenizer, self.pivot_prefix_id, self.pivot_start_ids, context, continuation)

    def _rolling_segments(self, text: str) -> list[Segment]:
        return rolling_segments(self.pivot_tokenizer, self.pivot_prefix_id, self.max_length, text)

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

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total ensemble log-likelihood (nats) of each text on the pivot tokenization, conditioned on
        the pivot's prefix token; texts longer than max_length use lm-eval's disjoint rolling windows."""
        results = []
        for req in _bar(requests, "ensemble loglikelihood_rolling", disable_tqdm):
            (text,) = req.args
            total = 0.0
            for seg, lp in self._scored(self._rolling_segments(text)):
                target = torch.as_tensor(seg.observed()[seg.scored])
                total += float(lp.gather(-1, target[:, None]).sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def windowed_nll(self, text: str, windows) -> tuple[float, int]:
        """Ensemble negative log-likelihood (nats) of `text` on the pivot tokenization, scored window by window.

        Positions are those of [pivot prefix token] + pivot tokens of `text` (position p > 0 is text token p-1);
        `windows` is a list of (begin, end, first_scored) over them, as fusion.windows.plan_windows makes (either
        convention), and every position in [first_scored, end) is scored with the positions
        [begin, position) as context. -> (nats, number of pivot tokens in the text).
        """
        segments, n = window_segments(self.pivot_tokenizer, self.pivot_prefix_id, text, windows)
        total = 0.0
        for seg, lp in self._scored(segments):
            target = torch.as_tensor(seg.observed()[seg.scored])
            total -= float(lp.double().gather(-1, target[:, None]).sum())
        return total, n

    def context_nll(self, context: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Members' summed CE (nats) [M] and counted pivot tokens [M] on `context` (the start of the "mince"
        history in generation); zeros unless the combiner needs a history."""
        total = torch.zeros(len(self.members))
        count = torch.zeros(len(self.members))
        if not self.needs_history or not context:
            return total, count
        collected: list = []
        segments = self._rolling_segments(context)
        for a in range(0, len(segments), self.batch_size):
            self._distributions(segments[a:a + self.batch_size], nll_totals=collected)
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
        decoder = GreedyDecoder(self)
        bar = _bar(len(requests), "ensemble generate_until", disable_tqdm)
        for a in range(0, len(requests), self.batch_size):
            chunk = requests[a:a + self.batch_size]
            for req, text in zip(chunk, decoder.generate([req.args for req in chunk])):
                results.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
            bar.update(len(chunk))
        bar.close()
        return results
