"""Scoring units on the pivot tokenization: a text, its pivot tokens, and the positions to score.

A request becomes one segment (`pair_segment`, lm-eval's loglikelihood) or several windows of one text
(`rolling_segments`, lm-eval's disjoint rolling windows; `window_segments`, any plan of fusion.windows): both
one `_segments` over a window plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion.tokens import TokenizedText, tokenize_document
from fusion.windows import plan_windows


@dataclass
class Segment:
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


def slice_tokens(tt: TokenizedText, a: int, b: int, text: str) -> tuple[str, TokenizedText]:
    """Pivot tokens a..b-1 of a document and the text they cover, offsets rebased onto that text."""
    start, end = int(tt.offsets[a, 0]), int(tt.offsets[b - 1, 1])
    sub = text[start:end]
    return sub, TokenizedText(ids=tt.ids[a:b], tokens=list(tt.tokens[a:b]), offsets=tt.offsets[a:b] - start,
                              marker=tt.marker, n_bytes=len(sub.encode("utf-8")))


def _empty_context_segment(tokenizer, prefix_id: int, continuation: str) -> Segment:
    whole = tokenize_document(tokenizer, continuation, add_eos=False)
    if len(whole) and int(whole.ids[0]) == prefix_id:
        # lm-eval: a text that starts with the prefix token conditions on that token itself
        return Segment(text=continuation, pivot=whole, pivot_start=[], member_start="prefix",
                       scored=np.arange(len(whole) - 1, dtype=np.int64))
    return Segment(text=continuation, pivot=whole, pivot_start=[prefix_id], member_start="prefix",
                   scored=np.arange(len(whole), dtype=np.int64))


def pair_segment(tokenizer, prefix_id: int, start_ids: list[int], context: str, continuation: str) -> Segment:
    """The segment of a loglikelihood request: its continuation's pivot tokens scored after the context's,
    as lm-eval's HFLM encodes the pair. prefix_id: the pivot's token for an empty context; start_ids: the
    ids the pivot tokenizer puts before a text by default."""
    if context == "":
        return _empty_context_segment(tokenizer, prefix_id, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # lm-eval's convention: trailing context spaces belong to the continuation
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    text = context + continuation
    whole = tokenize_document(tokenizer, text, add_eos=False)
    ctx = tokenize_document(tokenizer, context, add_eos=False)
    n_ctx = len(ctx)
    if not np.array_equal(whole.ids[:n_ctx], ctx.ids):
        # A token straddles the context/continuation boundary. lm-eval's HFLM then scores the context's
        # own tokens followed by whole[n_ctx:]; we do the same so that every model is scored alike.
        whole = TokenizedText(ids=np.concatenate([ctx.ids, whole.ids[n_ctx:]]),
                              tokens=list(ctx.tokens) + list(whole.tokens[n_ctx:]),
                              offsets=np.concatenate([ctx.offsets, whole.offsets[n_ctx:]]),
                              marker=whole.marker, n_bytes=whole.n_bytes)
    n_ps = len(start_ids)
    scored = np.arange(n_ps + n_ctx - 1, n_ps + len(whole) - 1, dtype=np.int64)
    return Segment(text=text, pivot=whole, pivot_start=list(start_ids), member_start="default", scored=scored)


def rolling_segments(tokenizer, prefix_id: int, max_length: int, text: str) -> list[Segment]:
    """The segments scoring every pivot token of `text` once, conditioned on the prefix token: lm-eval's
    disjoint rolling windows of at most `max_length` positions read per pass (fusion.windows, lm_eval_rolling)."""
    whole = tokenize_document(tokenizer, text, add_eos=False)
    return _segments(whole, prefix_id, text,
                     plan_windows(len(whole) + 1, max_length, convention="lm_eval_rolling"))


def window_segments(tokenizer, prefix_id: int, text: str, windows) -> tuple[list[Segment], int]:
    """Segments for windows (fusion.windows.plan_windows) over [prefix token] + pivot tokens of `text` (position
    p > 0 is text token p-1): each (begin, end, first_scored) scores [first_scored, end) with [begin, position)
    as context. -> (segments, number of pivot tokens in the text)."""
    whole = tokenize_document(tokenizer, text, add_eos=False)
    return _segments(whole, prefix_id, text, windows), len(whole)


def _segments(whole: TokenizedText, prefix_id: int, text: str, windows) -> list[Segment]:
    """One segment per window over [prefix token] + `whole` (the pivot tokens of `text`); a segment holds the
    window's positions [begin, end) (the last one only as a target)."""
    n = len(whole)
    segments = []
    for begin, end, first in windows:
        if not 0 <= begin < first <= end <= n + 1:
            raise ValueError(f"EnsembleLM.windowed_nll: window {(begin, end, first)} is outside the "
                             f"{n + 1} positions of this text")
        if begin == 0:
            sub_text, sub = slice_tokens(whole, 0, end - 1, text) if end > 1 else ("", whole)
            start, member_start, shift = [prefix_id], "prefix", 0
        else:
            sub_text, sub = slice_tokens(whole, begin - 1, end - 1, text)
            start, member_start, shift = [], "none", begin
        scored = np.arange(first - 1 - shift, end - 1 - shift, dtype=np.int64)
        segments.append(Segment(text=sub_text, pivot=sub, pivot_start=start, member_start=member_start,
                                scored=scored))
    return segments
