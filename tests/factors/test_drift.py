"""Drift statistics against hand-computed values and brute-force dense references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from factors import drift, kernels
from factors.als import ImplicitALS
from factors.errors import DataError
from factors.foldin import FoldIn, confidence

# ----------------------------------------------------------------------------- popularity


def test_item_counts_skips_unknown_items():
    # items 0, 2, 2, 3 known (n_items = 4); -1 and 4 unknown
    np.testing.assert_array_equal(drift.item_counts([0, 2, -1, 2, 4, 3], 4), [1, 0, 2, 1])
    assert drift.item_counts([], 3).tolist() == [0, 0, 0]


def test_top_items_most_popular_first_ties_to_lower_index_zero_counts_never():
    counts = np.array([3, 5, 0, 5, 1])
    np.testing.assert_array_equal(drift.top_items(counts, 3), [1, 3, 0])
    # only four items were seen: asking for ten gives four
    np.testing.assert_array_equal(drift.top_items(counts, 10), [1, 3, 0, 4])
    assert drift.top_items(counts, 0).shape == (0,)


def test_popularity_distribution_top_plus_other():
    # counts 50, 30, 20 over items 0, 1, 2; top = [0, 1] -> [0.5, 0.3] + other 0.2
    p = drift.popularity_distribution([50, 30, 20], [0, 1])
    np.testing.assert_allclose(p, [0.5, 0.3, 0.2])
    # top in any order: buckets follow top's order; other = 50 / 100
    np.testing.assert_allclose(drift.popularity_distribution([50, 30, 20], [2, 1]), [0.2, 0.3, 0.5])
    # no top: everything is "other"; no counts: all zero
    np.testing.assert_allclose(drift.popularity_distribution([1, 3], []), [1.0])
    np.testing.assert_array_equal(drift.popularity_distribution([0, 0, 0], [0]), [0.0, 0.0])


def test_popularity_distribution_rejects_bad_input():
    with pytest.raises(DataError, match="top must hold item indices in"):
        drift.popularity_distribution([1, 2], [2])
    with pytest.raises(DataError, match="distinct"):
        drift.popularity_distribution([1, 2], [1, 1])
    with pytest.raises(DataError, match=">= 0"):
        drift.popularity_distribution([1, -2], [0])


def test_bucket_counts_follow_bucket_table():
    # 5 items, top = [3, 0]: item 3 -> bucket 0, item 0 -> bucket 1, items 1, 2, 4 -> other (2)
    buckets = drift.bucket_of_items([3, 0], 5)
    np.testing.assert_array_equal(buckets, [1, 2, 2, 0, 2])
    counts, unknown = drift.bucket_counts([3, 3, 0, 1, 4, -1, 5, 2], buckets)
    # bucket 0: two 3s; bucket 1: one 0; other: 1, 4, 2; unknown: -1 and 5
    np.testing.assert_array_equal(counts, [2, 1, 3])
    assert unknown == 2
    counts, unknown = drift.bucket_counts([], buckets)
    np.testing.assert_array_equal(counts, [0, 0, 0])
    assert unknown == 0


# ----------------------------------------------------------------------------- PSI and JS


def test_psi_by_hand():
    e = [0.5, 0.3, 0.2]
    a = [0.2, 0.3, 0.5]
    # (0.2 - 0.5) ln(0.2 / 0.5) + 0 + (0.5 - 0.2) ln(0.5 / 0.2) = 2 * 0.3 * ln 2.5
    #   = 2 * 0.3 * 0.916290732 = 0.549774439
    assert drift.psi(e, a) == pytest.approx(0.549774439, rel=1e-9)
    # symmetric, and counts are normalised first (20:30:50 is the same as 0.2:0.3:0.5)
    assert drift.psi(a, e) == pytest.approx(drift.psi(e, a), rel=1e-12)
    assert drift.psi([50, 30, 20], [20, 30, 50]) == pytest.approx(0.549774439, rel=1e-9)


def test_psi_identical_is_zero():
    assert drift.psi([0.5, 0.3, 0.2], [5, 3, 2]) == pytest.approx(0.0, abs=1e-15)
    assert drift.psi([1, 0, 1], [1, 0, 1]) == 0.0  # a bucket empty on both sides adds 0


def test_psi_floors_empty_buckets_at_eps():
    e = [0.5, 0.5, 0.0]
    a = [0.5, 0.25, 0.25]
    # bucket 0: 0; bucket 1: (0.25 - 0.5) ln(0.5) = 0.173286795
    # bucket 2: expected floored to 1e-6: (0.25 - 1e-6) ln(0.25 / 1e-6) = 0.249999 * 12.429216197
    #   = 3.107291620; total 3.280578415
    assert drift.psi(e, a) == pytest.approx(3.280578415, rel=1e-9)
    # a larger floor makes the empty bucket count less: (0.25 - 0.01) ln(25) = 0.772530...
    big = 0.173286795 + 0.24 * math.log(25.0)
    assert drift.psi(e, a, eps=0.01) == pytest.approx(big, rel=1e-9)
    assert math.isfinite(drift.psi([1, 0], [0, 1]))


def test_psi_and_js_of_an_empty_side_are_nan():
    assert math.isnan(drift.psi([0, 0], [1, 2]))
    assert math.isnan(drift.js_divergence([1, 2], [0, 0]))


def test_psi_rejects_bad_input():
    with pytest.raises(DataError, match="same shape"):
        drift.psi([1, 2], [1, 2, 3])
    with pytest.raises(DataError, match="eps must be"):
        drift.psi([1, 2], [1, 2], eps=0.0)


def test_js_by_hand():
    p = [0.5, 0.3, 0.2]
    q = [0.2, 0.3, 0.5]
    # m = [0.35, 0.3, 0.35]
    # KL(p||m) = 0.5 log2(0.5/0.35) + 0.3 log2(1) + 0.2 log2(0.2/0.35)
    #          = 0.5 * 0.514573173 + 0.2 * (-0.807354922) = 0.095815602; KL(q||m) is the same
    # JS = (0.095815602 + 0.095815602) / 2 = 0.095815602
    assert drift.js_divergence(p, q) == pytest.approx(0.095815602, rel=1e-8)
    # [1, 0] vs [0.5, 0.5]: m = [0.75, 0.25]
    # KL(p||m) = log2(4/3) = 0.415037499; KL(q||m) = 0.5 log2(2/3) + 0.5 log2(2) = 0.207518750
    # JS = (0.415037499 + 0.207518750) / 2 = 0.311278124
    assert drift.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(0.311278124, rel=1e-8)


def test_js_symmetric_bounded_zero_on_identical():
    rng = np.random.default_rng(0)
    p, q = rng.random(7), rng.random(7)
    assert drift.js_divergence(p, q) == pytest.approx(drift.js_divergence(q, p), rel=1e-12)
    assert 0.0 < drift.js_divergence(p, q) < 1.0
    assert drift.js_divergence(p, 3 * p) == pytest.approx(0.0, abs=1e-15)
    # disjoint supports: exactly one bit
    assert drift.js_divergence([1, 0, 0], [0, 2, 3]) == pytest.approx(1.0, rel=1e-12)


# ----------------------------------------------------------------------------- vectors


def test_cosine_shift_cases():
    old = np.array([[1, 0], [1, 0], [1, 1], [1, 0], [0, 0], [0, 0], [2, 0]], np.float32)
    new = np.array([[0, 1], [-2, 0], [2, 2], [1, 1], [0, 0], [0, 3], [0, 0]], np.float32)
    shift = drift.cosine_shift(old, new)
    # orthogonal 1; opposite 2; same direction 0; 45 degrees 1 - 1/sqrt(2) = 0.292893219;
    # both zero 0 (nothing moved); one zero 1 (no direction to compare)
    np.testing.assert_allclose(shift, [1.0, 2.0, 0.0, 0.292893219, 0.0, 1.0, 1.0], atol=1e-9)
    assert shift.dtype == np.float64
    assert drift.cosine_shift(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0,)
    with pytest.raises(DataError, match="same shape"):
        drift.cosine_shift(old, new[:3])


def test_cosine_shift_stays_in_range_for_parallel_vectors():
    v = np.random.default_rng(1).standard_normal((50, 16))
    shift = drift.cosine_shift(v, 3.0 * v)  # cos rounds to 1 + 1e-16: clipped
    assert (shift >= 0).all() and (shift <= 1e-12).all()


def test_centroid_distance_relative_to_reference_norm():
    # mean of (1, 0), (3, 0) is (2, 0); from (1, 0): distance 1, norm 1 -> 1
    assert drift.centroid_distance([[1, 0], [3, 0]], [1, 0]) == pytest.approx(1.0)
    # mean of (0, 2), (2, 2) is (1, 2); from (0, 2): distance 1, norm 2 -> 0.5
    assert drift.centroid_distance([[0, 2], [2, 2]], [0, 2]) == pytest.approx(0.5)
    assert drift.centroid_distance([[3, 4]], [3, 4]) == 0.0
    assert math.isnan(drift.centroid_distance(np.zeros((0, 2)), [1, 0]))
    assert drift.centroid_distance([[1, 0]], [0, 0]) == math.inf
    assert drift.centroid_distance([[0, 0]], [0, 0]) == 0.0
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        drift.centroid_distance([[1, 0]], [1, 0, 0])


# ----------------------------------------------------------------------------- loss


def dense_loss(items, conf, x, Y, regularization, item_share=0.0):
    """Brute force over every item of one row (items distinct): sum c (p - x.y)^2 / sum c."""
    n = Y.shape[0]
    c = np.ones(n)
    p = np.zeros(n)
    for j, s in zip(items, conf):
        if 0 <= j < n:
            c[j] = 1.0 + s
            p[j] = 1.0
    pred = Y.astype(np.float64) @ np.asarray(x, np.float64)
    num = np.sum(c * (p - pred) ** 2) + regularization * np.dot(x, x) + item_share
    return num / np.sum(c)


@pytest.fixture
def loss_problem():
    rng = np.random.default_rng(4)
    Y = (rng.standard_normal((30, 6)) * 0.4).astype(np.float32)
    return Y, 0.1


def test_foldin_loss_by_hand():
    # two items, k = 1: y = [1, 2], x = 0.5, user saw item 0 with s = 3 (c = 4)
    # item 0: 4 (1 - 0.5)^2 = 1; item 1: 1 (0 - 1)^2 = 1; reg ||x||^2 = 0.1 * 0.25 = 0.025
    # (1 + 1 + 0.025) / (2 + 3) = 0.405
    Y = np.array([[1.0], [2.0]], np.float32)
    assert drift.foldin_loss([0], [3.0], [0.5], Y, 0.1) == pytest.approx(0.405, rel=1e-12)
    # with an item share of 0.5: (2.025 + 0.5) / 5 = 0.505
    assert drift.foldin_loss([0], [3.0], [0.5], Y, 0.1, item_share=0.5) == pytest.approx(0.505)


@pytest.mark.parametrize("items", [[3], [0, 5, 7, 29], [], [2, -1, 30, 9]])
def test_foldin_loss_matches_dense_brute_force(loss_problem, items):
    Y, reg = loss_problem
    rng = np.random.default_rng(len(items))
    conf = rng.random(len(items)) * 10
    x = rng.standard_normal(Y.shape[1]) * 0.3
    got = drift.foldin_loss(items, conf, x, Y, reg, item_share=0.2)
    assert got == pytest.approx(dense_loss(items, conf, x, Y, reg, 0.2), rel=1e-10)


def test_foldin_losses_batch_matches_single_rows_and_the_loss_kernel(make_rows):
    # rows with empty, single, repeated, unknown and s == 0 entries
    p = make_rows(m=24, n_items=40, k=8, seed=2)
    X = p.X0
    YtY = kernels.gram(p.Y, 0.0)
    loss, weight = drift.foldin_losses(*p.args(), X, p.Y, p.regularization, YtY=YtY,
                                       item_share=0.3)
    assert loss.shape == weight.shape == (p.m,)
    for u in range(p.m):
        e = slice(p.indptr[u], p.indptr[u + 1])
        one = drift.foldin_loss(p.indices[e], p.conf[e], X[u], p.Y, p.regularization,
                                item_share=0.3)
        assert loss[u] == pytest.approx(one, rel=1e-12)
        # a one-row weighted_loss is this row's loss with item_share = reg ||Y||^2
        row_share = drift.item_regularization_share(p.Y, p.regularization, 1)
        single = drift.foldin_losses(np.array([0, e.stop - e.start]), p.indices[e], p.conf[e],
                                     X[u : u + 1], p.Y, p.regularization, item_share=row_share)[0]
        expected = kernels.weighted_loss(np.array([0, e.stop - e.start], np.int64),
                                         p.indices[e], p.conf[e], X[u : u + 1], p.Y,
                                         p.regularization)
        assert single[0] == pytest.approx(expected, rel=1e-6)
    # the weight is the row's total confidence over known entries
    known = (p.indices >= 0) & (p.indices < p.n_items)
    rows = np.repeat(np.arange(p.m), np.diff(p.indptr))
    s = np.bincount(rows[known], weights=p.conf[known], minlength=p.m)
    np.testing.assert_allclose(weight, p.n_items + s, rtol=1e-6)
    # chunking does not change the result
    small = drift._LOSS_CHUNK
    try:
        drift._LOSS_CHUNK = 7
        chunked, _ = drift.foldin_losses(*p.args(), X, p.Y, p.regularization, item_share=0.3)
    finally:
        drift._LOSS_CHUNK = small
    np.testing.assert_allclose(chunked, loss, rtol=1e-12)


def test_training_rows_add_up_to_the_training_loss():
    R = sp.random(60, 45, density=0.15, random_state=8, format="csr", dtype=np.float64)
    R.data = np.ceil(R.data * 5)
    model = ImplicitALS(factors=5, iterations=4, regularization=0.2, alpha=3.0, seed=1).fit(R)
    conf = confidence(R.data, model.alpha)
    share = drift.item_regularization_share(model.item_factors_, model.regularization, R.shape[0])
    loss, weight = drift.foldin_losses(R.indptr, R.indices, conf, model.user_factors_,
                                       model.item_factors_, model.regularization,
                                       item_share=share)
    assert np.sum(loss * weight) / np.sum(weight) == pytest.approx(model.loss_history_[-1],
                                                                   rel=1e-6)
    # Folding the training rows in against the final items can only lower each row's
    # loss: the exact fold-in minimises it.
    folded, _ = FoldIn.from_model(model).solve(R.indptr, R.indices, R.data)
    refit, _ = drift.foldin_losses(R.indptr, R.indices, conf, folded, model.item_factors_,
                                   model.regularization, item_share=share)
    assert (refit <= loss * (1 + 1e-6)).all()


def test_foldin_losses_rejects_bad_input(loss_problem):
    Y, reg = loss_problem
    X = np.zeros((2, Y.shape[1]))
    with pytest.raises(DataError, match="indptr must have 3 entries"):
        drift.foldin_losses([0, 1], [1], [1.0], X, Y, reg)
    with pytest.raises(DataError, match="conf must have"):
        drift.foldin_losses([0, 1, 1], [1], [1.0, 2.0], X, Y, reg)
    with pytest.raises(DataError, match="Y must have shape"):
        drift.foldin_losses([0, 1, 1], [1], [1.0], X, Y[:, :2], reg)
