"""Checks a stage runs on its output before it is published."""
from __future__ import annotations

import numpy as np


def require_finite(ds, columns: tuple[str, ...], stage: str, what: str) -> None:
    """Refuse to write a dataset with NaN/inf in `columns` (flat or list columns): raise
    harness.models.NonFiniteError naming the stage, the document and what is wrong, instead of caching values
    that fail (or silently skew) later stages."""
    import pyarrow as pa

    from harness.models import NonFiniteError

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    for col in columns:
        arr = table.column(col).combine_chunks()
        nested = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
        flat = arr.flatten() if nested else arr
        bad = ~np.isfinite(np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32))
        if not bad.any():
            continue
        first = int(np.argmax(bad))
        if nested:  # the document (row) holding the first bad value
            offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False))
            first = int(np.searchsorted(offsets - offsets[0], first, side="right") - 1)
        doc = ds[first]["doc_id"] if "doc_id" in ds.column_names else first
        raise NonFiniteError(f"{stage}: {what}: {int(bad.sum())} of {bad.size} values in column {col} "
                             f"are NaN/inf (first in doc_id {doc}); nothing was cached")
