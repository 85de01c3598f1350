"""Drift statistics of a streaming model: popularity shift, vector shift, fold-in loss.

Plain NumPy functions over arrays, computed in float64; the consumer's
:class:`streamer.drift.DriftMonitor` keeps the windows and calls these.

Popularity is compared over a fixed set of buckets: the ``top`` items of the training
window, each its own bucket, plus one "other" bucket for every remaining known item.
Items the model does not know are not a popularity bucket; they are counted apart (the
unknown-item ratio) so that one signal does not hide inside another.

The fold-in loss is the Hu-Koren-Volinsky objective of one user's row, normalised so
that it compares with the training loss ``ImplicitALS.loss_history_`` (see
:func:`foldin_losses`).
"""

from __future__ import annotations

import math

import numpy as np

from factors.errors import DataError

__all__ = [
    "bucket_counts",
    "bucket_of_items",
    "centroid_distance",
    "cosine_shift",
    "foldin_loss",
    "foldin_losses",
    "item_counts",
    "item_regularization_share",
    "js_divergence",
    "popularity_distribution",
    "psi",
    "top_items",
]

#: Default floor of an empty bucket's share in :func:`psi`.
PSI_EPS = 1e-6
# Entries per chunk in foldin_losses: bounds the gathered float64 copies to
# _LOSS_CHUNK * k * 8 bytes (4 MiB at k = 256): they stay in cache.
_LOSS_CHUNK = 2_048


# ----------------------------------------------------------------------------- popularity


def item_counts(item_indices, n_items: int) -> np.ndarray:
    """Interactions per item: ``counts[j] = #{e : item_indices[e] == j}``.

    Indices outside ``[0, n_items)`` (unknown items, conventionally -1) are not counted.
    Count events, not distinct users, so that the training reference and the streaming
    window (which sees events) measure the same thing.

    Returns
    -------
    int64 [n_items]
    """
    idx = _index_array("item_indices", item_indices)
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
        raise DataError(f"n_items must be an integer >= 0, got {n_items!r}")
    known = idx[(idx >= 0) & (idx < n_items)]
    return np.bincount(known, minlength=int(n_items)).astype(np.int64)


def top_items(counts, n: int) -> np.ndarray:
    """Indices of the ``n`` items with the largest counts, most popular first.

    Ties go to the lower index. Items with a count of 0 are never chosen, so fewer than
    ``n`` come back when fewer items were seen.

    Returns
    -------
    int64 [min(n, #items with count > 0)]
    """
    c = _counts_array("counts", counts)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"n must be an integer >= 0, got {n!r}")
    order = np.argsort(-c, kind="stable")[: int(n)]
    return order[c[order] > 0].astype(np.int64)


def popularity_distribution(counts, top) -> np.ndarray:
    """Shares of the ``top`` items and of everything else.

    With ``T = sum_j counts[j]``::

        p[b] = counts[top[b]] / T                  for b < len(top)
        p[len(top)] = (T - sum_b counts[top[b]]) / T    (the "other" bucket)

    Parameters
    ----------
    counts : float array [n_items], >= 0
        Interactions per item index.
    top : int array [t]
        Distinct item indices in ``[0, n_items)``.

    Returns
    -------
    float64 [t + 1], summing to 1; all zeros when ``T == 0``.
    """
    c = _counts_array("counts", counts)
    top = _top_array(top, c.shape[0])
    total = float(c.sum())
    out = np.zeros(top.shape[0] + 1)
    if total <= 0.0:
        return out
    out[:-1] = c[top] / total
    out[-1] = max(total - float(c[top].sum()), 0.0) / total
    return out


