"""Slow, obvious NumPy twins of :mod:`factors.kernels`, for tests.

Same names, same signatures, same outputs (up to rounding): dense loops, one
``np.linalg.solve`` per row, textbook formulas. Nothing here is meant to be fast.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "gram",
    "inverse_cholesky",
    "loss_from_grams",
    "solve_rows_cached",
    "solve_rows_cg",
    "solve_rows_cholesky",
    "solve_rows_exact",
    "sum_rows_by_item",
    "weighted_loss",
    "whiten",
]


def gram(Y, regularization):
    """``Y^T Y + regularization * I`` in float64."""
    Y = np.asarray(Y, dtype=np.float64)
    return Y.T @ Y + regularization * np.eye(Y.shape[1])


def inverse_cholesky(G):
    """``inv(cholesky(G))``, NaN when G is not positive definite."""
    try:
        return np.linalg.inv(np.linalg.cholesky(G))
    except np.linalg.LinAlgError:
        return np.full_like(G, np.nan, dtype=np.float64)


def whiten(Y, Linv, Z):
    """``Z[:] = Y Linv^T``, computed in float64."""
    Z[:] = np.asarray(Y, dtype=np.float64) @ np.asarray(Linv).T


def _row_system(indptr, indices, conf, Y, G, u):
    """(A, b, n_unknown) of row u: A = G + sum s y y^T, b = sum (1 + s) y."""
    A = np.array(G, dtype=np.float64)
    b = np.zeros(Y.shape[1])
    unknown = 0
    for e in range(indptr[u], indptr[u + 1]):
        j = indices[e]
        if not 0 <= j < Y.shape[0]:
            unknown += 1
            continue
        y = Y[j].astype(np.float64)
        s = float(conf[e])
        A += s * np.outer(y, y)
        b += (1.0 + s) * y
    return A, b, unknown


def _solve(A, b):
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        return np.full_like(b, np.nan)


def solve_rows_cholesky(indptr, indices, conf, Y, G, out, unknown):
    """``out[u] = solve(G + sum s y y^T, sum (1 + s) y)`` row by row."""
    for u in range(out.shape[0]):
        A, b, unknown[u] = _row_system(indptr, indices, conf, Y, G, u)
        if unknown[u] == indptr[u + 1] - indptr[u]:
            out[u] = 0.0  # no known entries (or none at all)
        else:
            out[u] = _solve(A, b)


def solve_rows_exact(indptr, indices, conf, Y, G, Z, Linv, out, unknown, woodbury_max):
    """Rows with at most ``woodbury_max`` entries by the textbook Woodbury identity.

    ``x = Ginv b - Ginv U (S^-1 + U^T Ginv U)^-1 U^T Ginv b`` with ``Ginv = Linv^T Linv``,
    U the row's item vectors with s > 0 (columns) and S = diag(s); the rest as
    :func:`solve_rows_cholesky`. ``Z`` is not used (the kernel reads the whitened vectors
    from it; here the formula is spelled out instead).
    """
    solve_rows_cholesky(indptr, indices, conf, Y, G, out, unknown)
    if woodbury_max <= 0:
        return
    Ginv = np.asarray(Linv).T @ np.asarray(Linv)
    for u in range(out.shape[0]):
        lo, hi = indptr[u], indptr[u + 1]
        if hi - lo > woodbury_max:
            continue
        known = [e for e in range(lo, hi) if 0 <= indices[e] < Y.shape[0]]
        if not known:
            out[u] = 0.0
            continue
        b = sum((1.0 + float(conf[e])) * Y[indices[e]].astype(np.float64) for e in known)
        Gb = Ginv @ b
        pos = [e for e in known if conf[e] != 0]
        if not pos:
            out[u] = Gb
            continue
        U = np.stack([Y[indices[e]].astype(np.float64) for e in pos], axis=1)
        S_inv = np.diag([1.0 / float(conf[e]) for e in pos])
        GU = Ginv @ U
        out[u] = Gb - GU @ _solve(S_inv + U.T @ GU, U.T @ Gb)


def solve_rows_cached(rows, slots, rebuild, indptr, indices, conf, old_ptr, old_indices, old_conf,
                      Y, G, R_slab, b_slab, out, valid=None):
    """Twin of :func:`factors.gram_cache.solve_rows_cached`: every slot rebuilt from its new
    row, whatever it held (the old rows do not matter: an update must land where a rebuild
    does). The slot takes the upper Cholesky factor ``R`` of ``A`` (``A = R^T R``), packed
    row by row.
    """
    k = Y.shape[1]
    upper = np.triu_indices(k)
    for r, u in enumerate(rows):
        A, b, _ = _row_system(indptr, indices, conf, Y, G, u)
        R_slab[slots[r]] = np.linalg.cholesky(A).T[upper]
        b_slab[slots[r]] = b
        out[u] = _solve(A, b)
        if valid is not None:
            valid[r] = True


def solve_rows_cg(indptr, indices, conf, Y, G, X, cg_steps):
    """implicit's ``least_squares_cg`` for one row at a time, in float64."""
    for u in range(X.shape[0]):
        known = [e for e in range(indptr[u], indptr[u + 1]) if 0 <= indices[e] < Y.shape[0]]
        if not known:
            X[u] = 0.0
            continue
        Yu = np.stack([Y[indices[e]].astype(np.float64) for e in known])
        s = np.array([float(conf[e]) for e in known])

        def A_times(p, Yu=Yu, s=s):
            return G @ p + Yu.T @ (s * (Yu @ p))

        x = X[u].astype(np.float64)
        r = Yu.T @ (1.0 + s) - A_times(x)
        p = r.copy()
        rsold = r @ r
        if rsold < 1e-20:
            continue
        for _ in range(cg_steps):
            Ap = A_times(p)
            step = rsold / (p @ Ap)
            x = x + step * p
            r = r - step * Ap
            rsnew = r @ r
            if rsnew < 1e-20:
                break
            p = r + (rsnew / rsold) * p
            rsold = rsnew
        X[u] = x


