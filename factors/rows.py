"""Per-row event lists -> aggregated CSR rows, the input of the fold-in kernels.

The streaming consumer and the offline ``foldstream foldin`` both go through
:func:`aggregate_rows`, so a user's vector depends only on that user's events and is the
same whichever path computed it.
"""

from __future__ import annotations

import numpy as np

from factors.errors import DataError
from factors.kernels import sum_rows_by_item


def aggregate_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    times: np.ndarray | None = None,
    half_life_seconds: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sum each row's weights per item, after optional time decay; drop unknown items.

    Parameters
    ----------
    indptr : int array, shape (m + 1,)
        Row ``r`` owns events ``indptr[r]:indptr[r+1]``.
    indices : int array
        Item index of each event; negative means the model does not know the item.
    weights : float array
        Raw event weights (>= 0).
    times : float array, optional
        Event times in seconds; needed with ``half_life_seconds``.
    half_life_seconds : float, optional
        Each event's weight is multiplied by ``0.5 ** ((t_last - t) / half_life)`` where
        ``t_last`` is the newest event time of its row: a user's vector depends on that
        user's events only. NaN times are not decayed.

    Returns
    -------
    indptr : int64 array (m + 1,)
    indices : int32 array, sorted within each row, unique
    weights : float32 array, per-item sums (computed in float64)
    unknown : int64 array (m,), events per row on unknown items
    """
    # int32 items and float32 weights (what the consumer holds) go to the kernel as they
    # are: it widens each weight to float64 as it adds it, and writes its float64 sums
    # into float32 as ``astype`` would, so no full-size copy is made on the way in or out.
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.dtype != np.int32:
        indices = indices.astype(np.int64, copy=False)
    w = np.asarray(weights)
    if w.dtype != np.float32:
        w = w.astype(np.float64, copy=False)
    m = len(indptr) - 1
    if m < 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise DataError(f"indptr must start at 0, be non-decreasing and end at len(indices)="
                        f"{len(indices)}, got {indptr[:3]}...{indptr[-1:]}")
    if len(w) != len(indices):
        raise DataError(f"weights must have {len(indices)} entries, got {len(w)}")
    counts = np.diff(indptr)
    if half_life_seconds is not None and len(w):
        if times is None:
            raise DataError("times are required with half_life_seconds")
        t = np.asarray(times, dtype=np.float64)
        if len(t) != len(indices):
            raise DataError(f"times must have {len(indices)} entries, got {len(t)}")
        # Rows are contiguous runs: each row's newest time is one reduceat (empty rows,
        # which reduceat would misread, own no events and are dropped from its input).
        finite = np.where(np.isfinite(t), t, -np.inf)
        last = np.full(m, -np.inf)
        filled = counts > 0
        last[filled] = np.maximum.reduceat(finite, indptr[:-1][filled])
        age = np.repeat(last, counts) - t
        factor = np.where(np.isfinite(age), 0.5 ** (age / half_life_seconds), 1.0)
        w = w * factor
    rows_unknown = []
    if len(indices) and indices.min() < 0:
        rows_unknown = np.repeat(np.arange(m, dtype=np.int64), counts)[indices < 0]
    unknown = np.bincount(rows_unknown, minlength=m).astype(np.int64)
    out_indptr = np.empty(m + 1, dtype=np.int64)
    cols = np.empty(len(indices), dtype=np.int32)
    sums = np.empty(len(indices), dtype=np.float32)
    n = sum_rows_by_item(indptr, indices, w, out_indptr, cols, sums)
    return out_indptr, cols[:n], sums[:n], unknown


def row_entries(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of the entries of ``rows`` (row after row, each in order) in a CSR with
    this ``indptr``: ``np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows])``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    firsts = np.zeros(len(rows), np.int64)
    np.cumsum(lengths[:-1], out=firsts[1:])
    return np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
