"""Temporal split, ranking metrics and prequential replay on small hand-checked inputs.

Expected numbers are worked out by hand in the comments; random cases are checked
against naive per-user / per-event oracles written here with plain NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from factors.data import ConfidenceParams, IdIndex, Interactions, decay_weights
from factors.errors import ConfigError, DataError
from factors.evaluate import prequential, ranking_metrics, temporal_split
from factors.foldin import FoldIn

LOG2_3 = math.log2(3)


def make_interactions(users, items, timestamps=None, weights=None, n_users=None, n_items=None):
    """Interactions from index arrays; ids are "u0", "u1", ... and "i0", "i1", ..."""
    users = np.asarray(users, dtype=np.int32)
    items = np.asarray(items, dtype=np.int32)
    n = len(users)
    n_users = n_users if n_users is not None else int(users.max(initial=-1)) + 1
    n_items = n_items if n_items is not None else int(items.max(initial=-1)) + 1
    return Interactions(
        users=users,
        items=items,
        weights=np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32),
        timestamps=(np.arange(n, dtype=np.float64) if timestamps is None
                    else np.asarray(timestamps, dtype=np.float64)),
        user_ids=IdIndex.from_ids(f"u{u}" for u in range(n_users)),
        item_ids=IdIndex.from_ids(f"i{i}" for i in range(n_items)),
    )


def csr(pairs, shape):
    rows, cols = zip(*pairs) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


# ---------------------------------------------------------------------------------------
# temporal_split


def test_split_cuts_at_the_time_of_the_event_at_the_cutoff_position():
    # sorted timestamps: 1 2 3 3 3 4 5 6 7 8 -> position floor(0.3 * 10) = 3 has t = 3,
    # so train is every event before t = 3 (two events), test the other eight.
    ts = [5, 3, 1, 3, 8, 2, 3, 4, 7, 6]
    inter = make_interactions(range(10), range(10), timestamps=ts)
    train, test = temporal_split(inter, 0.3)
    assert train.timestamps.tolist() == [1, 2]
    assert test.timestamps.tolist() == [3, 3, 3, 4, 5, 6, 7, 8]
    # equal timestamps keep file order (stable); both halves share the id indices
    assert test.users[:3].tolist() == [1, 3, 6]
    assert train.user_ids is inter.user_ids and test.item_ids is inter.item_ids


def test_split_without_ties_takes_exactly_the_fraction():
    inter = make_interactions(range(10), range(10), timestamps=np.arange(10.0)[::-1])
    train, test = temporal_split(inter, 0.8)
    assert len(train) == 8 and len(test) == 2
    assert train.timestamps.max() < test.timestamps.min()


def test_split_is_independent_of_file_order():
    rng = np.random.default_rng(3)
    ts = rng.integers(0, 20, size=200).astype(np.float64)
    users = rng.integers(0, 15, size=200)
    items = rng.integers(0, 30, size=200)
    perm = rng.permutation(200)
    a_train, a_test = temporal_split(make_interactions(users, items, ts), 0.7)
    b_train, b_test = temporal_split(make_interactions(users[perm], items[perm], ts[perm]), 0.7)

    def events(x):
        return sorted(zip(x.users.tolist(), x.items.tolist(), x.timestamps.tolist()))

    assert events(a_train) == events(b_train) and events(a_test) == events(b_test)
    assert a_train.timestamps.max() < a_test.timestamps.min()
    assert len(a_train) + len(a_test) == 200


@pytest.mark.parametrize("cutoff", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_split_rejects_cutoff_outside_open_unit_interval(cutoff):
    with pytest.raises(ConfigError, match="cutoff must be in"):
        temporal_split(make_interactions([0, 1], [0, 1]), cutoff)


def test_split_rejects_missing_timestamps():
    inter = make_interactions([0, 1, 2], [0, 1, 2], timestamps=[1.0, np.nan, 3.0])
    with pytest.raises(DataError, match="1 of 3 events"):
        temporal_split(inter)


def test_split_rejects_empty_log_and_an_empty_train_side():
    with pytest.raises(DataError, match="empty"):
        temporal_split(make_interactions([], []))
    same_time = make_interactions([0, 1, 2], [0, 1, 2], timestamps=[5.0, 5.0, 5.0])
    with pytest.raises(DataError, match="no training events"):
        temporal_split(same_time, 0.8)


# ---------------------------------------------------------------------------------------
# ranking_metrics

# One latent factor, so a score is (user value) x (item value). Items 0..5 are scored
# 0.9 ... 0.4 and have training data; item 6 has a factor row but no training data (as
# for an item first seen after the cut); item 7 has no factor row at all.
ITEM_VALUES = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.0]], np.float32)


def hand_case():
    """Users: 0 and 1 warm; 2 train-only; 3 row but no training; 4 repeats; 5 no row."""
    U = np.array([[1.0], [-1.0], [1.0], [1.0], [1.0]], np.float32)
    train = csr([(0, 0), (1, 5), (1, 3), (4, 0)] + [(2, i) for i in range(6)], shape=(6, 7))
    test = make_interactions(
        users=[0, 0, 0, 0, 1, 1, 1, 3, 4, 5],
        items=[2, 5, 0, 6, 4, 1, 7, 0, 0, 1],
        n_users=6, n_items=8,
    )
    return U, train, test


def test_ranking_metrics_hand_computed():
    U, train, test = hand_case()
    m = ranking_metrics(U, ITEM_VALUES, train, test, k=3)
    # user 0: ranks 1 2 3 (0 is a training item); relevant {2, 5, 6} (0 was trained on),
    #   6 unrecommendable. One hit at rank 1 (0-based).
    #   P = 1/3, R = 1/3, nDCG = (1/log2 3) / (1 + 1/log2 3 + 1/2), AP = (1/2) / 3
    # user 1 (scores reversed): ranks 4 2 1 (5 and 3 trained on); relevant {4, 1, 7},
    #   7 unrecommendable. Hits at ranks 0 and 2.
    #   P = 2/3, R = 2/3, nDCG = (1 + 1/2) / (1 + 1/log2 3 + 1/2), AP = (1 + 2/3) / 3
    idcg = 1 + 1 / LOG2_3 + 0.5
    assert m["users"] == 2
    assert m["precision"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["ndcg"] == pytest.approx(((1 / LOG2_3) / idcg + 1.5 / idcg) / 2)
    assert m["map"] == pytest.approx((1 / 6 + 5 / 9) / 2)
    assert m["hit_rate"] == 1.0
    # recommended {1, 2, 3} and {4, 2, 1}: 4 of the 6 items with training data
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["catalog_items"] == 6
    assert m["relevant"] == 6 and m["unrecommendable"] == 2
    # users 3 (no training) and 5 (no factor row) are cold; 4 only repeated item 0
    assert m["cold_users"] == 2 and m["skipped_users"] == 1
    assert m["k"] == 3
    assert "cold_metrics" not in m


def test_cold_users_scored_separately_with_their_own_vectors():
    U, train, test = hand_case()
    cold_vectors = np.array([[0.0], [0.0], [0.0], [1.0]], np.float32)  # only user 3 has one
    m = ranking_metrics(U, ITEM_VALUES, train, test, k=3, cold_user_factors=cold_vectors)
    cold = m["cold_metrics"]
    # user 3 ranks 0 1 2 with nothing excluded; its one relevant item 0 is at rank 0.
    assert cold["users"] == 1 and cold["unscored"] == 1  # user 5 is beyond the given rows
    assert cold["precision"] == pytest.approx(1 / 3)
    assert cold["recall"] == cold["ndcg"] == cold["map"] == cold["hit_rate"] == 1.0
    assert cold["coverage"] == pytest.approx(3 / 6)
    # the warm metrics are unchanged by the extra argument
    assert m["precision"] == pytest.approx(0.5) and m["users"] == 2


def test_training_items_are_never_recommended():
    # the user's favourite items 0 and 1 were trained on: top-2 must be 2 and 3 (a hit on
    # 2 would be impossible to miss); testing on an item it trained on finds nothing new.
    train = csr([(0, 0), (0, 1), (1, 2), (1, 3), (1, 4)], shape=(2, 5))
    Y = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]], np.float32)
    test = make_interactions([0, 0], [3, 1], n_users=2, n_items=5)
    m = ranking_metrics(np.ones((2, 1), np.float32), Y, train, test, k=2)
    # relevant {3} (1 was trained on); ranking 2 3 -> hit at rank 1
    assert m["users"] == 1 and m["relevant"] == 1
    assert m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["ndcg"] == pytest.approx(1 / LOG2_3)
    assert m["map"] == 0.5
    assert m["coverage"] == pytest.approx(2 / 5)


def test_ties_go_to_the_lower_item_index():
    # every score is 0: the ranking is 0, 1, 2, ... whatever the block size
    train = csr([(0, i) for i in range(1, 20)] + [(1, 0)], shape=(2, 20))
    Y = np.zeros((20, 4), np.float32)
    U = np.ones((2, 4), np.float32)
    test = make_interactions([0, 1, 1], [5, 1, 9], n_users=2, n_items=20)
    m = ranking_metrics(U, Y, train, test, k=3)
    # user 0 trained on 1..19, so its only candidate is 0: relevant {5} is a training
    # item -> skipped. user 1 (trained on 0) ranks 1 2 3: relevant {1, 9} -> hit at 0.
    assert m["users"] == 1 and m["skipped_users"] == 1
    assert m["recall"] == 0.5 and m["map"] == pytest.approx(1 / 2)


def test_fewer_candidates_than_k():
    # 3 items, one trained on: only 2 can be recommended at k=5; precision still uses k
    train = csr([(0, 0), (1, 1), (1, 2)], shape=(2, 3))
    Y = np.array([[3.0], [2.0], [1.0]], np.float32)
    test = make_interactions([0], [2], n_users=2, n_items=3)
    m = ranking_metrics(np.ones((2, 1), np.float32), Y, train, test, k=5)
    # ranking 1 2 -> hit at rank 1; P = 1/5, R = 1, nDCG = 1/log2 3, AP = (1/2)/1
    assert m["precision"] == pytest.approx(0.2) and m["recall"] == 1.0
    assert m["ndcg"] == pytest.approx(1 / LOG2_3) and m["map"] == 0.5
    assert m["coverage"] == pytest.approx(2 / 3)


def test_no_test_events_gives_zero_users():
    train = csr([(0, 0)], shape=(1, 2))
    m = ranking_metrics(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32), train,
                        make_interactions([], [], n_users=1, n_items=2))
    assert m["users"] == 0 and m["precision"] == 0.0 and m["coverage"] == 0.0


def test_invalid_arguments_are_config_errors():
    U, train, test = hand_case()
    with pytest.raises(ConfigError, match="k must be"):
        ranking_metrics(U, ITEM_VALUES, train, test, k=0)
    with pytest.raises(ConfigError, match="same width"):
        ranking_metrics(np.ones((5, 2), np.float32), ITEM_VALUES, train, test)
    with pytest.raises(ConfigError, match="block_size"):
        ranking_metrics(U, ITEM_VALUES, train, test, block_size=0)
    with pytest.raises(ConfigError, match="user_factors must be 2-D"):
        ranking_metrics(U.ravel(), ITEM_VALUES, train, test)
    broken = U.copy()
    broken[1, 0] = np.nan
    with pytest.raises(ConfigError, match="user_factors must be finite, got 1 NaN"):
        ranking_metrics(broken, ITEM_VALUES, train, test)


def random_problem(seed, n_users=40, n_items=60, f=4, integer=False):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(n_users, f)).astype(np.float32)
    Y = rng.normal(size=(n_items, f)).astype(np.float32)
    if integer:  # small integers make many exact ties
        U, Y = np.round(U), np.round(Y)
    dense = rng.random((n_users + 5, n_items)) < 0.1
    dense[: n_users // 2, : n_items // 2] |= rng.random((n_users // 2, n_items // 2)) < 0.1
    dense[n_users - 3:] = False  # a few users with no training row content
    train = sp.csr_matrix(dense.astype(np.float32))
    n_test = 300
    test = make_interactions(
        rng.integers(0, n_users + 5, n_test), rng.integers(0, n_items + 3, n_test),
        n_users=n_users + 5, n_items=n_items + 3,
    )
    return U, Y, train, test


def naive_ranking_metrics(U, Y, train, test, k):
    """Per-user loops over Python lists: the definitions, written out."""
    train = sp.csr_matrix(train)
    known = {int(i) for i in train.indices if i < len(Y)}
    per_user = {}
    for u, i in zip(test.users.tolist(), test.items.tolist()):
        per_user.setdefault(u, set()).add(i)
    sums = np.zeros(5)
    n = 0
    recommended = set()
    for u, items in per_user.items():
        trained = set(train[u].indices.tolist()) if u < train.shape[0] else set()
        relevant = items - trained
        if not relevant or u >= len(U) or not trained:
            continue
        scores = Y @ U[u]
        candidates = sorted((c for c in known if c not in trained), key=lambda c: (-scores[c], c))
        top = candidates[:k]
        recommended.update(top)
        hits = [c in relevant for c in top]
        h = sum(hits)
        ideal = sum(1 / math.log2(p + 2) for p in range(min(k, len(relevant))))
        dcg = sum(1 / math.log2(p + 2) for p, hit in enumerate(hits) if hit)
        ap = sum(sum(hits[: p + 1]) / (p + 1) for p, hit in enumerate(hits) if hit)
        sums += [h / k, h / len(relevant), dcg / ideal, ap / min(k, len(relevant)), h > 0]
        n += 1
    means = sums / n
    keys = ["precision", "recall", "ndcg", "map", "hit_rate"]
    return {**dict(zip(keys, means)), "users": n, "coverage": len(recommended) / len(known)}


@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("k", [1, 5, 70])
def test_matches_naive_definitions_for_every_block_size(integer, k):
    U, Y, train, test = random_problem(seed=k, integer=integer)
    expected = naive_ranking_metrics(U, Y, train, test, k)
    results = [ranking_metrics(U, Y, train, test, k=k, block_size=b) for b in (None, 1, 7)]
    for m in results:
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    blocked, one, seven = results
    assert blocked == pytest.approx(one, rel=1e-12) and blocked == pytest.approx(seven, rel=1e-12)


# ---------------------------------------------------------------------------------------
# prequential


class NumpyFoldIn:
    """Independent oracle: (YtY + reg I + sum s y y^T) x = sum (1 + s) y, s = alpha * r."""

    def __init__(self, item_factors, regularization, alpha):
        self.item_factors = np.asarray(item_factors, np.float32)
        self.regularization = regularization
        self.alpha = alpha

    def solve(self, indptr, indices, weights):
        Y = self.item_factors.astype(np.float64)
        G = Y.T @ Y + self.regularization * np.eye(Y.shape[1])
        out = np.zeros((len(indptr) - 1, Y.shape[1]), np.float32)
        unknown = np.zeros(len(indptr) - 1, np.int64)
        for row in range(len(indptr) - 1):
            A, b = G.copy(), np.zeros(Y.shape[1])
            for j in range(indptr[row], indptr[row + 1]):
                if not 0 <= indices[j] < len(Y):
                    unknown[row] += 1
                    continue
                y, s = Y[indices[j]], self.alpha * float(weights[j])
                A += s * np.outer(y, y)
                b += (1 + s) * y
            if indptr[row + 1] > indptr[row]:
                out[row] = np.linalg.solve(A, b)
        return out, unknown


def foldin_of(kind, Y, regularization=0.1, alpha=1.0):
    if kind == "numpy":
        return NumpyFoldIn(Y, regularization, alpha)
    return FoldIn(Y, regularization, alpha)


FOLDINS = ["numpy", "factors.foldin"]

# Two latent factors; every item has training data (user 1 saw them all). Item 4 has no
# factor row. Scores: user 0 = [1, 0] likes items 0 and 1; nothing favours items 2, 3.
STREAM_Y = np.array([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.5]], np.float32)
STREAM_U = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)


def crafted_stream():
    train = make_interactions([0, 1, 1, 1, 1], [0, 0, 1, 2, 3], n_users=3, n_items=5)
    # time order: t1 u0 i2 (weight 2), t2 u0 i3, t3 u0 i2 (repeat), t4 u2 i1 (new user),
    # t5 u2 i0, t6 u1 i4 (item without a factor row). Given in shuffled file order.
    test = make_interactions(
        users=[2, 0, 1, 0, 0, 2], items=[1, 2, 4, 3, 2, 0],
        timestamps=[13, 10, 15, 11, 12, 14], weights=[1, 2, 1, 1, 1, 1], n_users=3, n_items=5,
    )
    return train, test


@pytest.mark.parametrize("kind", FOLDINS)
def test_prequential_stale_on_a_crafted_stream(kind):
    train, test = crafted_stream()
    m = prequential(foldin_of(kind, STREAM_Y), STREAM_U, train, test, k=1, mode="stale")
    # t1: u0 = [1, 0] ranks candidates 1 (0.5), 2 (0), 3 (0): item 2 at rank 1 -> miss
    # t2: candidates 1, 3 -> item 3 at rank 1 -> miss;  t3: repeat
    # t4, t5: u2 never gets a vector -> cold;  t6: item 4 unknown
    assert m == {"mode": "stale", "k": 1, "events": 6, "scored": 2, "repeats": 1,
                 "unknown_items": 1, "cold": 2, "hits": 0, "hit_rate": 0.0, "ndcg": 0.0}
    m2 = prequential(foldin_of(kind, STREAM_Y), STREAM_U, train, test, k=2, mode="stale")
    # at k = 2 both rank-1 events hit, each with nDCG 1/log2(3); 5 judged events
    assert m2["hits"] == 2 and m2["hit_rate"] == pytest.approx(2 / 5)
    assert m2["ndcg"] == pytest.approx(2 / LOG2_3 / 5)


@pytest.mark.parametrize("kind", FOLDINS)
def test_prequential_foldin_on_a_crafted_stream(kind):
    train, test = crafted_stream()
    m = prequential(foldin_of(kind, STREAM_Y), STREAM_U, train, test, k=1, mode="foldin")
    # t1: as stale, miss. u0 is then re-solved from {0: 1, 2: 2}: G is diagonal, so
    #   x = [(1+s0)/(c+s0), (1+s2)/(c+s2)] with c = 1.25 + reg > 1 and s2 = 2 s0 > s0,
    #   hence x[1] > x[0] and item 3 (0.5 x[1]) beats item 1 (0.5 x[0]).
    # t2: hit at rank 0.  t3: repeat.  t4: u2 cold, then folded in from item 1 -> [c', 0]
    # t5: u2 ranks 0 (c') above 2 and 3 (0) -> hit.  t6: unknown item.
    assert m == {"mode": "foldin", "k": 1, "events": 6, "scored": 3, "repeats": 1,
                 "unknown_items": 1, "cold": 1, "hits": 2, "hit_rate": 0.4, "ndcg": 0.4}


def test_prequential_rejects_bad_mode_and_k():
    train, test = crafted_stream()
    with pytest.raises(ConfigError, match="mode must be"):
        prequential(NumpyFoldIn(STREAM_Y, 0.1, 1.0), STREAM_U, train, test, mode="online")
    with pytest.raises(ConfigError, match="k must be"):
        prequential(NumpyFoldIn(STREAM_Y, 0.1, 1.0), STREAM_U, train, test, k=0)


def naive_prequential(Y, U, train, test, k, mode, regularization, alpha, half_life=None):
    """Event by event with Python lists and np.linalg.solve over the whole history."""
    Y64 = Y.astype(np.float64)
    known = {i for i in train.items.tolist() if i < len(Y)}
    events = {}  # user -> list of (item, weight, ts)
    for u, i, w, t in zip(train.users.tolist(), train.items.tolist(), train.weights.tolist(),
                          train.timestamps.tolist()):
        events.setdefault(u, []).append((i, w, t))
    vectors = {u: U[u] for u in events if u < len(U) and any(i < len(Y) for i, _, _ in events[u])}
    out = dict(scored=0, repeats=0, unknown_items=0, cold=0, hits=0)
    ndcg = 0.0
    order = np.argsort(test.timestamps, kind="stable")
    for e in order:
        u, i = int(test.users[e]), int(test.items[e])
        w, t = float(test.weights[e]), float(test.timestamps[e])
        history = events.setdefault(u, [])
        seen = {j for j, _, _ in history}
        if i in seen:
            out["repeats"] += 1
        elif u not in vectors:
            out["cold"] += 1
        elif i not in known:
            out["unknown_items"] += 1
        else:
            out["scored"] += 1
            scores = Y @ vectors[u]
            ranking = sorted((j for j in known if j not in seen), key=lambda j: (-scores[j], j))
            rank = ranking.index(i)
            if rank < k:
                out["hits"] += 1
                ndcg += 1 / math.log2(rank + 2)
        history.append((i, w, t))
        if mode == "foldin" and any(j in known for j, _, _ in history):
            summed = {}
            for j, wj, tj in history:
                if half_life is not None:
                    wj = float(decay_weights(np.array([wj], np.float32), np.array([tj]),
                                             half_life, t)[0])
                summed[j] = summed.get(j, 0.0) + wj
            A = Y64.T @ Y64 + regularization * np.eye(Y.shape[1])
            b = np.zeros(Y.shape[1])
            for j, r in summed.items():
                if j < len(Y):
                    s = alpha * np.float32(r)
                    A += s * np.outer(Y64[j], Y64[j])
                    b += (1 + s) * Y64[j]
            vectors[u] = np.linalg.solve(A, b).astype(np.float32)
    judged = len(order) - out["repeats"]
    return {**out, "events": len(order), "hit_rate": out["hits"] / judged, "ndcg": ndcg / judged}


@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("half_life", [None, 5.0])
@pytest.mark.parametrize("mode", ["foldin", "stale"])
def test_prequential_matches_naive_replay(mode, half_life, integer):
    rng = np.random.default_rng(11)
    n_users, n_items, f = 12, 25, 3
    Y = rng.normal(size=(n_items, f)).astype(np.float32)
    U = rng.normal(size=(n_users - 2, f)).astype(np.float32)  # last two users are new
    if integer:  # small integers: many items with equal scores
        Y, U = np.round(Y / 2), np.round(U)
    n = 260
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items + 2, n)  # two ids beyond the factor rows
    weights = rng.integers(1, 4, n).astype(np.float32)
    inter = make_interactions(users, items, timestamps=rng.integers(0, 40, n), weights=weights,
                              n_users=n_users, n_items=n_items + 2)
    train, test = temporal_split(inter, 0.5)
    train = train.subset(train.users < n_users - 2)  # keep the two new users out of training
    params = ConfidenceParams(alpha=2.0, half_life_seconds=half_life)
    m = prequential(FoldIn(Y, 0.3, 2.0), U, train, test, k=4, mode=mode, params=params)
    expected = naive_prequential(Y, U, train, test, 4, mode, 0.3, 2.0, half_life)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert m["scored"] > 20 and m["hits"] > 0 and m["repeats"] > 0
    assert m["cold"] > 0 and m["unknown_items"] > 0
