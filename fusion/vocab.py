"""Vocabulary mapping between tokenizers: exact match (EM) and minimum edit distance (MinED).

Owner of the implementations below: the fusion-core work (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VocabMap:
    """source_to_target: int32 [source_vocab_size], target id or -1 (unmapped); method: "em" | "mined"."""

    source_to_target: np.ndarray
    method: str