def bucket_of_items(top, n_items: int) -> np.ndarray:
    """The popularity bucket of every item index: ``b`` for ``top[b]``, ``len(top)`` otherwise.

    Returns
    -------
    int64 [n_items], the lookup table of :func:`bucket_counts`.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
        raise DataError(f"n_items must be an integer >= 0, got {n_items!r}")
    top = _top_array(top, int(n_items))
    buckets = np.full(int(n_items), top.shape[0], dtype=np.int64)
    buckets[top] = np.arange(top.shape[0], dtype=np.int64)
    return buckets


def bucket_counts(item_indices, buckets) -> tuple[np.ndarray, int]:
    """Count events per popularity bucket.

    Parameters
    ----------
    item_indices : int array [e]
        Model item index of each event; outside ``[0, n_items)`` means unknown.
    buckets : int64 [n_items]
        From :func:`bucket_of_items`, with ``t + 1`` buckets.

    Returns
    -------
    counts : int64 [t + 1]
    unknown : int, events on unknown items (in no bucket)
    """
    idx = _index_array("item_indices", item_indices)
    buckets = np.asarray(buckets)
    n_buckets = int(buckets.max()) + 1 if buckets.size else 1
    known = (idx >= 0) & (idx < buckets.shape[0])
    counts = np.bincount(buckets[idx[known]], minlength=n_buckets).astype(np.int64)
    return counts, int(idx.shape[0] - np.count_nonzero(known))


def psi(expected, actual, eps: float = PSI_EPS) -> float:
    """Population stability index of ``actual`` against ``expected``, natural log.

    Both are normalised to shares first (``e = expected / sum(expected)``, likewise ``a``),
    so counts can be passed directly. Then every share is floored,
    ``e_b <- max(e_b, eps)`` and ``a_b <- max(a_b, eps)``, and::

        PSI = sum_b (a_b - e_b) ln(a_b / e_b)

    Without the floor a bucket empty on one side only would make PSI infinite; with it,
    such a bucket of share ``a`` contributes ``(a - eps) ln(a / eps)`` (about
    ``13.8 a`` for ``eps = 1e-6``). The floored shares are not renormalised: the floor
    adds at most ``eps`` per empty bucket. A bucket empty on both sides contributes 0.
    PSI is symmetric in its arguments and >= 0; the usual reading is < 0.1 stable,
    0.1-0.25 moderate shift, > 0.25 large shift.

    Parameters
    ----------
    expected, actual : float arrays [b], >= 0, of the same shape
    eps : float, > 0

    Returns
    -------
    float; NaN when either side sums to 0 (no observations).
    """
    e, a = _pair("expected", expected, "actual", actual)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise DataError(f"eps must be a finite number > 0, got {eps!r}")
    if e is None:
        return math.nan
    e = np.maximum(e, eps)
    a = np.maximum(a, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence of ``p`` and ``q`` in bits (base-2 logarithms).

    Both are normalised to sum 1 first. With ``m = (p + q) / 2``::

        JS = KL(p || m) / 2 + KL(q || m) / 2,    KL(p || m) = sum_b p_b log2(p_b / m_b)

    taking ``0 log 0 = 0``, so empty buckets need no floor. Symmetric, 0 exactly when
    ``p == q``, and at most 1 (disjoint supports).

    Returns
    -------
    float in [0, 1]; NaN when either side sums to 0.
    """
    p, q = _pair("p", p, "q", q)
    if p is None:
        return math.nan
    m = 0.5 * (p + q)
    value = 0.5 * (_kl_bits(p, m) + _kl_bits(q, m))
    return float(min(max(value, 0.0), 1.0))


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    nz = p > 0  # m >= p / 2 > 0 wherever p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / m[nz])))


# ----------------------------------------------------------------------------- vectors


def cosine_shift(old, new) -> np.ndarray:
    """Row-wise ``1 - cos(old_u, new_u)``: 0 for the same direction, 1 orthogonal, 2 opposite.

    ``cos = old . new / (||old|| ||new||)``, in float64, clipped to [-1, 1]. A zero row has
    no direction: when both rows are zero the shift is 0 (nothing moved); when exactly one
    is zero it is 1, the value of an unrelated direction (a user who lost or gained every
    known item).

    Parameters
    ----------
    old, new : float arrays [m, k]

    Returns
    -------
    float64 [m] in [0, 2]
    """
    a = _matrix("old", old)
    b = _matrix("new", new)
    if a.shape != b.shape:
        raise DataError(f"old and new must have the same shape, got {a.shape} and {b.shape}")
    na = np.sqrt(np.einsum("ij,ij->i", a, a))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))
    dot = np.einsum("ij,ij->i", a, b)
    both = (na > 0) & (nb > 0)
    cos = np.zeros(a.shape[0])
    np.divide(dot, na * nb, out=cos, where=both)
    shift = 1.0 - np.clip(cos, -1.0, 1.0)
    shift[(na == 0) & (nb == 0)] = 0.0
    return shift


