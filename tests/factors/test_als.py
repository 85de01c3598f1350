"""ImplicitALS: validation, determinism, the fitting invariants, fold-in against the model."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from factors import reference
from factors.als import ImplicitALS
from factors.errors import ConfigError, DataError, ModelFitError
from factors.foldin import FoldIn, confidence

SOLVERS = pytest.mark.parametrize("solver", ["cg", "cholesky"])


def fit(R, **params):
    defaults = {"factors": 6, "iterations": 5, "regularization": 0.1, "alpha": 4.0}
    return ImplicitALS(**{**defaults, **params}).fit(R)


def exact_half_step(R, fixed, model):
    """Every row of R solved exactly against fixed factors, by the NumPy reference."""
    conf = confidence(R.data, model.alpha, model.scaling, model.epsilon)
    out = np.empty((R.shape[0], fixed.shape[1]), np.float32)
    unknown = np.empty(R.shape[0], np.int64)
    reference.solve_rows_cholesky(
        R.indptr.astype(np.int64), R.indices.astype(np.int32), conf, fixed,
        reference.gram(fixed, model.regularization), out, unknown,
    )
    return out


def assert_vectors_close(actual, expected, rtol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * float(np.abs(expected).max()))


# ----------------------------------------------------------------------------- parameters


def test_init_only_stores_parameters():
    model = ImplicitALS(factors=0, solver="nope")  # no validation before fit
    assert model.factors == 0 and model.solver == "nope"
    assert not hasattr(model, "user_factors_")
    assert ImplicitALS().get_params()["factors"] == 64


@pytest.mark.parametrize(
    "params, message",
    [
        ({"factors": 0}, "factors must be >= 1, got 0"),
        ({"factors": 2.5}, "factors must be an integer, got 2.5"),
        ({"regularization": -0.1}, "regularization must be >= 0, got -0.1"),
        ({"alpha": -1.0}, "alpha must be >= 0, got -1.0"),
        ({"alpha": float("inf")}, "alpha must be finite, got inf"),
        ({"scaling": "exp"}, r"scaling must be one of \('identity', 'log'\), got 'exp'"),
        ({"epsilon": -1.0}, "epsilon must be > 0, got -1.0"),
        ({"iterations": 0}, "iterations must be >= 1, got 0"),
        ({"solver": "lu"}, r"solver must be one of \('cg', 'cholesky'\), got 'lu'"),
        ({"cg_steps": 0}, "cg_steps must be >= 1, got 0"),
        ({"seed": -3}, "seed must be >= 0, got -3"),
        ({"num_threads": -1}, "num_threads must be >= 0, got -1"),
        ({"num_threads": True}, "num_threads must be an integer, got True"),
        ({"callback": 3}, "callback must be callable or None, got 3"),
    ],
)
def test_fit_rejects_bad_parameters(make_ratings, params, message):
    with pytest.raises(ConfigError, match=message):
        ImplicitALS(**params).fit(make_ratings())


@pytest.mark.parametrize(
    "R, message",
    [
        (np.ones((3, 3)), "R must be a scipy.sparse matrix"),
        (
            sp.csr_matrix((0, 4), dtype=np.float32),
            r"at least one user and one item, got shape \(0, 4\)",
        ),
        (
            sp.csr_matrix(np.array([[1.0, -2.0]])),
            r"R weights must be >= 0, got -2.0 at \(user 0, item 1\)",
        ),
        (
            sp.csr_matrix(np.array([[1.0, 0.0], [0.0, np.inf]])),
            r"finite in float32, got inf at \(user 1, item 1\)",
        ),
        (sp.csr_matrix(np.array([[np.nan, 1.0]])), "must be finite in float32, got nan"),
        (sp.csr_matrix(np.array([[1e39, 1.0]])), "must be finite in float32, got inf"),
    ],
)
def test_fit_rejects_bad_matrices(R, message):
    with pytest.raises(DataError, match=message):
        ImplicitALS(factors=2).fit(R)


# ----------------------------------------------------------------------------- fitting


@SOLVERS
def test_fit_learns_float32_factors(make_ratings, solver):
    R = make_ratings()
    calls = []
    model = fit(R, solver=solver, callback=lambda *args: calls.append(args))
    assert model.user_factors_.shape == (50, 6) and model.user_factors_.dtype == np.float32
    assert model.item_factors_.shape == (30, 6) and model.item_factors_.dtype == np.float32
    assert len(model.loss_history_) == 5 and model.fit_seconds_ > 0
    assert [c[0] for c in calls] == list(range(5))
    assert [c[1] for c in calls] == model.loss_history_
    assert all(c[2] >= 0 for c in calls)
    assert (model.user_factors_[0] == 0).all()  # a user without interactions
    assert (model.item_factors_[-1] == 0).all()  # an item nobody touched


def test_fit_returns_self(make_ratings):
    model = ImplicitALS(factors=3, iterations=1)
    assert model.fit(make_ratings()) is model


def test_exact_als_loss_never_increases(make_ratings):
    losses = fit(make_ratings(users=80, items=40), solver="cholesky", iterations=10).loss_history_
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


def test_cg_als_loss_decreases(make_ratings):
    losses = fit(make_ratings(users=80, items=40), solver="cg", iterations=10).loss_history_
    assert losses[-1] < 0.8 * losses[0]


@SOLVERS
def test_same_seed_same_factors_for_any_thread_count(make_ratings, solver):
    R = make_ratings(users=120)
    a = fit(R, solver=solver, seed=4, num_threads=1)
    b = fit(R, solver=solver, seed=4, num_threads=2)
    np.testing.assert_array_equal(a.user_factors_, b.user_factors_)
    np.testing.assert_array_equal(a.item_factors_, b.item_factors_)
    assert a.loss_history_ == b.loss_history_
    c = fit(R, solver=solver, seed=5)
    assert not np.array_equal(a.user_factors_, c.user_factors_)


@SOLVERS
def test_fit_matches_a_reference_alternation(make_ratings, solver):
    """Plumbing check: confidences, transposition and initialisation as documented."""
    R = make_ratings(users=40, items=25, seed=2)
    model = fit(R, solver=solver, iterations=3, scaling="log", epsilon=2.0, seed=9)
    rng = np.random.default_rng(9)
    X = rng.random((40, 6), dtype=np.float32) * np.float32(0.01)
    Y = rng.random((25, 6), dtype=np.float32) * np.float32(0.01)
    conf = confidence(R.data, 4.0, "log", 2.0)
    Cu = sp.csr_matrix((conf, R.indices, R.indptr), shape=R.shape)
    Ci = Cu.T.tocsr()
    for _ in range(3):
        for C, fixed, solved in ((Cu, Y, X), (Ci, X, Y)):
            G = reference.gram(fixed, 0.1)
            args = (C.indptr.astype(np.int64), C.indices.astype(np.int32), C.data, fixed, G)
            if solver == "cg":
                reference.solve_rows_cg(*args, solved, 3)
            else:
                reference.solve_rows_cholesky(*args, solved, np.empty(solved.shape[0], np.int64))
    assert_vectors_close(model.user_factors_, X, rtol=1e-4)
    assert_vectors_close(model.item_factors_, Y, rtol=1e-4)
    assert model.loss_history_[-1] == pytest.approx(
        reference.weighted_loss(Cu.indptr, Cu.indices, Cu.data, X, Y, 0.1), rel=1e-4
    )


def test_duplicate_entries_are_summed(make_ratings):
    R = make_ratings()
    # every entry stored twice with half the weight: a non-canonical CSR
    doubled = sp.csr_matrix(
        (np.repeat(R.data / 2, 2), np.repeat(R.indices, 2), 2 * R.indptr), shape=R.shape
    )
    assert doubled.nnz == 2 * R.nnz
    np.testing.assert_array_equal(fit(R).user_factors_, fit(doubled).user_factors_)


def test_num_threads_is_restored(make_ratings):
    before = numba.get_num_threads()
    fit(make_ratings(), num_threads=1)
    assert numba.get_num_threads() == before
    with pytest.raises(ModelFitError):
        fit(make_ratings(items=4), factors=8, regularization=0.0, solver="cholesky", num_threads=1)
    assert numba.get_num_threads() == before


# ----------------------------------------------------------------------------- failures


def test_singular_problem_raises_model_fit_error(make_ratings):
    R = make_ratings(items=4)  # fewer items than factors and no regularization
    with pytest.raises(ModelFitError, match="iteration 0"):
        fit(R, factors=8, regularization=0.0, solver="cholesky")


def test_overflowing_confidence_raises_model_fit_error(make_ratings):
    with pytest.raises(ModelFitError, match="overflows float32"):
        fit(make_ratings(), alpha=1e38)


def test_nan_factors_after_an_iteration_raise_model_fit_error(make_ratings, monkeypatch):
    from factors import kernels

    def poisoned(indptr, indices, conf, Y, G, X, cg_steps):
        X[1, 0] = np.nan

    monkeypatch.setattr(kernels, "solve_rows_cg", poisoned)
    with pytest.raises(ModelFitError, match="iteration 0: user factors became NaN or inf"):
        fit(make_ratings(), solver="cg")


# ----------------------------------------------------------------------------- fold-in


@SOLVERS
def test_fold_in_of_training_users_is_one_more_user_half_step(make_ratings, solver):
    R = make_ratings(users=60)
    model = fit(R, solver=solver, iterations=4)
    vectors, unknown = model.fold_in(R.indptr, R.indices, R.data)
    assert (unknown == 0).all()
    assert_vectors_close(vectors, exact_half_step(R, model.item_factors_, model))


def test_item_factors_are_the_exact_item_half_step(make_ratings):
    """After an exact fit, folding the training items back in reproduces item_factors_."""
    R = make_ratings(users=60)
    model = fit(R, solver="cholesky", iterations=4)
    Rt = R.T.tocsr()
    vectors, _ = model.fold_in_items(Rt.indptr, Rt.indices, Rt.data)
    assert_vectors_close(vectors, model.item_factors_)


def test_fold_in_of_a_training_user_lands_close_to_the_fitted_row(make_ratings):
    R = make_ratings(users=80, items=40)
    model = fit(R, solver="cholesky", iterations=40, factors=4)
    vectors, _ = model.fold_in(R.indptr, R.indices, R.data)
    assert_vectors_close(vectors, model.user_factors_, rtol=2e-2)


@SOLVERS
def test_recalculate_user_is_pure(make_ratings, solver):
    R = make_ratings()
    model = fit(R, solver=solver)
    users, items = model.user_factors_.copy(), model.item_factors_.copy()
    row = R[7]
    vector = model.recalculate_user(row.indices, row.data)
    assert vector.shape == (6,) and vector.dtype == np.float32
    np.testing.assert_array_equal(model.user_factors_, users)
    np.testing.assert_array_equal(model.item_factors_, items)
    np.testing.assert_array_equal(vector, model.fold_in(R.indptr, R.indices, R.data)[0][7])
    column = R.T.tocsr()[3]
    item_vector = model.recalculate_item(column.indices, column.data)
    np.testing.assert_array_equal(model.item_factors_, items)
    assert item_vector.shape == (6,)


def test_recalculate_user_rejects_unknown_items(make_ratings):
    model = fit(make_ratings())
    with pytest.raises(DataError, match=r"1 item indices are outside \[0, 30\)"):
        model.recalculate_user([1, 30], [1.0, 1.0])


def test_foldin_from_model(make_ratings):
    R = make_ratings()
    model = fit(R, scaling="log", epsilon=0.5)
    users = FoldIn.from_model(model)
    items = FoldIn.from_model(model, side="items")
    assert users.n_items == 30 and items.n_items == 50 and users.scaling == "log"
    np.testing.assert_array_equal(
        users.solve(R.indptr, R.indices, R.data)[0], model.fold_in(R.indptr, R.indices, R.data)[0]
    )
    with pytest.raises(ConfigError, match="side must be 'users' or 'items'"):
        FoldIn.from_model(model, side="both")


def test_fold_in_before_fit_is_an_error():
    with pytest.raises(ConfigError, match="ImplicitALS is not fitted"):
        ImplicitALS().fold_in([0], [], [])
