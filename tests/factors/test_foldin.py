"""FoldIn: exact batched fold-in from raw weights, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

from factors import reference
from factors.errors import ConfigError, DataError
from factors.foldin import FoldIn, confidence


def reference_foldin(Y, regularization, alpha, scaling, epsilon, indptr, indices, weights):
    conf = confidence(weights, alpha, scaling, epsilon)
    out = np.empty((len(indptr) - 1, Y.shape[1]), np.float32)
    unknown = np.empty(len(indptr) - 1, np.int64)
    G = reference.gram(Y, regularization)
    reference.solve_rows_cholesky(
        np.asarray(indptr, np.int64), np.asarray(indices, np.int32), conf, Y, G, out, unknown
    )
    return out, unknown


@pytest.fixture
def foldin_problem(make_rows):
    p = make_rows(m=30, n_items=50, k=8, seed=11)
    weights = (np.random.default_rng(1).random(p.indices.shape[0]) * 4).astype(np.float32)
    weights[:3] = 0.0
    return p, weights


def test_confidence_scalings():
    r = np.array([0.0, 1.0, 3.0], np.float32)
    np.testing.assert_allclose(confidence(r, 10.0), [0.0, 10.0, 30.0])
    np.testing.assert_allclose(confidence(r, 2.0, "log", 0.5), 2.0 * np.log1p(r / 0.5), rtol=1e-7)
    assert confidence(r, 10.0).dtype == np.float32
    assert np.isinf(confidence(np.array([1e38]), 10.0)).all()


@pytest.mark.parametrize("scaling, epsilon", [("identity", 1.0), ("log", 0.5)])
@pytest.mark.parametrize("woodbury_max", [0, None])
def test_solve_matches_reference(foldin_problem, scaling, epsilon, woodbury_max):
    p, weights = foldin_problem
    foldin = FoldIn(p.Y, 0.1, 7.0, scaling, epsilon, woodbury_max=woodbury_max)
    vectors, unknown = foldin.solve(p.indptr, p.indices, weights)
    ref_vectors, ref_unknown = reference_foldin(
        p.Y, 0.1, 7.0, scaling, epsilon, p.indptr, p.indices, weights
    )
    assert vectors.dtype == np.float32 and vectors.shape == (p.m, p.k)
    assert unknown.dtype == np.int64
    np.testing.assert_allclose(vectors, ref_vectors, rtol=0, atol=1e-5 * np.abs(ref_vectors).max())
    np.testing.assert_array_equal(unknown, ref_unknown)


def test_holds_gram_and_its_inverse(foldin_problem):
    p, _ = foldin_problem
    foldin = FoldIn(p.Y, 0.1, 7.0)
    assert foldin.Y.dtype == np.float32 and foldin.factors == p.k and foldin.n_items == p.n_items
    np.testing.assert_allclose(foldin.G, reference.gram(p.Y, 0.1), rtol=1e-12)
    np.testing.assert_allclose(foldin.Ginv @ foldin.G, np.eye(p.k), atol=1e-9)


def test_solve_one_is_a_batch_of_one(foldin_problem):
    p, weights = foldin_problem
    foldin = FoldIn(p.Y, 0.1, 7.0)
    vectors, unknown = foldin.solve(p.indptr, p.indices, weights)
    for u in (0, 1, 3, 9):
        e = slice(p.indptr[u], p.indptr[u + 1])
        vector, n_unknown = foldin.solve_one(p.indices[e], weights[e])
        np.testing.assert_array_equal(vector, vectors[u])
        assert n_unknown == unknown[u]


def test_repeated_items_accumulate_as_separate_terms(foldin_problem):
    p, _ = foldin_problem
    foldin = FoldIn(p.Y, 0.1, 2.0, "log")
    twice, _ = foldin.solve_one([4, 4], [1.0, 3.0])
    ref, _ = reference_foldin(p.Y, 0.1, 2.0, "log", 1.0, [0, 2], [4, 4], np.array([1.0, 3.0]))
    np.testing.assert_allclose(twice, ref[0], rtol=1e-5)


def test_indices_beyond_int32_are_unknown_not_wrapped(foldin_problem):
    p, _ = foldin_problem
    foldin = FoldIn(p.Y, 0.1, 7.0)
    vector, unknown = foldin.solve_one(np.array([2**32 + 1, 1], np.int64), [1.0, 1.0])
    assert unknown == 1
    np.testing.assert_array_equal(vector, foldin.solve_one([1], [1.0])[0])


def test_empty_batch(foldin_problem):
    p, _ = foldin_problem
    vectors, unknown = FoldIn(p.Y, 0.1, 7.0).solve([0], [], [])
    assert vectors.shape == (0, p.k) and unknown.shape == (0,)


def test_for_items_is_the_same_solve_on_the_other_side(foldin_problem):
    p, weights = foldin_problem
    a = FoldIn.for_items(p.Y, 0.1, 7.0).solve(p.indptr, p.indices, weights)[0]
    b = FoldIn(p.Y, 0.1, 7.0).solve(p.indptr, p.indices, weights)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "indptr, indices, weights, message",
    [
        (
            [0, 2, 1], [1, 2], [1.0, 1.0],
            r"indptr must be non-decreasing, got indptr\[1\]=2 > indptr\[2\]=1",
        ),
        ([1, 2], [1, 2], [1.0, 1.0], "indptr must start at 0, got 1"),
        ([0, 3], [1, 2], [1.0, 1.0], r"indptr must end at len\(indices\)=2, got 3"),
        ([0, 2], [1, 2], [1.0], r"weights must have len\(indices\)=2 entries, got 1"),
        ([0, 2], [1, 2], [1.0, -0.5], "weights must be >= 0, got -0.5"),
        ([0, 2], [1, 2], [1.0, np.nan], "weights must be finite, got nan"),
        ([0, 2], [1.0, 2.0], [1.0, 1.0], "indices must hold integers, got dtype float64"),
        ([], [], [], r"indptr must have at least one element"),
        ([[0, 1]], [1], [1.0], r"indptr must be 1-D, got shape \(1, 2\)"),
        ([0, 1], [1], ["a"], "weights must be real numbers"),
        ([0, 1], [1], [1e38], "overflows float32 for weight 1e\\+38"),
    ],
)
def test_solve_rejects_malformed_batches(foldin_problem, indptr, indices, weights, message):
    p, _ = foldin_problem
    with pytest.raises(DataError, match=message):
        FoldIn(p.Y, 0.1, 7.0).solve(indptr, indices, weights)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"regularization": -1.0}, "regularization must be >= 0, got -1.0"),
        ({"alpha": float("nan")}, "alpha must be finite, got nan"),
        ({"scaling": "sqrt"}, "scaling must be one of \\('identity', 'log'\\), got 'sqrt'"),
        ({"epsilon": 0.0}, "epsilon must be > 0, got 0.0"),
        ({"woodbury_max": -1}, "woodbury_max must be >= 0, got -1"),
        (
            {"item_factors": np.zeros(5, np.float32)},
            r"item_factors must be a 2-D array \[n, k\] with k >= 1",
        ),
        ({"item_factors": np.full((3, 2), np.nan)}, "item_factors must be finite"),
        (
            {"item_factors": np.ones((3, 4), np.float32), "regularization": 0.0},
            "not positive definite: regularization must be > 0",
        ),
    ],
)
def test_constructor_rejects_bad_parameters(foldin_problem, kwargs, message):
    p, _ = foldin_problem
    params = {"item_factors": p.Y, "regularization": 0.1, "alpha": 7.0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        FoldIn(**params)
