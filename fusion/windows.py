"""Windows for scoring a text longer than a causal LM's context: which positions each forward pass reads and which
of them it scores. One plan serves every scorer (perplexity per domain, the micro world's held-out bits per byte,
the output ensemble), so a bits-per-byte figure is described by its convention and two numbers.

A plan covers positions 0..n_positions-1 of one token sequence (usually a context token, BOS or EOS, then the
text's tokens). Position 0 is never a target: nothing predicts it. A window (start, end, score_from) reads
positions [start, end - 1) in one forward pass and scores the targets [score_from, end), each predicted from the
positions [start, target) before it. Across a plan the targets are disjoint and cover 1..n_positions-1 in order.

Conventions (`CONVENTIONS`):
- "strided" (FuseLab's sliding windows): windows of up to `window` positions, targets included, starting at
  positions 0, stride, 2*stride, ... A window scores only the targets after the previous window's end, so every
  target but the first window's has at least window - stride positions of context. A window never starts after
  the position before its first target (which matters when stride == window: each later window then starts one
  position early). The model reads up to window - 1 positions.
- "lm_eval_rolling" (lm-eval's `loglikelihood_rolling`: `get_rolling_token_windows` with context_len=1, then
  `make_disjoint_window`): `window` is lm-eval's max_length, the positions the model reads per pass. The first
  window reads [0, m) and scores 1..m with m = min(window, n_positions - 1); each later window scores the next
  (up to) `window` targets and reads the `window` positions just before its last target, so even a short last
  window keeps a full `window` of context. `stride` does not apply.
"""
from __future__ import annotations

CONVENTIONS = ("strided", "lm_eval_rolling")

Window = tuple[int, int, int]  # (start, end, score_from): reads [start, end - 1), scores [score_from, end)


def plan_windows(n_positions: int, window: int, stride: int | None = None,
                 convention: str = "strided") -> list[Window]:
    """The windows scoring positions 1..n_positions-1 once each under `convention` (see the module docstring);
    window and stride are in positions (tokens). [] when n_positions < 2."""
    if convention == "strided":
        if stride is None or not 0 < stride <= window:
            raise ValueError(f"strided windows need 0 < stride <= window, got window={window}, stride={stride}")
        return _strided(n_positions, window, stride)
    if convention == "lm_eval_rolling":
        if window < 1:
            raise ValueError(f"lm_eval_rolling windows need window (lm-eval's max_length) >= 1, got {window}")
        return _lm_eval_rolling(n_positions, window)
    raise ValueError(f"unknown window convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def _strided(n_positions: int, window: int, stride: int) -> list[Window]:
    windows, start, scored_until = [], 0, 1
    while scored_until < n_positions:
        end = min(start + window, n_positions)
        if end > scored_until:
            windows.append((start, end, scored_until))
            scored_until = end
        # the next window's first target needs its predecessor inside that window
        start = min(start + stride, scored_until - 1)
    return windows


def _lm_eval_rolling(n_positions: int, window: int) -> list[Window]:
    if n_positions < 2:
        return []
    end = min(window, n_positions - 1) + 1
    windows = [(0, end, 1)]
    while end < n_positions:
        scored_from, end = end, min(end + window, n_positions)
        windows.append((end - 1 - window, end, scored_from))
    return windows


def describe_windows(window: int, stride: int | None, convention: str) -> str:
    """How a bits-per-byte figure was windowed, in words, for a table's label, e.g.
    "FuseLab strided windows (window 256, stride 128)" or "lm-eval rolling windows (max length 512)"."""
    if convention == "strided":
        return f"FuseLab strided windows (window {window}, stride {stride})"
    if convention == "lm_eval_rolling":
        return f"lm-eval rolling windows (max length {window})"
    raise ValueError(f"unknown window convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
