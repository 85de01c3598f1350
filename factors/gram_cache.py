"""Normal equations of recently folded rows, kept factorised and updated by what changed.

An exact fold-in of a row (a user) with ``n`` distinct items builds ``A = G + sum s y y^T``
in ``n k^2 / 2`` multiply-adds and factorises it in ``k^3 / 6``. In a stream, the same
active users come back batch after batch with one or two new events on top of hundreds of
old ones, so rebuilding and refactorising ``A`` is nearly all of their cost.
:class:`GramCache` keeps the Cholesky factor ``R`` of ``A`` (``A = R^T R``, upper
triangle, packed) and ``b = sum (1 + s) y`` of the rows it solved, with the aggregated row
they were built from, and on the next solve of the same row applies only the difference::

    A += (s_new_j - s_old_j) y_j y_j^T    for each item j whose confidence changed:
                                          a rank-1 update (or downdate) of R, O(k^2)
    b += (p_new_j (1 + s_new_j) - p_old_j (1 + s_old_j)) y_j      (p: item in the row)

then solves with ``R`` in O(k^2): a row with a few changes costs a few ``k^2`` instead of
``n k^2 / 2 + k^3 / 6``. Updates are applied before downdates, and a downdate that would
leave a diagonal entry of ``R`` near zero falls back to a rebuild, so the factor stays that
of ``A`` up to float64 rounding (far below the float32 the vectors are stored in); every
``refresh_every`` updates an entry is rebuilt from its row anyway, which bounds the rounding
and keeps each entry's error independent of its age. An entry is self-contained: it holds
the row its ``R`` and ``b`` were built from, so it stays exact whatever happened to the
row in between (another process folded it, the caller dropped a batch).

Only rows longer than the solver's Woodbury cutoff are cached (shorter ones are solved
without any k x k matrix and cost less than a cache update). A row's weights must not all
change between solves (time decay re-weights every event at each new one), or the update
costs more than a rebuild: callers leave the cache out then.

NumPy reference of the kernel: :func:`factors.reference.solve_rows_cached` (and
:func:`numpy.linalg.cholesky` for :func:`cholesky_update`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np
from numba import get_num_threads, njit, prange

from factors.errors import DataError
from factors.foldin import FoldIn
from factors.kernels import (
    _FASTMATH,
    _add_term,
    _cholesky_solve,
    _flush_terms,
    solve_rows_exact,
    solve_rows_exact_serial,
)
from factors.rows import row_entries

__all__ = ["GramCache", "cholesky_update", "packed_size", "solve_rows_cached", "solve_rows_cached_parallel"]

REFRESH_EVERY = 64  # updates of an entry before it is rebuilt from its row
# Calls with more rows than this are solved on numba's thread pool; smaller ones (a live
# micro-batch) on the calling thread, where waking the pool costs more than it saves and
# its spinning threads would take the CPU the Kafka clients and the broker need.
SERIAL_MAX_ROWS = 1024
# A downdate may not shrink a diagonal entry of R below this share of its square: nearer to
# singular, the downdated factor would have lost too many digits, and the row is rebuilt.
DOWNDATE_FLOOR = 1e-6


def packed_size(k: int) -> int:
    """Entries of a packed k x k triangle."""
    return k * (k + 1) // 2


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _packed_row(i, k):
    """Offset of row ``i`` of a packed upper triangle (row-major, ``k - i`` entries)."""
    return i * (2 * k - i + 1) // 2


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pack_factor(L, R, k):
    """``R``, the packed upper triangle, takes ``L^T`` (``L`` lower, as :func:`_cholesky_solve`
    leaves it)."""
    p = 0
    for i in range(k):
        for j in range(i, k):
            R[p] = L[j, i]
            p += 1


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def cholesky_update(R, x, sign, k):
    """Replace the packed factor ``R`` of ``A = R^T R`` with that of ``A + sign x x^T``.

    ``sign`` is 1.0 (an update) or -1.0 (a downdate); ``x`` (float64[k]) is overwritten.
    O(k^2), one Givens (update) or hyperbolic (downdate) rotation per row. Returns False,
    with ``R`` left part-updated, when a downdate would take a diagonal entry below
    ``DOWNDATE_FLOOR`` of its square (the matrix is then too close to singular to trust the
    downdated factor; the caller rebuilds it). NumPy reference: the factor of the new
    matrix, :func:`numpy.linalg.cholesky` (tests).
    """
    p = 0
    for i in range(k):
        rii = R[p]
        xi = x[i]
        r2 = rii * rii + sign * xi * xi
        if not r2 > DOWNDATE_FLOOR * rii * rii:
            return False
        r = np.sqrt(r2)
        c = r / rii
        s = xi / rii
        inv_c = 1.0 / c
        R[p] = r
        # Slices, not offsets into R and x: the loop then vectorises (twice as fast).
        n = k - i - 1
        row = R[p + 1:p + 1 + n]
        rest = x[i + 1:i + 1 + n]
        t = sign * s * inv_c
        for j in range(n):
            rij = row[j] * inv_c + t * rest[j]
            row[j] = rij
            rest[j] = c * rest[j] - s * rij
        p += k - i
    return True


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _packed_solve(R, b, x, k):
    """Solve ``R^T R x = b`` for the packed upper factor ``R``; both sweeps run along rows."""
    for i in range(k):
        x[i] = b[i]
    # R^T z = b, column-oriented: row i of R is column i of R^T
    p = 0
    for i in range(k):
        zi = x[i] / R[p]
        x[i] = zi
        n = k - i - 1
        row = R[p + 1:p + 1 + n]
        rest = x[i + 1:i + 1 + n]
        for j in range(n):
            rest[j] -= row[j] * zi
        p += k - i
    # R x = z
    for i in range(k - 1, -1, -1):
        p = _packed_row(i, k)
        n = k - i - 1
        row = R[p + 1:p + 1 + n]
        rest = x[i + 1:i + 1 + n]
        t = 0.0
        for j in range(n):
            t += row[j] * rest[j]
        x[i] = (x[i] - t) / R[p]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _rebuild(lo, hi, indices, conf, Y, G, A, bs, b, x, R, Yb, tb, k):
    """Build the system of events ``lo:hi`` (``A = G + sum s y y^T`` in ``A``'s lower
    triangle, ``b`` in ``bs``) in the order :func:`factors.kernels.solve_rows_exact` uses,
    solve it into ``x`` and pack its factor into ``R``. False when not positive definite."""
    for a in range(k):
        bs[a] = 0.0
        for c in range(a + 1):
            A[a, c] = G[a, c]
    nb = 0
    for e in range(lo, hi):
        s = np.float64(conf[e])
        nb = _add_term(A, bs, Y, indices[e], s, 1.0 + s, Yb, tb, nb, k)
    _flush_terms(A, Yb, tb, nb, k)
    for a in range(k):
        b[a] = bs[a]
    if not _cholesky_solve(A, b, x, k):
        return False
    _pack_factor(A, R, k)
    return True


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def solve_rows_cached(rows, slots, rebuild, indptr, indices, conf, old_ptr, old_indices, old_conf,
                      Y, G, R_slab, b_slab, out, valid):
    """Bring cached factorised normal equations up to date with their rows and solve them.

    Parameters
    ----------
    rows : int64[q]
        Rows of the CSR ``(indptr, indices, conf)`` to solve (and of ``out``).
    slots : int64[q]
        Cache slot of each: ``R_slab[slot]`` (the packed upper Cholesky factor of ``A``,
        row-major) and ``b_slab[slot]``.
    rebuild : bool[q]
        True: build the slot from the row (``A = G + sum s y y^T``, ``b = sum (1 + s) y``)
        in the order :func:`factors.kernels.solve_rows_exact` uses, so the vector is that
        kernel's bit for bit. False: the slot holds the system of the old row
        ``old_ptr[r]:old_ptr[r+1]`` of ``(old_indices, old_conf)``; apply the difference
        (falling back to a rebuild where a downdate fails).
    indptr : int64[m + 1]; indices : int32 (sorted, unique and valid within a row); conf : float32
    old_ptr : int64[q + 1]; old_indices : int32 (sorted, unique); old_conf : float32
    Y : float32[n, k]; G : float64[k, k]
    R_slab : float64[slots, k (k + 1) / 2]; b_slab : float64[slots, k]
        Updated in place.
    out : float32[m, k]
        Written at ``rows``; NaN where a system is not numerically positive definite.
    valid : bool[q]
        Set: whether the slot now holds the row's system (False: not positive definite).
    """
    _solve_cached_range(0, rows.shape[0], rows, slots, rebuild, indptr, indices, conf, old_ptr,
                        old_indices, old_conf, Y, G, R_slab, b_slab, out, valid)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def solve_rows_cached_parallel(rows, slots, rebuild, indptr, indices, conf, old_ptr, old_indices,
                               old_conf, Y, G, R_slab, b_slab, out, valid, n_blocks):
    """:func:`solve_rows_cached` on numba's thread pool, ``rows`` cut into ``n_blocks``
    blocks (same results)."""
    q = rows.shape[0]
    n_blocks = max(min(q, n_blocks), 1)
    for blk in prange(n_blocks):
        _solve_cached_range(blk * q // n_blocks, (blk + 1) * q // n_blocks, rows, slots, rebuild,
                            indptr, indices, conf, old_ptr, old_indices, old_conf, Y, G, R_slab,
                            b_slab, out, valid)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _solve_cached_range(first, last, rows, slots, rebuild, indptr, indices, conf, old_ptr,
                        old_indices, old_conf, Y, G, R_slab, b_slab, out, valid):
    """:func:`solve_rows_cached` of ``rows[first:last]``, with one set of scratch buffers."""
    k = Y.shape[1]
    A = np.empty((k, k))
    b = np.empty(k)
    x = np.empty(k)
    v = np.empty(k)
    Yb = np.empty((8, k))
    tb = np.empty(8)
    longest = 0
    for r in range(first, last):
        u = rows[r]
        longest = max(longest, indptr[u + 1] - indptr[u] + old_ptr[r + 1] - old_ptr[r])
    term_j = np.empty(longest, np.int64)
    term_s = np.empty(longest)
    for r in range(first, last):
        u = rows[r]
        R = R_slab[slots[r]]
        bs = b_slab[slots[r]]
        fresh = rebuild[r]
        if not fresh:
            # Merge-walk the old and the new row (both sorted by item): every item whose
            # confidence changed, appeared or went contributes its difference.
            nt = 0
            e, f = indptr[u], old_ptr[r]
            e_end, f_end = indptr[u + 1], old_ptr[r + 1]
            while e < e_end or f < f_end:
                if f >= f_end or (e < e_end and indices[e] < old_indices[f]):
                    j = indices[e]
                    ds = np.float64(conf[e])
                    dw = 1.0 + ds
                    e += 1
                elif e >= e_end or old_indices[f] < indices[e]:
                    j = old_indices[f]
                    ds = -np.float64(old_conf[f])
                    dw = ds - 1.0
                    f += 1
                else:
                    j = indices[e]
                    ds = np.float64(conf[e]) - np.float64(old_conf[f])
                    dw = ds
                    e += 1
                    f += 1
                if dw != 0.0:
                    for a in range(k):
                        bs[a] += dw * np.float64(Y[j, a])
                if ds != 0.0:
                    term_j[nt] = j
                    term_s[nt] = ds
                    nt += 1
            # Updates first (sign 1), then downdates: a downdate starts from the larger
            # matrix. Any refusal rebuilds the row.
            for sign in (1.0, -1.0):
                for t in range(nt):
                    if term_s[t] * sign > 0.0 and not fresh:
                        root = np.sqrt(term_s[t] * sign)
                        for a in range(k):
                            v[a] = root * np.float64(Y[term_j[t], a])
                        fresh = not cholesky_update(R, v, sign, k)
            if not fresh:
                _packed_solve(R, bs, x, k)
                valid[r] = True
        if fresh:
            valid[r] = _rebuild(indptr[u], indptr[u + 1], indices, conf, Y, G, A, bs, b, x, R,
                                Yb, tb, k)
        for a in range(k):
            out[u, a] = np.float32(x[a])


class GramCache:
    """Exact fold-in of rows identified by keys, keeping the normal equations of long rows.

    :meth:`solve` gives what :meth:`FoldIn.solve` gives for the same aggregated rows (up to
    float64 rounding for rows served from the cache, bit for bit otherwise); rows with more
    than ``solver.woodbury_max`` entries keep the Cholesky factor of ``A`` and ``b``
    (:meth:`slot_bytes`, about ``4 k^2`` bytes) in a fixed slab of at most ``max_bytes``,
    least recently solved out first.

    Parameters
    ----------
    solver : FoldIn
        The model to fold against; one cache per model (the entries hold its ``G`` and ``Y``).
    max_bytes : int
        Memory for the slab; the entries' rows come on top (8 bytes per entry). 0 disables
        the cache (every row goes to the solver).
    refresh_every : int
        Updates of an entry before it is rebuilt from its row.
    """

    def __init__(self, solver: FoldIn, max_bytes: int, refresh_every: int = REFRESH_EVERY) -> None:
        if max_bytes < 0:
            raise DataError(f"max_bytes must be >= 0, got {max_bytes}")
        if refresh_every < 1:
            raise DataError(f"refresh_every must be >= 1, got {refresh_every}")
        self.solver = solver
        self.refresh_every = int(refresh_every)
        k = solver.factors
        self.capacity = int(max_bytes) // self.slot_bytes(k)
        # np.empty: pages are only touched (and counted in RSS) as slots fill.
        self._R = np.empty((self.capacity, packed_size(k)))
        self._b = np.empty((self.capacity, k))
        # key -> slot, least recently solved first; per slot: (row items, row conf, updates)
        self._slots: OrderedDict[Hashable, int] = OrderedDict()
        self._rows: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))
        self.hits = self.misses = 0

    @staticmethod
    def slot_bytes(k: int) -> int:
        """Memory of one entry's system for ``k`` factors: the packed factor and ``b``."""
        return 8 * (packed_size(k) + k)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def solve(self, keys: Sequence[Hashable], indptr, indices, weights, *,
              serial: bool | None = None) -> np.ndarray:
        """Vectors of aggregated rows (as :meth:`FoldIn.solve`: sorted, unique, known items).

        ``keys[r]`` names row ``r`` (a user id) across calls; keys must be distinct.
        ``serial``: solve on the calling thread (True) or numba's thread pool (False); by
        default the pool takes calls of more than ``SERIAL_MAX_ROWS`` rows. Same results.
        Returns float32 [m, k].
        """
        solver = self.solver
        indptr, indices, conf = solver._check_batch(indptr, indices, weights)
        m = indptr.shape[0] - 1
        if len(keys) != m:
            raise DataError(f"keys must name each of the {m} rows, got {len(keys)}")
        if indices.size and (indices.min() < 0 or indices.max() >= solver.n_items):
            raise DataError("rows must hold known items only (aggregate them first)")
        out = np.empty((m, solver.factors), dtype=np.float32)
        lengths = np.diff(indptr)
        cached = np.flatnonzero(lengths > solver.woodbury_max) if self.capacity else np.zeros(0, np.int64)
        cached = cached[:self.capacity]  # a slot used twice in one call would mix two rows
        if len(cached) and len(set(keys[r] for r in cached.tolist())) < len(cached):
            raise DataError("keys must be distinct")
        if serial is None:
            serial = m <= SERIAL_MAX_ROWS
        direct = np.ones(m, dtype=bool)
        direct[cached] = False
        if direct.any():
            self._solve_direct(np.flatnonzero(direct), indptr, indices, conf, out, serial)
        if len(cached):
            self._solve_cached(keys, cached, indptr, indices, conf, out, serial)
        return out

    def _solve_direct(self, rows, indptr, indices, conf, out, serial) -> None:
        sub_ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(np.diff(indptr)[rows], out=sub_ptr[1:])
        take = row_entries(indptr, rows)
        sub_out = np.empty((len(rows), self.solver.factors), dtype=np.float32)
        unknown = np.empty(len(rows), dtype=np.int64)
        s = self.solver
        kernel = solve_rows_exact_serial if serial else solve_rows_exact
        kernel(sub_ptr, indices[take], conf[take], s.Y, s.G, s.Z, s.Linv, sub_out, unknown,
               s.woodbury_max)
        out[rows] = sub_out

    def _solve_cached(self, keys, rows, indptr, indices, conf, out, serial) -> None:
        # Python lists, not NumPy item assignment: this loop runs once per cached row.
        slots, rebuild, updates, old_items, old_conf = [], [], [], [], []
        entries, row_of, free, refresh = self._slots, self._rows, self._free, self.refresh_every
        rows_l = rows.tolist()
        for u in rows_l:
            key = keys[u]
            slot = entries.get(key)
            if slot is None:
                slot = entries[key] = free.pop() if free else self._evict()
                old = None
            else:
                entries.move_to_end(key)
                old = row_of[slot]
            if old is not None and old[2] + 1 < refresh:
                old_items.append(old[0])
                old_conf.append(old[1])
                rebuild.append(False)
                updates.append(old[2] + 1)
            else:
                rebuild.append(True)
                updates.append(0)
            slots.append(slot)
        q = len(rows_l)
        self.misses += q - len(old_items)
        self.hits += len(old_items)
        rebuild_a = np.array(rebuild, dtype=bool)
        old_len = np.zeros(q, np.int64)
        old_len[~rebuild_a] = [len(items) for items in old_items]
        old_ptr = np.zeros(q + 1, np.int64)
        np.cumsum(old_len, out=old_ptr[1:])
        s = self.solver
        valid = np.zeros(q, dtype=bool)
        args = (rows.astype(np.int64), np.array(slots, np.int64), rebuild_a, indptr, indices, conf,
                old_ptr, np.concatenate(old_items) if old_items else np.zeros(0, np.int32),
                np.concatenate(old_conf) if old_conf else np.zeros(0, np.float32),
                s.Y, s.G, self._R, self._b, out, valid)
        if serial:
            solve_rows_cached(*args)
        else:
            solve_rows_cached_parallel(*args, 4 * get_num_threads())
        # Each slot now holds the system of its new row: record that row beside it (a slot
        # whose system was not positive definite holds no factor: rebuilt next time).
        bounds = indptr.tolist()
        for u, slot, n, ok in zip(rows_l, slots, updates, valid.tolist()):
            lo, hi = bounds[u], bounds[u + 1]
            row_of[slot] = (indices[lo:hi].copy(), conf[lo:hi].copy(), n) if ok else None

    def _evict(self) -> int:
        _, slot = self._slots.popitem(last=False)
        self._rows[slot] = None
        return slot