def centroid_distance(vectors, reference_centroid) -> float:
    """Distance of the mean of ``vectors`` from a reference centroid, relative to its norm.

    ::

        d = || mean_u vectors[u] - c || / || c ||

    so 0 means the same centroid and 1 a move as long as the reference centroid itself.
    A zero reference centroid gives ``inf`` (0 when the mean is zero too). To compare a
    running mean, pass it as a single row.

    Parameters
    ----------
    vectors : float array [m, k], m >= 1
    reference_centroid : float array [k]

    Returns
    -------
    float; NaN when ``m == 0``.
    """
    v = _matrix("vectors", vectors)
    c = np.asarray(reference_centroid, dtype=np.float64)
    if c.ndim != 1 or c.shape[0] != v.shape[1]:
        raise DataError(
            f"reference_centroid must have shape ({v.shape[1]},), got {c.shape}"
        )
    if not np.isfinite(c).all():
        raise DataError("reference_centroid must be finite, got NaN or inf")
    if v.shape[0] == 0:
        return math.nan
    distance = float(np.linalg.norm(v.mean(axis=0) - c))
    norm = float(np.linalg.norm(c))
    if norm == 0.0:
        return 0.0 if distance == 0.0 else math.inf
    return distance / norm


# ----------------------------------------------------------------------------- loss


def item_regularization_share(item_factors, regularization: float, n_users: int) -> float:
    """``reg ||Y||_F^2 / n_users``: one training user's share of the item penalty.

    Pass it as ``item_share`` to :func:`foldin_losses` so that the losses of the training
    users add up to the training loss exactly.
    """
    if isinstance(n_users, bool) or not isinstance(n_users, (int, np.integer)) or n_users < 1:
        raise DataError(f"n_users must be an integer >= 1, got {n_users!r}")
    Y = np.asarray(item_factors, dtype=np.float64)
    return float(regularization) * float(np.sum(Y * Y)) / int(n_users)


