"""The numba kernels against their NumPy twins, and the properties both must have."""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
import pytest

from factors import kernels, reference

IMPLS = pytest.mark.parametrize("impl", [kernels, reference], ids=["kernels", "reference"])


@contextmanager
def threads(n: int):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def assert_vectors_close(actual, expected, rtol=1e-5):
    """Close relative to the largest entry (float32 outputs of float64 solves)."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def exact(impl, p, G=None, woodbury_max=None):
    """Run impl.solve_rows_exact on a RowProblem; returns (out, unknown)."""
    G = kernels.gram(p.Y, p.regularization) if G is None else G
    Linv = kernels.inverse_cholesky(G)
    Z = np.empty(p.Y.shape, np.float32)
    kernels.whiten(p.Y, Linv, Z)
    out = np.full((p.m, p.k), 7.0, dtype=np.float32)
    unknown = np.full(p.m, -1, dtype=np.int64)
    wmax = kernels.default_woodbury_max(p.k) if woodbury_max is None else woodbury_max
    impl.solve_rows_exact(*p.args(), p.Y, G, Z, Linv, out, unknown, wmax)
    return out, unknown


def cholesky(impl, p, G=None):
    G = kernels.gram(p.Y, p.regularization) if G is None else G
    out = np.full((p.m, p.k), 7.0, dtype=np.float32)
    unknown = np.full(p.m, -1, dtype=np.int64)
    impl.solve_rows_cholesky(*p.args(), p.Y, G, out, unknown)
    return out, unknown


# ----------------------------------------------------------------------------- dense helpers


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (2500, 16)])
def test_gram_matches_reference(n, k):
    Y = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    G = kernels.gram(Y, 0.25)
    assert G.dtype == np.float64 and G.shape == (k, k)
    np.testing.assert_allclose(G, reference.gram(Y, 0.25), rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(G, G.T)


def test_gram_of_no_rows_is_the_regularization():
    np.testing.assert_array_equal(kernels.gram(np.zeros((0, 3), np.float32), 0.5), 0.5 * np.eye(3))


def test_gram_and_loss_do_not_depend_on_the_thread_count(make_rows):
    p = make_rows(m=2300, n_items=2100, k=8)
    X = p.X0
    with threads(1):
        g1 = kernels.gram(p.Y, 0.1)
        l1 = kernels.weighted_loss(*p.args(), X, p.Y, 0.1)
    with threads(2):
        g2 = kernels.gram(p.Y, 0.1)
        l2 = kernels.weighted_loss(*p.args(), X, p.Y, 0.1)
    np.testing.assert_array_equal(g1, g2)
    assert l1 == l2


def test_inverse_cholesky_matches_reference(make_rows):
    p = make_rows(k=12)
    G = kernels.gram(p.Y, 0.01)
    Linv = kernels.inverse_cholesky(G)
    np.testing.assert_allclose(Linv, reference.inverse_cholesky(G), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.triu(Linv, 1), 0.0)
    np.testing.assert_allclose(Linv.T @ Linv, np.linalg.inv(G), rtol=1e-9, atol=1e-12)


def test_inverse_cholesky_of_an_indefinite_matrix_is_nan():
    G = np.array([[1.0, 2.0], [2.0, 1.0]])
    assert np.isnan(kernels.inverse_cholesky(G)).all()
    assert np.isnan(reference.inverse_cholesky(G)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_whiten_matches_reference(make_rows, dtype):
    p = make_rows(n_items=1500, k=10)
    Linv = kernels.inverse_cholesky(kernels.gram(p.Y, 0.1))
    Z, Z_ref = np.empty(p.Y.shape, dtype), np.empty(p.Y.shape, dtype)
    kernels.whiten(p.Y, Linv, Z)
    reference.whiten(p.Y, Linv, Z_ref)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(Z, Z_ref, rtol=tol, atol=tol)
    identity = Z.astype(np.float64).T @ Z  # whitened: Z^T Z + reg Linv Linv^T = I
    np.testing.assert_allclose(identity + 0.1 * Linv @ Linv.T, np.eye(p.k), atol=100 * tol)


# ----------------------------------------------------------------------------- exact solves


@pytest.mark.parametrize("k", [1, 8, 33])
def test_cholesky_kernel_matches_reference(make_rows, k):
    p = make_rows(k=k, seed=k)
    out, unknown = cholesky(kernels, p)
    ref_out, ref_unknown = cholesky(reference, p)
    assert_vectors_close(out, ref_out)
    np.testing.assert_array_equal(unknown, ref_unknown)


@pytest.mark.parametrize("woodbury_max", [0, 1, 3, None, 10**6])
def test_exact_kernel_matches_reference(make_rows, woodbury_max):
    p = make_rows(k=8, seed=3)
    out, unknown = exact(kernels, p, woodbury_max=woodbury_max)
    ref_out, ref_unknown = exact(reference, p, woodbury_max=woodbury_max)
    assert_vectors_close(out, ref_out)
    np.testing.assert_array_equal(unknown, ref_unknown)


@pytest.mark.parametrize("k, regularization", [(8, 0.1), (32, 0.05), (24, 1e-4)])
def test_woodbury_and_cholesky_paths_agree(make_rows, k, regularization):
    p = make_rows(m=60, n_items=80, k=k, seed=k, regularization=regularization, max_conf=200.0)
    if regularization < 1e-3:  # strongly correlated item factors: an ill-conditioned G
        p.Y[:, 1] = p.Y[:, 0] + np.float32(1e-2) * p.Y[:, 1]
    via_cholesky, u1 = exact(kernels, p, woodbury_max=0)
    via_woodbury, u2 = exact(kernels, p, woodbury_max=10**6)
    assert_vectors_close(via_woodbury, via_cholesky, rtol=2e-5)
    np.testing.assert_array_equal(u1, u2)


def test_solve_rows_cholesky_is_exact_with_woodbury_off(make_rows):
    p = make_rows()
    out, _ = cholesky(kernels, p)
    np.testing.assert_array_equal(out, exact(kernels, p, woodbury_max=0)[0])


@IMPLS
@pytest.mark.parametrize("woodbury_max", [0, None])
def test_edge_rows(make_rows, impl, woodbury_max):
    p = make_rows()
    G = reference.gram(p.Y, p.regularization)
    out, unknown = exact(impl, p, G=G, woodbury_max=woodbury_max)
    # row 0 empty, row 4 only unknown items: exactly zero
    assert (out[0] == 0).all() and (out[4] == 0).all()
    np.testing.assert_array_equal(unknown[:7], [0, 0, 0, 3, 2, 0, 0])
    # row 1, a single interaction: Sherman-Morrison in closed form
    j, s = p.indices[p.indptr[1]], float(p.conf[p.indptr[1]])
    y = p.Y[j].astype(np.float64)
    Gy = np.linalg.solve(G, y)
    assert_vectors_close(out[1], (1 + s) * Gy / (1 + s * y @ Gy))
    # row 2 repeats item 3 three times: each repetition is its own term
    e = slice(p.indptr[2], p.indptr[3])
    A, b = G.copy(), np.zeros(p.k)
    for jj, ss in zip(p.indices[e], p.conf[e].astype(np.float64)):
        yy = p.Y[jj].astype(np.float64)
        A += ss * np.outer(yy, yy)
        b += (1 + ss) * yy
    assert_vectors_close(out[2], np.linalg.solve(A, b))
    # row 3 equals the same row without its unknown entries
    only_known = make_rows()
    only_known.indptr = np.array([0, 1], dtype=np.int64)
    only_known.indices = np.array([5], dtype=np.int32)
    only_known.conf = p.conf[p.indptr[3] + 2 : p.indptr[3] + 3].copy()
    assert_vectors_close(out[3], exact(impl, only_known, G=G, woodbury_max=woodbury_max)[0][0])
    # row 5: entries with s == 0 add y to b and nothing to A
    e = slice(p.indptr[5], p.indptr[6])
    A, b = G.copy(), np.zeros(p.k)
    for jj, ss in zip(p.indices[e], p.conf[e].astype(np.float64)):
        yy = p.Y[jj].astype(np.float64)
        A += ss * np.outer(yy, yy)
        b += (1 + ss) * yy
    assert p.conf[e][:2].tolist() == [0.0, 0.0]
    assert_vectors_close(out[5], np.linalg.solve(A, b))
    # row 7, only s == 0: x = G^-1 (y_8 + y_12)
    assert_vectors_close(out[7], np.linalg.solve(G, p.Y[8].astype(np.float64) + p.Y[12]))


def test_singular_systems_give_nan_and_empty_rows_zero(make_rows):
    p = make_rows(k=8)
    G = np.zeros((p.k, p.k))  # no regularization, no item factors: A is rank-deficient
    out, _ = cholesky(kernels, p, G=G)
    assert (out[0] == 0).all() and (out[4] == 0).all()
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()


# ----------------------------------------------------------------------------- CG


@pytest.mark.parametrize("cg_steps", [1, 3])
def test_cg_kernel_matches_reference(make_rows, cg_steps):
    p = make_rows(k=8, seed=5)
    G = kernels.gram(p.Y, p.regularization)
    X, X_ref = p.X0.copy(), p.X0.copy()
    kernels.solve_rows_cg(*p.args(), p.Y, G, X, cg_steps)
    reference.solve_rows_cg(*p.args(), p.Y, G, X_ref, cg_steps)
    assert_vectors_close(X, X_ref, rtol=1e-5)
    assert not np.array_equal(X, p.X0)


@IMPLS
def test_cg_converges_to_the_exact_solution(make_rows, impl):
    p = make_rows(k=8, seed=6)
    G = kernels.gram(p.Y, p.regularization)
    X = p.X0.copy()
    impl.solve_rows_cg(*p.args(), p.Y, G, X, 4 * p.k)
    assert (X[0] == 0).all() and (X[4] == 0).all()
    assert_vectors_close(X, cholesky(reference, p, G=G)[0], rtol=1e-4)


@IMPLS
def test_cg_keeps_an_exact_solution(make_rows, impl):
    p = make_rows(k=8, seed=7)
    G = kernels.gram(p.Y, p.regularization)
    solution = cholesky(kernels, p, G=G)[0]
    X = solution.copy()
    impl.solve_rows_cg(*p.args(), p.Y, G, X, 3)
    assert_vectors_close(X, solution, rtol=1e-5)


# ----------------------------------------------------------------------------- loss


def test_loss_kernel_matches_reference(make_rows):
    p = make_rows(k=8, seed=8)
    loss = kernels.weighted_loss(*p.args(), p.X0, p.Y, 0.3)
    assert loss == pytest.approx(reference.weighted_loss(*p.args(), p.X0, p.Y, 0.3), rel=1e-10)
    XtX, YtY = kernels.gram(p.X0, 0.0), kernels.gram(p.Y, 0.0)
    assert kernels.loss_from_grams(*p.args(), p.X0, p.Y, XtX, YtY, 0.3) == loss


def test_loss_is_the_dense_weighted_objective(make_rows):
    """Without repeated entries: sum C (P - X Y^T)^2 + reg (|X|^2 + |Y|^2) over total confidence."""
    p = make_rows(k=6, seed=9)
    m, n = p.m, p.n_items
    C, P = np.ones((m, n)), np.zeros((m, n))
    keep_ptr, keep_idx, keep_conf = [0], [], []
    for u in range(m):
        seen = set()
        for e in range(p.indptr[u], p.indptr[u + 1]):
            j = int(p.indices[e])
            if 0 <= j < n and j not in seen:
                seen.add(j)
                keep_idx.append(j)
                keep_conf.append(p.conf[e])
                C[u, j] += float(p.conf[e])
                P[u, j] = 1.0
        keep_ptr.append(len(keep_idx))
    X, Y = p.X0.astype(np.float64), p.Y.astype(np.float64)
    dense = (C * (P - X @ Y.T) ** 2).sum() + 0.2 * ((X**2).sum() + (Y**2).sum())
    loss = kernels.weighted_loss(
        np.array(keep_ptr, np.int64), np.array(keep_idx, np.int32), np.array(keep_conf, np.float32),
        p.X0, p.Y, 0.2,
    )
    assert loss == pytest.approx(dense / C.sum(), rel=1e-10)


def test_default_woodbury_max_is_positive():
    assert [kernels.default_woodbury_max(k) for k in (1, 16, 64)] == [1, 16, 64]
