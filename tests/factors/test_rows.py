import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factors import kernels, reference
from factors.errors import DataError
from factors.rows import aggregate_rows, row_entries


def test_sums_duplicates_sorts_and_counts_unknown():
    indptr = [0, 4, 4, 6]
    indices = [5, 2, 5, -1, 7, -1]
    weights = [1.0, 2.0, 3.0, 9.0, 0.5, 1.0]
    p, i, w, unknown = aggregate_rows(indptr, indices, weights)
    assert p.tolist() == [0, 2, 2, 3]
    assert i.tolist() == [2, 5, 7]
    assert w.tolist() == [2.0, 4.0, 0.5]
    assert unknown.tolist() == [1, 0, 1]
    assert (p.dtype, i.dtype, w.dtype) == (np.int64, np.int32, np.float32)


def test_decay_is_relative_to_each_rows_newest_event():
    # row 0: events at t=0 and t=10 with half-life 10 -> the first counts half.
    # row 1: a single old event keeps its full weight (it is the row's newest).
    p, i, w, _ = aggregate_rows([0, 2, 3], [1, 1, 4], [2.0, 2.0, 3.0], times=[0.0, 10.0, -50.0],
                                half_life_seconds=10.0)
    assert i.tolist() == [1, 4]
    np.testing.assert_allclose(w, [1.0 + 2.0, 3.0])


def test_nan_times_are_not_decayed():
    _, _, w, _ = aggregate_rows([0, 2], [0, 1], [1.0, 1.0], times=[np.nan, 5.0], half_life_seconds=1.0)
    assert w.tolist() == [1.0, 1.0]


def test_empty_and_validation():
    p, i, w, u = aggregate_rows([0], [], [])
    assert p.tolist() == [0] and len(i) == len(w) == len(u) == 0
    with pytest.raises(DataError, match="indptr"):
        aggregate_rows([0, 3], [1], [1.0])
    with pytest.raises(DataError, match="times are required"):
        aggregate_rows([0, 1], [1], [1.0], half_life_seconds=5.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-2, 6) | st.integers(60, 200),
                                   st.floats(0, 1e6, allow_nan=False)),
                         max_size=12), max_size=8))
def test_sum_rows_kernel_equals_numpy_reference(rows):
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.array([i for r in rows for i, _ in r], np.int64)
    weights = np.array([w for r in rows for _, w in r], np.float64)
    outs = []
    for impl in (kernels.sum_rows_by_item, reference.sum_rows_by_item):
        p, i, w = np.empty(len(rows) + 1, np.int64), np.empty(len(indices), np.int64), np.empty(len(indices))
        n = impl(indptr, indices, weights, p, i, w)
        outs.append((p, i[:n], w[:n]))
    (p, i, w), (p_ref, i_ref, w_ref) = outs
    assert np.array_equal(p, p_ref) and np.array_equal(i, i_ref)
    # The kernel adds in event order; reduceat may pair terms differently.
    np.testing.assert_allclose(w, w_ref, rtol=1e-12)


@pytest.mark.parametrize("index_dtype,weight_dtype", [(np.int32, np.float32), (np.int64, np.float64),
                                                      (np.int32, np.float64), (np.int16, np.float16)])
def test_aggregate_rows_sums_in_float64_whatever_the_input_dtypes(index_dtype, weight_dtype):
    rng = np.random.default_rng(5)
    indptr = np.array([0, 300, 300, 301, 900], np.int64)
    indices = rng.integers(-1, 200, 900).astype(index_dtype)
    weights = (rng.random(900) * 10).astype(weight_dtype)
    p, i, w, unknown = aggregate_rows(indptr, indices, weights)
    # What widening everything first gives: float64 sums, rounded to float32 at the end.
    p_ref, i_ref, w_ref = np.empty(5, np.int64), np.empty(900, np.int64), np.empty(900)
    n = kernels.sum_rows_by_item(indptr, indices.astype(np.int64), weights.astype(np.float64), p_ref, i_ref, w_ref)
    assert i.dtype == np.int32 and w.dtype == np.float32
    assert np.array_equal(p, p_ref) and np.array_equal(i, i_ref[:n])
    assert np.array_equal(w, w_ref[:n].astype(np.float32))
    assert unknown.tolist() == [int((indices[a:b] < 0).sum()) for a, b in zip(indptr[:-1], indptr[1:])]


def test_sum_rows_kernel_orders_items_across_bitmap_words():
    # Items on both sides of 64-bit word boundaries, the largest index last, repeats.
    items = np.array([4095, 64, 63, 0, 128, 127, 4095, 64, 1, 2000], np.int64)
    indptr = np.array([0, 6, 6, 10], np.int64)
    p, i, w = np.empty(4, np.int64), np.empty(10, np.int64), np.empty(10)
    n = kernels.sum_rows_by_item(indptr, items, np.arange(1.0, 11.0), p, i, w)
    assert p.tolist() == [0, 6, 6, 10]
    assert i[:n].tolist() == [0, 63, 64, 127, 128, 4095, 1, 64, 2000, 4095]
    assert w[:n].tolist() == [4.0, 3.0, 2.0, 6.0, 5.0, 1.0, 9.0, 8.0, 10.0, 7.0]


def test_row_entries_are_the_positions_of_the_rows_entries_in_order():
    indptr = np.array([0, 3, 3, 5, 9], np.int64)
    for rows in ([], [1], [0, 2], [3, 0], [2, 1, 3]):
        want = [p for r in rows for p in range(indptr[r], indptr[r + 1])]
        assert row_entries(indptr, rows).tolist() == want
