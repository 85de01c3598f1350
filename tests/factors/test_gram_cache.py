"""GramCache: cached normal equations updated by differences solve what a rebuild solves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factors import reference
from factors.errors import DataError
from factors.foldin import FoldIn
from factors.gram_cache import GramCache, cholesky_update, packed_size, solve_rows_cached

N_ITEMS, K = 60, 8


def item_factors(seed=0, n=N_ITEMS, k=K):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.3).astype(np.float32)


def csr(rows):
    """[(items, weights), ...] -> (indptr, sorted unique items int32, float32 weights)."""
    indptr = np.zeros(len(rows) + 1, np.int64)
    indptr[1:] = np.cumsum([len(items) for items, _ in rows])
    items, weights = [], []
    for row_items, row_weights in rows:
        order = np.argsort(row_items)
        items.append(np.asarray(row_items, np.int32)[order])
        weights.append(np.asarray(row_weights, np.float32)[order])
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
    return indptr, cat(items, np.int32), cat(weights, np.float32)


def random_row(rng, n_min=10, n_max=40, zero_share=0.2):
    n = int(rng.integers(n_min, n_max + 1))
    items = rng.choice(N_ITEMS, size=n, replace=False)
    weights = rng.exponential(2.0, size=n) * (rng.random(n) > zero_share)
    return items, weights


def relative_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# -- the kernel against its NumPy twin --------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 5))
def test_kernel_update_lands_where_the_reference_rebuild_does(seed, n_rows):
    rng = np.random.default_rng(seed)
    Y = item_factors(seed % 7)
    G = reference.gram(Y, 0.5)
    old = [random_row(rng, 0, 30) for _ in range(n_rows)]
    new = [random_row(rng, 0, 30) for _ in range(n_rows)]
    # Share some items with changed, equal and zero weights: the merge-walk's three cases.
    for r in range(n_rows):
        if len(old[r][0]) and len(new[r][0]):
            keep = old[r][0][: len(old[r][0]) // 2]
            items = np.unique(np.concatenate([keep, new[r][0]]))
            weights = rng.exponential(2.0, size=len(items)) * (rng.random(len(items)) > 0.3)
            weights[: len(weights) // 3] = 0.0
            new[r] = (items, weights)
    o_ptr, o_idx, o_conf = csr(old)
    n_ptr, n_idx, n_conf = csr(new)
    slots = rng.permutation(n_rows + 2)[:n_rows].astype(np.int64)
    rows = rng.permutation(n_rows).astype(np.int64)
    # The slots hold the old rows' systems, in the order of ``rows``.
    R_slab = np.zeros((n_rows + 2, packed_size(K)))
    b_slab = np.zeros((n_rows + 2, K))
    scratch = np.empty((n_rows, K), np.float32)
    reference.solve_rows_cached(np.arange(n_rows), slots[np.argsort(rows)], None, o_ptr, o_idx,
                                o_conf, None, None, None, Y, G, R_slab, b_slab, scratch)
    olds = [old[u] for u in rows]
    ro_ptr, ro_idx, ro_conf = csr(olds)
    out = np.full((n_rows, K), np.nan, np.float32)
    valid = np.zeros(n_rows, bool)
    solve_rows_cached(rows, slots, np.zeros(n_rows, bool), n_ptr, n_idx, n_conf,
                      ro_ptr, ro_idx, ro_conf, Y, G, R_slab, b_slab, out, valid)

    want_R = np.zeros_like(R_slab)
    want_b = np.zeros_like(b_slab)
    want = np.empty((n_rows, K), np.float32)
    reference.solve_rows_cached(rows, slots, None, n_ptr, n_idx, n_conf, None, None, None,
                                Y, G, want_R, want_b, want)
    assert valid.all()
    for s in slots:
        np.testing.assert_allclose(R_slab[s], want_R[s], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(b_slab[s], want_b[s], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), downdate=st.booleans())
def test_rank_one_update_gives_the_factor_of_the_new_matrix(seed, k, downdate):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((3 * k, k))
    x = rng.standard_normal(k) * rng.choice([1e-3, 1.0, 10.0])
    A = M.T @ M + np.eye(k) + (np.outer(x, x) if downdate else 0.0)  # a downdate stays PD
    upper = np.triu_indices(k)
    R = np.linalg.cholesky(A).T[upper]
    assert cholesky_update(R, x.copy(), -1.0 if downdate else 1.0, k)
    new = A - np.outer(x, x) if downdate else A + np.outer(x, x)
    np.testing.assert_allclose(R, np.linalg.cholesky(new).T[upper], rtol=1e-9, atol=1e-9)


def test_a_downdate_to_near_singular_is_refused():
    A = np.diag([1.0, 4.0])
    R = np.linalg.cholesky(A).T[np.triu_indices(2)]
    assert not cholesky_update(R, np.array([1.0 - 1e-9, 0.0]), -1.0, 2)


def test_kernel_rebuild_equals_the_reference():
    rng = np.random.default_rng(3)
    Y = item_factors(1)
    G = reference.gram(Y, 0.2)
    ptr, idx, conf = csr([random_row(rng) for _ in range(4)])
    rows, slots = np.arange(4, dtype=np.int64), np.array([3, 0, 2, 1], np.int64)
    R_slab, b_slab = np.full((4, packed_size(K)), 7.0), np.full((4, K), 7.0)  # garbage: overwritten
    out = np.empty((4, K), np.float32)
    valid = np.zeros(4, bool)
    empty = np.zeros(0, np.int32)
    solve_rows_cached(rows, slots, np.ones(4, bool), ptr, idx, conf, np.zeros(5, np.int64), empty,
                      empty.astype(np.float32), Y, G, R_slab, b_slab, out, valid)
    want_R, want_b, want = np.zeros_like(R_slab), np.zeros_like(b_slab), np.empty_like(out)
    reference.solve_rows_cached(rows, slots, None, ptr, idx, conf, None, None, None, Y, G,
                                want_R, want_b, want)
    assert valid.all()
    np.testing.assert_allclose(R_slab, want_R, rtol=1e-12)
    np.testing.assert_allclose(b_slab, want_b, rtol=1e-12)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# -- GramCache against FoldIn -----------------------------------------------------------------

def solver(seed=0, scaling="identity", woodbury_max=8):
    return FoldIn(item_factors(seed), 0.3, 4.0, scaling=scaling, woodbury_max=woodbury_max)


def test_first_solve_is_the_solvers_bit_for_bit_and_short_rows_are_not_cached():
    rng = np.random.default_rng(0)
    s = solver()
    rows = [random_row(rng, 1, 8) for _ in range(5)] + [random_row(rng, 9, 50) for _ in range(5)]
    ptr, idx, w = csr(rows)
    cache = GramCache(s, 2**20)
    got = cache.solve([f"u{i}" for i in range(10)], ptr, idx, w)
    want, _ = s.solve(ptr, idx, w, serial=True)
    np.testing.assert_array_equal(got, want)
    assert len(cache) == 5 and "u9" in cache and "u0" not in cache


@pytest.mark.parametrize("scaling", ["identity", "log"])
def test_a_long_stream_of_changes_stays_exact_without_refresh(scaling):
    # Rows change as a user's history does: items arrive, repeat (weights grow) and leave
    # (the history cap), zero weights come and go. 300 updates of each entry, no rebuild.
    rng = np.random.default_rng(11)
    s = solver(scaling=scaling)
    cache = GramCache(s, 2**20, refresh_every=10**6)
    users = {f"u{i}": dict(zip(*map(list, random_row(rng, 12, 30)))) for i in range(6)}
    worst = 0.0
    for step in range(300):
        for row in users.values():
            for _ in range(int(rng.integers(1, 4))):
                item = int(rng.integers(N_ITEMS))
                row[item] = row.get(item, 0.0) + float(rng.choice([0.0, 1.0, 3.0]))
            while len(row) > 40 or (len(row) > 12 and rng.random() < 0.3):
                row.pop(next(iter(row)))
        keys = list(users)
        ptr, idx, w = csr([(list(r), list(r.values())) for r in users.values()])
        got = cache.solve(keys, ptr, idx, w)
        want, _ = s.solve(ptr, idx, w, serial=True)
        worst = max(worst, relative_error(got, want))
    assert cache.hits >= 6 * 299
    assert worst < 1e-5, worst


def test_refresh_rebuilds_an_entry_bit_for_bit():
    rng = np.random.default_rng(5)
    s = solver()
    cache = GramCache(s, 2**20, refresh_every=3)
    items, weights = random_row(rng, 20, 20)
    for step in range(1, 7):
        weights = weights + rng.exponential(1.0, size=len(weights))
        ptr, idx, w = csr([(items, weights)])
        got = cache.solve(["u"], ptr, idx, w)
        want, _ = s.solve(ptr, idx, w, serial=True)
        if step in (1, 4):  # first sight, then after refresh_every - 1 updates
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (cache.misses, cache.hits) == (2, 4)


def test_a_refused_downdate_rebuilds_the_entry_bit_for_bit():
    # One item's confidence dwarfs the rest of A: taking it out again would leave R with
    # almost no digits, so the cache rebuilds the row instead of downdating.
    rng = np.random.default_rng(9)
    s = solver()
    cache = GramCache(s, 2**20)
    items, weights = random_row(rng, 20, 20, zero_share=0.0)
    heavy = weights.copy()
    heavy[0] = 1e9
    for step, w in enumerate([weights, heavy, weights]):
        got = cache.solve(["u"], *csr([(items, w)]))
        want, _ = s.solve(*csr([(items, w)]), serial=True)
        if step == 2:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (cache.misses, cache.hits) == (1, 2)


def test_the_thread_pool_solves_what_the_calling_thread_does():
    rng = np.random.default_rng(12)
    s = solver()
    caches = GramCache(s, 2**20), GramCache(s, 2**20)
    rows = [random_row(rng, 1, 40) for _ in range(60)]
    keys = [f"u{i}" for i in range(60)]
    for step in range(3):
        rows = [(items, weights + step * rng.exponential(1.0, size=len(weights))) for items, weights in rows]
        serial = caches[0].solve(keys, *csr(rows), serial=True)
        pooled = caches[1].solve(keys, *csr(rows), serial=False)
        np.testing.assert_array_equal(pooled, serial)
    assert caches[1].hits == caches[0].hits > 0


def test_a_small_slab_evicts_the_least_recent_and_stays_exact():
    rng = np.random.default_rng(8)
    s = solver()
    cache = GramCache(s, 3 * GramCache.slot_bytes(K) - 1)
    assert cache.capacity == 2
    rows = {f"u{i}": random_row(rng, 15, 30) for i in range(5)}
    for step in range(12):
        keys = [f"u{(step + j) % 5}" for j in range(3)]  # three rows: one more than fits
        ptr, idx, w = csr([rows[k] for k in keys])
        got = cache.solve(keys, ptr, idx, w)
        want, _ = s.solve(ptr, idx, w, serial=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert len(cache) == 2
    assert f"u{(11 + 1) % 5}" in cache  # the most recent long rows stay
    for key in ("a", "b", "a", "c"):  # "a" solved again after "b": "b" is the oldest
        cache.solve([key], *csr([rows["u0"]]))
    assert "a" in cache and "c" in cache and "b" not in cache


def test_no_memory_means_the_solver_alone():
    rng = np.random.default_rng(2)
    s = solver()
    cache = GramCache(s, 0)
    ptr, idx, w = csr([random_row(rng) for _ in range(4)])
    np.testing.assert_array_equal(cache.solve(list("abcd"), ptr, idx, w), s.solve(ptr, idx, w)[0])
    assert len(cache) == 0


def test_bad_calls_are_refused():
    rng = np.random.default_rng(4)
    s = solver()
    cache = GramCache(s, 2**20)
    ptr, idx, w = csr([random_row(rng, 20, 20), random_row(rng, 20, 20)])
    with pytest.raises(DataError, match="distinct"):
        cache.solve(["a", "a"], ptr, idx, w)
    with pytest.raises(DataError, match="name each of the 2 rows"):
        cache.solve(["a"], ptr, idx, w)
    bad = idx.copy()
    bad[0] = -1
    with pytest.raises(DataError, match="known items only"):
        cache.solve(["a", "b"], ptr, bad, w)
    with pytest.raises(DataError, match="max_bytes"):
        GramCache(s, -1)
