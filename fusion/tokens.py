"""Tokenizer conventions: word-boundary markers, byte-level alphabets, document tokenization.

Owner of the implementations below: the fusion-core work (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD_BOUNDARY_MARKERS = ("▁", "Ġ")


@dataclass(frozen=True)
class TokenizedText:
    """One document as one tokenizer sees it.

    ids: int32 [n]; tokens: raw token strings (with the tokenizer's marker), length n;
    offsets: int64 [n, 2] character spans in the text (EOS gets (len(text), len(text)));
    marker: the word-boundary marker ("▁", "Ġ" or ""); n_bytes: utf-8 bytes of the text.
    """

    ids: np.ndarray
    tokens: list[str]
    offsets: np.ndarray
    marker: str
    n_bytes: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])
