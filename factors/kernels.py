"""Numba kernels of implicit ALS: Gram matrix, exact and CG row solves, the training loss.

Plain functions over arrays. Inputs are a CSR-like triple ``(indptr int64, indices int32,
conf float32)`` whose rows are the rows being solved for (users, or items on the
transposed side), a fixed factor matrix ``Y`` (float32, one row per column of the CSR)
and preallocated float32 outputs. ``conf`` holds ``s = c - 1 = alpha * f(r) >= 0``, so
for a row ``u`` with entries ``j``::

    A_u = G + sum_j s_j y_j y_j^T        G = Y^T Y + reg * I
    b_u = sum_j (1 + s_j) y_j            x_u = A_u^-1 b_u

The small k x k systems are accumulated and solved in float64; only the results are
rounded to float32. Every row is solved independently of the others and sums that span
many rows (:func:`gram`, :func:`weighted_loss`) add fixed-size blocks in a fixed order,
so results do not depend on the number of threads.

Each kernel has a slow NumPy twin of the same name and signature in
:mod:`factors.reference`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = [
    "default_woodbury_max",
    "gram",
    "inverse_cholesky",
    "loss_from_grams",
    "solve_rows_cg",
    "solve_rows_cholesky",
    "solve_rows_exact",
    "solve_rows_exact_serial",
    "weighted_loss",
    "whiten",
]

# Reassociation lets LLVM vectorise dot-product reductions. No "nnan"/"ninf": a NaN that
# appears must survive to the caller's finiteness check.
_FASTMATH = {"reassoc", "contract", "nsz"}

# The parallel loops run over blocks of rows rather than single rows, so every task
# allocates its scratch once. Rows are cut into about _N_BLOCKS blocks of equal estimated
# cost, and the blocks are visited in an interleaved order so that each thread's static
# share of the loop spreads over the whole row range (heavy rows tend to cluster, e.g.
# popular items first). Neither numba.get_num_threads() nor set_parallel_chunksize() is
# used inside a kernel: both stop numba from caching the compiled function.
_N_BLOCKS = 256
# Rows per partial sum in gram and weighted_loss. Fixed, so the summation order, and with
# it every bit of the result, is independent of the thread count.
_SUM_BLOCK = 1024
# Floor of the residual norm^2 below which CG stops (as in implicit's _least_squares_cg).
_CG_EPS = 1e-20


def default_woodbury_max(factors: int) -> int:
    """Longest row solved through the Woodbury identity in :func:`solve_rows_exact`.

    A row of n entries costs about ``n^2 k / 2 + n^3 / 6 + k^2 / 2`` multiply-adds through
    (whitened) Woodbury against ``n k^2 / 2 + k^3 / 6`` through Cholesky, so the paths
    cross near ``n = k``. Measured on a 2-core Sapphire Rapids (minimum of 9 runs, one
    thread, 20k random item vectors) the crossover sat at n = 15, 33, 66 and 115 for
    k = 16, 32, 64 and 128; both paths cost about the same near it.
    """
    return max(1, int(factors))


# --------------------------------------------------------------------------------------
# small dense helpers (inlined into the parallel loops)


@njit(cache=True)
def _row_blocks(indptr, per_row_cost, n_blocks):
    """Cut rows into at most ``n_blocks`` contiguous blocks of about equal cost.

    The cost of a row is its length plus ``per_row_cost``. Returns the block boundaries
    (int64, first 0, last m) and a visiting order that interleaves the blocks.
    """
    m = indptr.shape[0] - 1
    total = (indptr[m] - indptr[0]) + m * per_row_cost
    target = max(total // max(n_blocks, 1), 4 * per_row_cost, 1)
    bounds = np.empty(m + 2, dtype=np.int64)
    bounds[0] = 0
    nb = 0
    acc = 0
    for u in range(m):
        acc += (indptr[u + 1] - indptr[u]) + per_row_cost
        if acc >= target:
            nb += 1
            bounds[nb] = u + 1
            acc = 0
    if nb == 0 or bounds[nb] != m:
        nb += 1
        bounds[nb] = m
    # visit 0, s, 2s, ..., 1, 1+s, ...: a static split of this order hands every thread
    # blocks from all over the row range
    stride = 1
    while stride * stride < nb:
        stride += 1
    order = np.empty(nb, dtype=np.int64)
    pos = 0
    for start in range(stride):
        for blk in range(start, nb, stride):
            order[pos] = blk
            pos += 1
    return bounds[: nb + 1], order


@njit(cache=True, fastmath=_FASTMATH)
def _syr8_lower(A, Yb, t, k):
    """A[a, c] += sum_q t[q] Yb[q, a] Yb[q, c] over eight rows q, lower triangle (c <= a).

    Two rows of A at a time with the sixteen t[q] Yb[q, a] factors held in registers:
    every load of Yb[:, c] feeds sixteen multiply-adds.
    """
    a = 0
    while a + 2 <= k:
        p0 = t[0] * Yb[0, a]
        p1 = t[1] * Yb[1, a]
        p2 = t[2] * Yb[2, a]
        p3 = t[3] * Yb[3, a]
        p4 = t[4] * Yb[4, a]
        p5 = t[5] * Yb[5, a]
        p6 = t[6] * Yb[6, a]
        p7 = t[7] * Yb[7, a]
        a1 = a + 1
        r0 = t[0] * Yb[0, a1]
        r1 = t[1] * Yb[1, a1]
        r2 = t[2] * Yb[2, a1]
        r3 = t[3] * Yb[3, a1]
        r4 = t[4] * Yb[4, a1]
        r5 = t[5] * Yb[5, a1]
        r6 = t[6] * Yb[6, a1]
        r7 = t[7] * Yb[7, a1]
        for c in range(a1):
            y0 = Yb[0, c]
            y1 = Yb[1, c]
            y2 = Yb[2, c]
            y3 = Yb[3, c]
            y4 = Yb[4, c]
            y5 = Yb[5, c]
            y6 = Yb[6, c]
            y7 = Yb[7, c]
            A[a, c] += (
                p0 * y0 + p1 * y1 + p2 * y2 + p3 * y3 + p4 * y4 + p5 * y5 + p6 * y6 + p7 * y7
            )
            A[a1, c] += (
                r0 * y0 + r1 * y1 + r2 * y2 + r3 * y3 + r4 * y4 + r5 * y5 + r6 * y6 + r7 * y7
            )
        A[a1, a1] += (
            r0 * Yb[0, a1] + r1 * Yb[1, a1] + r2 * Yb[2, a1] + r3 * Yb[3, a1]
            + r4 * Yb[4, a1] + r5 * Yb[5, a1] + r6 * Yb[6, a1] + r7 * Yb[7, a1]
        )
        a += 2
    if a < k:  # odd k: the last row
        for q in range(8):
            tq = t[q] * Yb[q, a]
            for c in range(a + 1):
                A[a, c] += tq * Yb[q, c]


@njit(cache=True, fastmath=_FASTMATH)
def _syr_lower(A, y, t, k):
    """A[a, c] += t y[a] y[c] on the lower triangle (c <= a)."""
    for a in range(k):
        ca = t * y[a]
        for c in range(a + 1):
            A[a, c] += ca * y[c]


@njit(cache=True, fastmath=_FASTMATH)
def _cholesky_factor(A, n):
    """Overwrite the lower triangle of A[:n, :n] with its Cholesky factor L (A = L L^T).

    Crout order: every entry is a dot product of two contiguous row prefixes, computed
    four rows at a time so that each load of row j feeds four of them. Returns False when
    A is not numerically positive definite.
    """
    for j in range(n):
        d = A[j, j]
        for p in range(j):
            d -= A[j, p] * A[j, p]
        if not d > 0.0:
            return False
        d = np.sqrt(d)
        A[j, j] = d
        inv = 1.0 / d
        i = j + 1
        while i + 4 <= n:
            t0 = A[i, j]
            t1 = A[i + 1, j]
            t2 = A[i + 2, j]
            t3 = A[i + 3, j]
            for p in range(j):
                ljp = A[j, p]
                t0 -= A[i, p] * ljp
                t1 -= A[i + 1, p] * ljp
                t2 -= A[i + 2, p] * ljp
                t3 -= A[i + 3, p] * ljp
            A[i, j] = t0 * inv
            A[i + 1, j] = t1 * inv
            A[i + 2, j] = t2 * inv
            A[i + 3, j] = t3 * inv
            i += 4
        while i < n:
            t = A[i, j]
            for p in range(j):
                t -= A[i, p] * A[j, p]
            A[i, j] = t * inv
            i += 1
    return True


@njit(cache=True, fastmath=_FASTMATH)
def _cholesky_solve(A, b, x, n):
    """Solve A x = b for symmetric positive definite A[:n, :n] given by its lower triangle.

    A is overwritten with its Cholesky factor; b is left alone. Returns False (and fills
    x with NaN) when A is not numerically positive definite.
    """
    if not _cholesky_factor(A, n):
        for i in range(n):
            x[i] = np.nan
        return False
    # L y = b
    for i in range(n):
        t = b[i]
        for p in range(i):
            t -= A[i, p] * x[p]
        x[i] = t / A[i, i]
    # L^T x = y, column-oriented so the inner loop runs along a row of L
    for i in range(n - 1, -1, -1):
        x[i] /= A[i, i]
        xi = x[i]
        for p in range(i):
            x[p] -= A[i, p] * xi
    return True


@njit(cache=True, fastmath=_FASTMATH)
def _add_term(A, b, Y, j, s, w, Yb, tb, nb, k):
    """Add ``w y_j`` to b and buffer ``s y_j y_j^T`` for A (s != 0), with ``nb`` terms
    buffered in ``Yb``/``tb``; the buffer goes into A eight at a time (a rank-8 update).
    Returns the new ``nb``; :func:`_flush_terms` adds what is left."""
    for a in range(k):
        v = np.float64(Y[j, a])
        b[a] += w * v
        Yb[nb, a] = v
    if s == 0.0:
        return nb
    tb[nb] = s
    nb += 1
    if nb == 8:
        _syr8_lower(A, Yb, tb, k)
        nb = 0
    return nb


@njit(cache=True, fastmath=_FASTMATH)
def _flush_terms(A, Yb, tb, nb, k):
    """Add the ``nb`` terms :func:`_add_term` left buffered."""
    for q in range(nb):
        _syr_lower(A, Yb[q], tb[q], k)


@njit(cache=True, fastmath=_FASTMATH)
def _solve_row_cholesky(lo, hi, indices, conf, Y, G, A, b, x, Yb, tb, k):
    """Exact solve for one row by accumulating A = G + sum s y y^T. Returns #unknown.

    Entries with s != 0 are buffered eight at a time (``Yb``, ``tb``) for rank-8 updates.
    """
    n_items = Y.shape[0]
    for a in range(k):
        b[a] = 0.0
        for c in range(a + 1):
            A[a, c] = G[a, c]
    unknown = 0
    nb = 0
    for e in range(lo, hi):
        j = indices[e]
        if j < 0 or j >= n_items:
            unknown += 1
            continue
        s = np.float64(conf[e])
        nb = _add_term(A, b, Y, j, s, 1.0 + s, Yb, tb, nb, k)
    _flush_terms(A, Yb, tb, nb, k)
    if unknown == hi - lo:
        for a in range(k):
            x[a] = 0.0
    else:
        _cholesky_solve(A, b, x, k)
    return unknown


@njit(cache=True, fastmath=_FASTMATH)
def _solve_row_woodbury(lo, hi, indices, conf, Z, Linv, V, sv, M, c, rhs, w, x, k):
    """Exact solve for one short row through the Woodbury identity. Returns #unknown.

    Works in whitened coordinates: with G = L L^T, Linv = L^-1 and z_j = Linv y_j (rows of
    ``Z``), ``A = L (I + V S V^T) L^T`` where V holds the z_j of the entries with s > 0 and
    S = diag(s). With c = Linv b = sum (1 + s_j) z_j::

        x = Linv^T (c - V (S^-1 + V^T V)^-1 V^T c)

    which costs O(n^2 k + n^3 + k^2): no k x k factorisation and no k^2 work per entry.
    Entries with s == 0 only add to c.
    """
    n_items = Z.shape[0]
    unknown = 0
    nu = 0
    for a in range(k):
        c[a] = 0.0
    for e in range(lo, hi):
        j = indices[e]
        if j < 0 or j >= n_items:
            unknown += 1
            continue
        s = np.float64(conf[e])
        wt = 1.0 + s
        if s == 0.0:
            for a in range(k):
                c[a] += wt * Z[j, a]
            continue
        for a in range(k):
            za = np.float64(Z[j, a])
            V[nu, a] = za
            c[a] += wt * za
        sv[nu] = s
        nu += 1
    if unknown == hi - lo:
        for a in range(k):
            x[a] = 0.0
        return unknown
    if nu > 0:
        # M = S^-1 + V^T V (lower triangle), rhs = V^T c
        for q in range(nu):
            r = 0
            while r + 4 <= q + 1:  # four dot products per pass over V[q]
                t0 = 0.0
                t1 = 0.0
                t2 = 0.0
                t3 = 0.0
                for a in range(k):
                    vqa = V[q, a]
                    t0 += vqa * V[r, a]
                    t1 += vqa * V[r + 1, a]
                    t2 += vqa * V[r + 2, a]
                    t3 += vqa * V[r + 3, a]
                M[q, r] = t0
                M[q, r + 1] = t1
                M[q, r + 2] = t2
                M[q, r + 3] = t3
                r += 4
            while r <= q:
                t = 0.0
                for a in range(k):
                    t += V[q, a] * V[r, a]
                M[q, r] = t
                r += 1
            M[q, q] += 1.0 / sv[q]
            t = 0.0
            for a in range(k):
                t += V[q, a] * c[a]
            rhs[q] = t
        if not _cholesky_solve(M, rhs, w, nu):
            for a in range(k):
                x[a] = np.nan
            return unknown
        for q in range(nu):
            wq = w[q]
            for a in range(k):
                c[a] -= wq * V[q, a]
    # x = Linv^T c, Linv lower triangular
    for a in range(k):
        x[a] = 0.0
    for b in range(k):
        cb = c[b]
        for a in range(b + 1):
            x[a] += cb * Linv[b, a]
    return unknown


# --------------------------------------------------------------------------------------
# public kernels


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def gram(Y, regularization):
    """Return ``Y^T Y + regularization * I`` as a float64 k x k matrix.

    Parameters
    ----------
    Y : float32[n, k]
    regularization : float

    Returns
    -------
    float64[k, k], symmetric. Bit-identical for any thread count.
    """
    n, k = Y.shape
    n_blocks = (n + _SUM_BLOCK - 1) // _SUM_BLOCK
    partial = np.zeros((max(n_blocks, 1), k, k))
    for blk in prange(n_blocks):
        P = partial[blk]
        Yb = np.empty((8, k))
        ones = np.ones(8)
        lo = blk * _SUM_BLOCK
        hi = min(n, lo + _SUM_BLOCK)
        i = lo
        while i + 8 <= hi:
            for q in range(8):
                for a in range(k):
                    Yb[q, a] = np.float64(Y[i + q, a])
            _syr8_lower(P, Yb, ones, k)
            i += 8
        while i < hi:
            for a in range(k):
                Yb[0, a] = np.float64(Y[i, a])
            _syr_lower(P, Yb[0], 1.0, k)
            i += 1
    G = np.zeros((k, k))
    for blk in range(n_blocks):
        for a in range(k):
            for c in range(a + 1):
                G[a, c] += partial[blk, a, c]
    for a in range(k):
        G[a, a] += regularization
        for c in range(a):
            G[c, a] = G[a, c]
    return G


@njit(cache=True, fastmath=_FASTMATH)
def inverse_cholesky(G):
    """Return ``Linv = L^-1`` for the Cholesky factor ``G = L L^T`` (float64, lower).

    ``G^-1 = Linv^T Linv``. Filled with NaN when ``G`` is not numerically positive
    definite.
    """
    k = G.shape[0]
    L = np.empty((k, k))
    for a in range(k):
        for c in range(a + 1):
            L[a, c] = G[a, c]
    Linv = np.zeros((k, k))
    if not _cholesky_factor(L, k):
        Linv[:, :] = np.nan
        return Linv
    # row i of L Linv = I: Linv[i, c] = (delta_ic - sum_{p<i} L[i, p] Linv[p, c]) / L[i, i]
    for i in range(k):
        inv = 1.0 / L[i, i]
        for p in range(i):
            t = L[i, p]
            for c in range(p + 1):
                Linv[i, c] -= t * Linv[p, c]
        for c in range(i):
            Linv[i, c] *= inv
        Linv[i, i] = inv
    return Linv


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def whiten(Y, Linv, Z):
    """Write ``Z = Y Linv^T``: the rows of Y in coordinates where ``G`` is the identity.

    Parameters
    ----------
    Y : float32[n, k]
    Linv : float64[k, k], from :func:`inverse_cholesky`
    Z : float32 or float64 [n, k], written
        Computed in float64 and rounded once. float32 is enough for the Woodbury path of
        :func:`solve_rows_exact`: the whitened system is well conditioned, and with float32
        ``Z`` its solutions stay within about 1e-7 (relative) of the Cholesky path's even
        for ``cond(G)`` near 1e7.
    """
    n, k = Y.shape
    n_blocks = (n + _SUM_BLOCK - 1) // _SUM_BLOCK
    for blk in prange(n_blocks):
        y = np.empty(k)
        for j in range(blk * _SUM_BLOCK, min(n, (blk + 1) * _SUM_BLOCK)):
            for a in range(k):
                y[a] = np.float64(Y[j, a])
            for a in range(k):
                t = 0.0
                for b in range(a + 1):
                    t += Linv[a, b] * y[b]
                Z[j, a] = t


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def solve_rows_exact(indptr, indices, conf, Y, G, Z, Linv, out, unknown, woodbury_max):
    """Exact implicit-ALS solve of every row: Woodbury for short rows, Cholesky otherwise.

    Parameters
    ----------
    indptr : int64[m + 1]
    indices : int32[nnz]
        Columns (indices into ``Y``). Entries outside ``[0, n)`` are skipped and counted.
    conf : float32[nnz]
        ``s = alpha * f(r) >= 0``. Repeated indices in a row add up as separate terms.
    Y : float32[n, k]
    G : float64[k, k]
        ``Y^T Y + reg * I`` (from :func:`gram`).
    Z : float32 or float64 [n, k]
        ``Y Linv^T`` (from :func:`whiten`); only read when ``woodbury_max > 0``.
    Linv : float64[k, k]
        Inverse Cholesky factor of ``G`` (from :func:`inverse_cholesky`), so that
        ``G^-1 = Linv^T Linv``; only read when ``woodbury_max > 0``.
    out : float32[m, k]
        Written: ``out[u] = A_u^-1 b_u``; exactly 0 for rows without known entries and
        NaN where a system is not numerically positive definite.
    unknown : int64[m]
        Written: number of skipped entries per row.
    woodbury_max : int
        Rows with at most this many entries are solved through the Woodbury identity
        (see :func:`default_woodbury_max`); 0 forces Cholesky for every row.
    """
    m = out.shape[0]
    k = Y.shape[1]
    wmax = _woodbury_scratch(indptr, m, woodbury_max)
    bounds, order = _row_blocks(indptr, k // 4 + 1, _N_BLOCKS)
    for i_blk in prange(order.shape[0]):
        blk = order[i_blk]
        _solve_row_range(bounds[blk], bounds[blk + 1], indptr, indices, conf, Y, G, Z, Linv,
                         out, unknown, wmax)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def solve_rows_exact_serial(indptr, indices, conf, Y, G, Z, Linv, out, unknown, woodbury_max):
    """:func:`solve_rows_exact` on the calling thread alone.

    For small batches (one user per event in prequential replay, a few users per
    micro-batch): waking a thread pool costs more than the solves, and on a busy machine
    numba's and BLAS's spinning pools starve each other.
    """
    m = out.shape[0]
    wmax = _woodbury_scratch(indptr, m, woodbury_max)
    _solve_row_range(0, m, indptr, indices, conf, Y, G, Z, Linv, out, unknown, wmax)


@njit(cache=True)
def _woodbury_scratch(indptr, m, woodbury_max):
    """Rows of Woodbury scratch needed: sized by the longest row that takes that path."""
    longest = 0
    for u in range(m):
        longest = max(longest, indptr[u + 1] - indptr[u])
    return min(max(woodbury_max, 0), longest)


@njit(cache=True, fastmath=_FASTMATH)
def _solve_row_range(first, last, indptr, indices, conf, Y, G, Z, Linv, out, unknown, wmax):
    """Solve rows ``first:last`` with one set of scratch buffers (one thread's share)."""
    k = Y.shape[1]
    A = np.empty((k, k))
    b = np.empty(k)
    x = np.empty(k)
    Yb = np.empty((8, k))
    tb = np.empty(8)
    V = np.empty((wmax, k))
    M = np.empty((wmax, wmax))
    sv = np.empty(wmax)
    rhs = np.empty(wmax)
    w = np.empty(wmax)
    for u in range(first, last):
        lo = indptr[u]
        hi = indptr[u + 1]
        if hi - lo <= wmax:
            unk = _solve_row_woodbury(lo, hi, indices, conf, Z, Linv, V, sv, M, b, rhs, w, x, k)
        else:
            unk = _solve_row_cholesky(lo, hi, indices, conf, Y, G, A, b, x, Yb, tb, k)
        unknown[u] = unk
        for a in range(k):
            out[u, a] = np.float32(x[a])


@njit(cache=True)
def solve_rows_cholesky(indptr, indices, conf, Y, G, out, unknown):
    """Exact implicit-ALS solve of every row through a k x k Cholesky factorisation.

    Same contract as :func:`solve_rows_exact` with ``woodbury_max = 0``: for every row
    ``out[u] = (G + sum s y y^T)^-1 sum (1 + s) y``, entries with an index outside
    ``[0, n)`` skipped and counted in ``unknown[u]``, rows without known entries exactly 0.
    """
    k = G.shape[0]
    solve_rows_exact(
        indptr, indices, conf, Y, G, np.empty((0, k)), np.empty((k, k)), out, unknown, 0
    )


@njit(cache=True, fastmath=_FASTMATH)
def _symv(G, v, out, k):
    """out = G v for a full k x k matrix, four rows at a time (shared loads of v)."""
    a = 0
    while a + 4 <= k:
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        t3 = 0.0
        for c in range(k):
            vc = v[c]
            t0 += G[a, c] * vc
            t1 += G[a + 1, c] * vc
            t2 += G[a + 2, c] * vc
            t3 += G[a + 3, c] * vc
        out[a] = t0
        out[a + 1] = t1
        out[a + 2] = t2
        out[a + 3] = t3
        a += 4
    while a < k:
        t = 0.0
        for c in range(k):
            t += G[a, c] * v[c]
        out[a] = t
        a += 1


@njit(cache=True, fastmath=_FASTMATH)
def _add_item_terms(Y, jv, sv, nv, v, out, k, residual):
    """out += sum_q w_q y_q over the row's known entries (item jv[q], confidence sv[q]).

    ``w_q = s_q (y_q . v)`` (the matrix-free ``A v`` terms), or with ``residual``
    ``w_q = (1 + s_q) - s_q (y_q . v)`` (the ``b - A v`` terms). Four entries at a time:
    four independent dot products, then one pass over ``out``.
    """
    q = 0
    while q + 4 <= nv:
        j0 = jv[q]
        j1 = jv[q + 1]
        j2 = jv[q + 2]
        j3 = jv[q + 3]
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        d3 = 0.0
        for a in range(k):
            va = v[a]
            d0 += np.float64(Y[j0, a]) * va
            d1 += np.float64(Y[j1, a]) * va
            d2 += np.float64(Y[j2, a]) * va
            d3 += np.float64(Y[j3, a]) * va
        w0 = sv[q] * d0
        w1 = sv[q + 1] * d1
        w2 = sv[q + 2] * d2
        w3 = sv[q + 3] * d3
        if residual:
            w0 = 1.0 + sv[q] - w0
            w1 = 1.0 + sv[q + 1] - w1
            w2 = 1.0 + sv[q + 2] - w2
            w3 = 1.0 + sv[q + 3] - w3
        for a in range(k):
            out[a] += (
                w0 * np.float64(Y[j0, a])
                + w1 * np.float64(Y[j1, a])
                + w2 * np.float64(Y[j2, a])
                + w3 * np.float64(Y[j3, a])
            )
        q += 4
    while q < nv:
        j = jv[q]
        d = 0.0
        for a in range(k):
            d += np.float64(Y[j, a]) * v[a]
        w = sv[q] * d
        if residual:
            w = 1.0 + sv[q] - w
        for a in range(k):
            out[a] += w * np.float64(Y[j, a])
        q += 1


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def solve_rows_cg(indptr, indices, conf, Y, G, X, cg_steps):
    """Conjugate-gradient steps on every row's system, warm-started from ``X`` (in/out).

    The same algorithm as implicit's ``_least_squares_cg``, matrix-free
    (``A p = G p + sum s (y . p) y``), carried out in float64. Rows without known entries
    are set to exactly 0; entries with an index outside ``[0, n)`` are skipped. A row whose
    residual norm^2 is below 1e-20 is left as it is (before the first step) or stops.

    Parameters
    ----------
    indptr, indices, conf, Y, G : as in :func:`solve_rows_exact`
    X : float32[m, k]
        Current factors, overwritten with the new ones.
    cg_steps : int
        At most this many CG iterations per row.
    """
    m, k = X.shape
    n_items = Y.shape[0]
    longest = 0
    for u in range(m):
        longest = max(longest, indptr[u + 1] - indptr[u])
    bounds, order = _row_blocks(indptr, k // 16 + 1, _N_BLOCKS)
    for i_blk in prange(order.shape[0]):
        blk = order[i_blk]
        x = np.empty(k)
        r = np.empty(k)
        p = np.empty(k)
        Ap = np.empty(k)
        jv = np.empty(longest, dtype=np.int64)
        sv = np.empty(longest)
        for u in range(bounds[blk], bounds[blk + 1]):
            nv = 0
            for e in range(indptr[u], indptr[u + 1]):
                j = indices[e]
                if j >= 0 and j < n_items:
                    jv[nv] = j
                    sv[nv] = np.float64(conf[e])
                    nv += 1
            if nv == 0:
                for a in range(k):
                    X[u, a] = 0.0
                continue
            for a in range(k):
                x[a] = np.float64(X[u, a])
            # r = b - A x = sum ((1 + s) - s y.x) y - G x
            _symv(G, x, Ap, k)
            for a in range(k):
                r[a] = -Ap[a]
            _add_item_terms(Y, jv, sv, nv, x, r, k, True)
            rsold = 0.0
            for a in range(k):
                p[a] = r[a]
                rsold += r[a] * r[a]
            if rsold < _CG_EPS:
                continue
            for _ in range(cg_steps):
                _symv(G, p, Ap, k)
                _add_item_terms(Y, jv, sv, nv, p, Ap, k, False)
                pAp = 0.0
                for a in range(k):
                    pAp += p[a] * Ap[a]
                step = rsold / pAp
                rsnew = 0.0
                for a in range(k):
                    x[a] += step * p[a]
                    r[a] -= step * Ap[a]
                    rsnew += r[a] * r[a]
                if rsnew < _CG_EPS:
                    break
                beta = rsnew / rsold
                for a in range(k):
                    p[a] = r[a] + beta * p[a]
                rsold = rsnew
            for a in range(k):
                X[u, a] = np.float32(x[a])


@njit(cache=True, fastmath=_FASTMATH)
def _entry_loss(Y, jv, sv, nv, x, k):
    """sum_q [(1 + s_q)(1 - 2 y_q.x) + s_q (y_q.x)^2], four dot products per pass."""
    loss = 0.0
    q = 0
    while q < nv:
        # a short tail repeats the last entry and ignores the repeats
        j0 = jv[q]
        j1 = jv[min(q + 1, nv - 1)]
        j2 = jv[min(q + 2, nv - 1)]
        j3 = jv[min(q + 3, nv - 1)]
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        d3 = 0.0
        for a in range(k):
            xa = x[a]
            d0 += np.float64(Y[j0, a]) * xa
            d1 += np.float64(Y[j1, a]) * xa
            d2 += np.float64(Y[j2, a]) * xa
            d3 += np.float64(Y[j3, a]) * xa
        for t in range(min(4, nv - q)):
            xy = d0 if t == 0 else d1 if t == 1 else d2 if t == 2 else d3
            s = sv[q + t]
            loss += (1.0 + s) * (1.0 - 2.0 * xy) + s * xy * xy
        q += 4
    return loss


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _loss_terms(indptr, indices, conf, X, Y):
    """(sum over entries of c - 2 c x.y + s (x.y)^2, sum of s), in fixed-order blocks."""
    m, k = X.shape
    n_items = Y.shape[0]
    longest = 0
    for u in range(m):
        longest = max(longest, indptr[u + 1] - indptr[u])
    n_blocks = (m + _SUM_BLOCK - 1) // _SUM_BLOCK
    part_loss = np.zeros(max(n_blocks, 1))
    part_conf = np.zeros(max(n_blocks, 1))
    for blk in prange(n_blocks):
        x = np.empty(k)
        jv = np.empty(longest, dtype=np.int64)
        sv = np.empty(longest)
        loss = 0.0
        total_s = 0.0
        for u in range(blk * _SUM_BLOCK, min(m, (blk + 1) * _SUM_BLOCK)):
            nv = 0
            for e in range(indptr[u], indptr[u + 1]):
                j = indices[e]
                if j >= 0 and j < n_items:
                    jv[nv] = j
                    sv[nv] = np.float64(conf[e])
                    total_s += sv[nv]
                    nv += 1
            if nv == 0:
                continue
            for a in range(k):
                x[a] = np.float64(X[u, a])
            loss += _entry_loss(Y, jv, sv, nv, x, k)
        part_loss[blk] = loss
        part_conf[blk] = total_s
    loss = 0.0
    total_s = 0.0
    for blk in range(n_blocks):
        loss += part_loss[blk]
        total_s += part_conf[blk]
    return loss, total_s


@njit(cache=True, fastmath=_FASTMATH)
def loss_from_grams(indptr, indices, conf, X, Y, XtX, YtY, regularization):
    """:func:`weighted_loss` given ``XtX = X^T X`` and ``YtY = Y^T Y`` (float64, no reg).

    ALS has both Gram matrices at hand after an iteration, which leaves only the
    O(nnz k) sum over the stored entries to do.
    """
    k = XtX.shape[0]
    quad = 0.0
    norms = 0.0
    for a in range(k):
        for c in range(k):
            quad += XtX[a, c] * YtY[a, c]
        norms += XtX[a, a] + YtY[a, a]
    entries, total_s = _loss_terms(indptr, indices, conf, X, Y)
    loss = quad + entries + regularization * norms
    return loss / (np.float64(X.shape[0]) * np.float64(Y.shape[0]) + total_s)


@njit(cache=True)
def weighted_loss(indptr, indices, conf, X, Y, regularization):
    """The Hu-Koren-Volinsky objective per unit of confidence, without a dense matrix.

    ``L = sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (||X||^2 + ||Y||^2)`` with
    ``c = 1 + s`` and ``p = 1`` on the stored entries and ``c = 1, p = 0`` elsewhere, is
    computed as ``trace(X^T X Y^T Y) + sum_entries [c - 2 c (x.y) + s (x.y)^2] + reg (...)``
    and divided by the total confidence ``n_rows * n_cols + sum s``, which equals
    implicit's normaliser ``sum c + n_rows * n_cols - nnz`` (so the numbers compare with
    implicit's ``calculate_loss``). Entries with an index outside ``[0, n)`` are ignored;
    repeated entries count as separate observations (the objective that
    :func:`solve_rows_exact` minimises when rows repeat an index).

    Parameters
    ----------
    indptr, indices, conf : rows of X against columns of Y
    X : float32[m, k]
    Y : float32[n, k]
    regularization : float

    Returns
    -------
    float. Bit-identical for any thread count.
    """
    return loss_from_grams(
        indptr, indices, conf, X, Y, gram(X, 0.0), gram(Y, 0.0), regularization
    )


@njit(cache=True)
def _trailing_zeros(x):
    """Index of the lowest set bit of a non-zero uint64."""
    n = 0
    if (x & np.uint64(0xFFFFFFFF)) == 0:
        n += 32
        x >>= np.uint64(32)
    if (x & np.uint64(0xFFFF)) == 0:
        n += 16
        x >>= np.uint64(16)
    if (x & np.uint64(0xFF)) == 0:
        n += 8
        x >>= np.uint64(8)
    if (x & np.uint64(0xF)) == 0:
        n += 4
        x >>= np.uint64(4)
    if (x & np.uint64(0x3)) == 0:
        n += 2
        x >>= np.uint64(2)
    if (x & np.uint64(0x1)) == 0:
        n += 1
    return n


@njit(cache=True, nogil=True)
def sum_rows_by_item(indptr, indices, weights, out_indptr, out_indices, out_weights):
    """Per row, the distinct known items (ascending) and their summed weights.

    Row ``r`` owns events ``indptr[r]:indptr[r+1]``; ``indices < 0`` are unknown items and
    skipped. Fills ``out_indptr`` (m + 1) and the first ``out_indptr[m]`` entries of
    ``out_indices`` / ``out_weights``; returns ``out_indptr[m]``. Sums are float64, added
    in event order: the same value whoever calls it, the streaming consumer or the offline
    fold-in. Per row one pass over its events (a slot per item, in a scratch array as
    long as the largest item index, and a bit per item in a bitmap), then the row's items
    in ascending order read off the bitmap's words it touched, which beats sorting them
    (2.7x for rows of ~300 items); the NumPy reference sorts the whole batch
    (lexsort + ``add.reduceat``).
    """
    m = indptr.shape[0] - 1
    n_items = 0
    for j in range(indptr[m]):
        n_items = max(n_items, indices[j] + 1)
    slot = np.full(n_items, -1, np.int64)  # item -> its position in the row's sums
    bits = np.zeros((n_items + 63) // 64, np.uint64)  # the row's items; cleared as read
    sums = np.empty(indptr[m], np.float64)
    pos = 0
    out_indptr[0] = 0
    for r in range(m):
        lo, hi = indptr[r], indptr[r + 1]
        d = 0
        first_word, last_word = bits.shape[0], -1
        for j in range(lo, hi):
            item = indices[j]
            if item < 0:
                continue
            at = slot[item]
            if at < 0:
                slot[item] = d
                sums[d] = weights[j]
                d += 1
                word = item >> 6
                bits[word] |= np.uint64(1) << np.uint64(item & 63)
                first_word = min(first_word, word)
                last_word = max(last_word, word)
            else:
                sums[at] += weights[j]
        for word in range(first_word, last_word + 1):
            x = bits[word]
            if x == 0:
                continue
            bits[word] = 0
            while x != 0:
                item = (word << 6) + _trailing_zeros(x)
                out_indices[pos] = item
                out_weights[pos] = sums[slot[item]]
                slot[item] = -1
                pos += 1
                x &= x - np.uint64(1)
        out_indptr[r + 1] = pos
    return pos