def foldin_losses(
    indptr,
    indices,
    conf,
    X,
    Y,
    regularization: float,
    *,
    YtY=None,
    item_share: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row implicit-ALS loss, normalised like the training loss, and its weight.

    The training loss (:func:`factors.kernels.weighted_loss`, ``loss_history_``) is::

        L = [sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (||X||^2 + ||Y||^2)] / (n_users n_items + sum s)

    with ``c = 1 + s, p = 1`` on the observed entries and ``c = 1, p = 0`` elsewhere. It
    splits into one numerator and one denominator per user::

        num_u = sum_i c_ui (p_ui - x_u . y_i)^2 + reg ||x_u||^2 + item_share
              = x_u^T (Y^T Y) x_u + sum_{j observed} [c_j - 2 c_j (x_u . y_j) + s_j (x_u . y_j)^2]
                + reg ||x_u||^2 + item_share
        den_u = n_items + sum_{j observed} s_j          (the user's total confidence)

    and ``L = sum_u num_u / sum_u den_u`` when ``item_share = reg ||Y||^2 / n_users``
    (:func:`item_regularization_share`). This function returns ``loss_u = num_u / den_u``
    (the loss per unit of confidence of that user: the observed entries and the user's
    whole unobserved row, as in training) and ``weight_u = den_u``; the weighted mean
    ``sum loss w / sum w`` of any set of rows is then on the training loss's scale, and
    equals it for the training rows at the fitted factors.

    As in training, entries whose index is outside ``[0, n_items)`` are ignored and
    repeated indices count as separate observations. A row without known entries has
    ``loss = (reg ||x||^2 + x^T Y^T Y x + item_share) / n_items``.

    Parameters
    ----------
    indptr : int array [m + 1]
    indices : int array [nnz]
    conf : float array [nnz], ``s = alpha * f(r) >= 0`` (:func:`factors.foldin.confidence`)
    X : float array [m, k], the rows' vectors
    Y : float array [n_items, k], the fixed item factors
    regularization : float
    YtY : float64 [k, k], optional
        ``Y^T Y`` without regularization; computed when not given (pass it once per model).
    item_share : float, the per-user share of ``reg ||Y||^2`` to add to every numerator

    Returns
    -------
    loss : float64 [m]
    weight : float64 [m]
    """
    indptr = _index_array("indptr", indptr).astype(np.int64, copy=False)
    idx = _index_array("indices", indices)
    s = np.asarray(conf, dtype=np.float64)
    X = _matrix("X", X)
    Y = np.asarray(Y)
    if Y.ndim != 2 or Y.shape[1] != X.shape[1]:
        raise DataError(f"Y must have shape (n_items, {X.shape[1]}), got {Y.shape}")
    m = X.shape[0]
    if indptr.shape[0] != m + 1 or indptr[0] != 0 or indptr[-1] != idx.shape[0]:
        raise DataError(
            f"indptr must have {m + 1} entries from 0 to len(indices)={idx.shape[0]}, "
            f"got {indptr.shape[0]} entries ending at {indptr[-1] if indptr.size else None}"
        )
    if np.any(np.diff(indptr) < 0):
        raise DataError("indptr must be non-decreasing")
    if s.shape != idx.shape:
        raise DataError(f"conf must have len(indices)={idx.shape[0]} entries, got {s.shape}")
    n_items = Y.shape[0]
    if YtY is None:
        Yd = Y.astype(np.float64)
        YtY = Yd.T @ Yd
    YtY = np.asarray(YtY, dtype=np.float64)

    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))
    known = (idx >= 0) & (idx < n_items)
    rows, cols, s = rows[known], idx[known], s[known]
    entries = np.zeros(m)
    total_s = np.zeros(m)
    for lo in range(0, rows.shape[0], _LOSS_CHUNK):
        r = rows[lo : lo + _LOSS_CHUNK]
        sc = s[lo : lo + _LOSS_CHUNK]
        d = np.einsum("ij,ij->i", Y[cols[lo : lo + _LOSS_CHUNK]].astype(np.float64), X[r])
        c = 1.0 + sc
        entries += np.bincount(r, weights=c - 2.0 * c * d + sc * d * d, minlength=m)
        total_s += np.bincount(r, weights=sc, minlength=m)
    # einsum, not X @ YtY: BLAS threads and the numba pool of the fold-in that runs just
    # before starve each other on a busy machine (a 0.07 ms product took 40 ms)
    quad = np.einsum("ij,ij->i", np.einsum("ij,jk->ik", X, YtY), X)
    norms = np.einsum("ij,ij->i", X, X)
    num = quad + entries + float(regularization) * norms + float(item_share)
    den = n_items + total_s
    return num / den, den


def foldin_loss(items, conf, x, Y, regularization: float, *, YtY=None,
                item_share: float = 0.0) -> float:
    """:func:`foldin_losses` of one user: ``num_u / den_u`` for the row ``(items, conf)``, vector ``x``.

    Parameters
    ----------
    items : int array [n], item indices (outside ``[0, n_items)`` ignored)
    conf : float array [n], ``s >= 0``
    x : float array [k]
    Y, regularization, YtY, item_share : as in :func:`foldin_losses`
    """
    items = _index_array("items", items)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"x must be 1-D [k], got shape {x.shape}")
    loss, _ = foldin_losses(np.array([0, items.shape[0]]), items, conf, x[None, :], Y,
                            regularization, YtY=YtY, item_share=item_share)
    return float(loss[0])


# ----------------------------------------------------------------------------- checks


def _index_array(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _counts_array(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and (not np.isfinite(array).all() or array.min() < 0):
        raise DataError(f"{name} must be finite and >= 0, got min {array.min()}")
    return array


def _top_array(top, n_items: int) -> np.ndarray:
    top = _index_array("top", top).astype(np.int64, copy=False)
    if top.size:
        if top.min() < 0 or top.max() >= n_items:
            raise DataError(
                f"top must hold item indices in [0, {n_items}), got {top.min()}..{top.max()}"
            )
        if np.unique(top).shape[0] != top.shape[0]:
            raise DataError("top must hold distinct item indices, got repeats")
    return top


def _pair(name_a, a, name_b, b):
    """Both arrays as shares (float64, summing to 1), or (None, None) if one is empty."""
    a = _counts_array(name_a, a)
    b = _counts_array(name_b, b)
    if a.shape != b.shape:
        raise DataError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")
    ta, tb = float(a.sum()), float(b.sum())
    if ta <= 0.0 or tb <= 0.0:
        return None, None
    return a / ta, b / tb


def _matrix(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise DataError(f"{name} must be 2-D [m, k], got shape {array.shape}")
    return array
