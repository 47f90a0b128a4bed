"""Sequence alignment: which source positions belong to each target position.

Owner of the implementations below: the fusion-core work (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """pairs: int32 [P, 2], columns (target_pos, source_pos), sorted by target then source."""

    pairs: np.ndarray
    n_target: int
    n_source: int

    def one_to_one(self) -> np.ndarray:
        """int32 [n_target]: the source position when target position t is aligned to exactly one
        source position (the reference rule), else -1."""
        out = np.full(self.n_target, -1, dtype=np.int32)
        if len(self.pairs) == 0:
            return out
        t = self.pairs[:, 0]
        counts = np.bincount(t, minlength=self.n_target)
        single = counts[t] == 1
        out[t[single]] = self.pairs[single, 1]
        return out