def weighted_loss(indptr, indices, conf, X, Y, regularization):
    """The dense objective: every cell (x.y)^2, then each stored entry's correction.

    ``sum_{u,i} (x_u.y_i)^2 + sum_entries [c (1 - x.y)^2 - (x.y)^2] + reg (|X|^2 + |Y|^2)``,
    i.e. ``sum c (p - x.y)^2 + reg (...)`` when no entry repeats, divided by
    ``n_rows * n_cols + sum s``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    D = X @ Y.T
    loss = float((D**2).sum())
    total_s = 0.0
    for u in range(X.shape[0]):
        for e in range(indptr[u], indptr[u + 1]):
            j = indices[e]
            if not 0 <= j < Y.shape[0]:
                continue
            s = float(conf[e])
            loss += (1.0 + s) * (1.0 - D[u, j]) ** 2 - D[u, j] ** 2
            total_s += s
    loss += regularization * ((X**2).sum() + (Y**2).sum())
    return loss / (X.shape[0] * Y.shape[0] + total_s)


def loss_from_grams(indptr, indices, conf, X, Y, XtX, YtY, regularization):
    """:func:`weighted_loss`; the Gram matrices are not needed by the dense version."""
    return weighted_loss(indptr, indices, conf, X, Y, regularization)


def sum_rows_by_item(indptr, indices, weights, out_indptr, out_indices, out_weights):
    """Per row, distinct known items (ascending) and float64 weight sums: lexsort + reduceat."""
    m = len(indptr) - 1
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))
    known = indices >= 0
    rows, cols, w = rows[known], indices[known], np.asarray(weights, np.float64)[known]
    order = np.lexsort((cols, rows))
    rows, cols, w = rows[order], cols[order], w[order]
    if len(rows):
        first = np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])]
        starts = np.flatnonzero(first)
        w, rows, cols = np.add.reduceat(w, starts), rows[starts], cols[starts]
    out_indptr[0] = 0
    np.cumsum(np.bincount(rows, minlength=m), out=out_indptr[1:])
    out_indices[:len(cols)] = cols
    out_weights[:len(w)] = w
    return len(cols)
