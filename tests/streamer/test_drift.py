"""DriftMonitor on crafted streams whose statistics are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from factors import drift as fdrift
from factors.artifacts import ModelArtifact
from streamer.drift import DriftMonitor, DriftReference, publish
from streamer.errors import ConfigError
from streamer.metrics import Metrics

# Training popularity over items 0, 1, 2: 50, 30, 20 interactions; top-2 = [0, 1] + other.
COUNTS = [50, 30, 20]
PSI_SKEW = 0.549774439  # psi([.5, .3, .2], [.2, .3, .5]) = 2 * 0.3 * ln 2.5
JS_SKEW = 0.095815602  # 0.5 log2(0.5/0.35) + 0.2 log2(0.2/0.35)


def events(**per_item) -> np.ndarray:
    """events(i0=20, i1=30, unknown=5) -> item indices, in blocks."""
    parts = []
    for name, n in per_item.items():
        item = -1 if name == "unknown" else int(name[1:])
        parts.append(np.full(n, item, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@pytest.fixture
def make_monitor():
    def make(window_events=1_000, top_items=2, train_loss=0.5, centroid=(1.0, 0.0),
             counts=COUNTS, version="v000001"):
        ref = DriftReference(np.asarray(counts, float), np.asarray(centroid), train_loss, version)
        return DriftMonitor(ref, window_events=window_events, top_items=top_items)
    return make


def observe(monitor, items, new_user_events=0, new=None, old=None, losses=None, weights=None):
    new = np.zeros((0, 2)) if new is None else np.asarray(new, float)
    monitor.observe_batch(items, new_user_events, old, new, losses, weights)


def test_empty_window_is_nan(make_monitor):
    snap = make_monitor().snapshot()
    assert snap.events == 0 and snap.batches == 0
    for value in (snap.unknown_item_ratio, snap.new_user_ratio, snap.psi, snap.js,
                  snap.centroid_distance, snap.loss_ratio):
        assert math.isnan(value)
    np.testing.assert_allclose(snap.expected, [0.5, 0.3, 0.2])
    assert snap.cosine_shift.shape == snap.vector_norm.shape == (0,)


def test_skewed_window_psi_and_js_by_hand(make_monitor):
    monitor = make_monitor()
    # recent: item 0 x20, item 1 x30, item 2 x50 -> [0.2, 0.3, 0.5] against [0.5, 0.3, 0.2]
    observe(monitor, events(i0=20, i1=30, i2=50))
    snap = monitor.snapshot()
    np.testing.assert_allclose(snap.actual, [0.2, 0.3, 0.5])
    assert snap.psi == pytest.approx(PSI_SKEW, rel=1e-8)
    assert snap.js == pytest.approx(JS_SKEW, rel=1e-8)
    assert snap.events == 100 and snap.unknown_item_ratio == 0.0 and snap.new_user_ratio == 0.0


def test_training_like_window_has_no_drift(make_monitor):
    monitor = make_monitor()
    observe(monitor, events(i2=2, i0=5, i1=3))  # 0.5, 0.3, 0.2 in any order
    snap = monitor.snapshot()
    assert snap.psi == pytest.approx(0.0, abs=1e-12)
    assert snap.js == pytest.approx(0.0, abs=1e-12)


def test_other_bucket_collects_items_outside_the_top(make_monitor):
    # five items; training 50, 30, 10, 5, 5: top-2 = [0, 1], other = 20 / 100
    monitor = make_monitor(counts=[50, 30, 10, 5, 5])
    # recent: items 2, 3, 4 are all "other": 20 + 30 + (10 + 25 + 15) = [0.2, 0.3, 0.5]
    observe(monitor, events(i0=20, i1=30, i2=10, i3=25, i4=15))
    snap = monitor.snapshot()
    np.testing.assert_allclose(snap.expected, [0.5, 0.3, 0.2])
    assert snap.psi == pytest.approx(PSI_SKEW, rel=1e-8)


def test_unknown_items_and_new_users_are_ratios_of_all_events(make_monitor):
    monitor = make_monitor()
    # 100 known (skewed as above) + 10 x -1 + 5 x item 7 (outside the model's 3 items) = 115
    items = np.concatenate([events(i0=20, i1=30, i2=50, unknown=10), np.full(5, 7)])
    observe(monitor, items, new_user_events=23)
    snap = monitor.snapshot()
    assert snap.unknown_item_ratio == pytest.approx(15 / 115)
    assert snap.new_user_ratio == pytest.approx(23 / 115)
    # popularity is over known items only: unchanged by the unknown ones
    assert snap.psi == pytest.approx(PSI_SKEW, rel=1e-8)
    # a batch of nothing but unknown items: ratios defined, popularity undefined
    only = make_monitor()
    observe(only, events(unknown=4), new_user_events=4)
    snap = only.snapshot()
    assert snap.unknown_item_ratio == 1.0 and snap.new_user_ratio == 1.0
    assert math.isnan(snap.psi) and math.isnan(snap.js)


def test_window_rolls_whole_batches(make_monitor):
    monitor = make_monitor(window_events=100)
    skewed = events(i0=20, i1=30, i2=50)  # PSI_SKEW
    trained = events(i0=50, i1=30, i2=20)  # PSI 0
    observe(monitor, skewed, new_user_events=100)
    observe(monitor, trained)
    # 200 events; dropping the oldest batch still leaves 100 >= window: it falls out
    snap = monitor.snapshot()
    assert (snap.events, snap.batches) == (100, 1)
    assert snap.psi == pytest.approx(0.0, abs=1e-12) and snap.new_user_ratio == 0.0


def test_window_keeps_the_shortest_suffix_with_enough_events(make_monitor):
    monitor = make_monitor(window_events=100)
    first = events(i2=60)  # 60 events on item 2
    second = events(i0=30, i1=30)
    third = events(i0=30, i2=30)
    observe(monitor, first, new_user_events=60)
    observe(monitor, second)
    # 120 events; without the first only 60 < 100: both stay
    snap = monitor.snapshot()
    assert (snap.events, snap.batches) == (120, 2)
    # actual = [30, 30, 60] / 120 = [0.25, 0.25, 0.5]
    np.testing.assert_allclose(snap.actual, [0.25, 0.25, 0.5])
    assert snap.new_user_ratio == pytest.approx(0.5)
    observe(monitor, third)
    # 180 events; without the first 120 >= 100: it goes; [60, 30, 30] / 120
    snap = monitor.snapshot()
    assert (snap.events, snap.batches) == (120, 2)
    np.testing.assert_allclose(snap.actual, [0.5, 0.25, 0.25])
    # PSI vs [0.5, 0.3, 0.2]: (0.25 - 0.3) ln(0.25/0.3) + (0.25 - 0.2) ln(0.25/0.2)
    #   = 0.05 * 0.182321557 + 0.05 * 0.223143551 = 0.020273255
    assert snap.psi == pytest.approx(0.020273255, rel=1e-7)
    assert snap.new_user_ratio == 0.0


def test_a_batch_larger_than_the_window_is_kept_whole(make_monitor):
    monitor = make_monitor(window_events=10)
    observe(monitor, events(i0=3))
    observe(monitor, events(i0=20, i1=30, i2=50))
    snap = monitor.snapshot()
    assert (snap.events, snap.batches) == (100, 1)
    assert snap.psi == pytest.approx(PSI_SKEW, rel=1e-8)


def test_vectors_shift_norms_and_centroid(make_monitor):
    monitor = make_monitor(window_events=4)
    # user a is new (None), user b moved from (1, 0) to (0, 2): orthogonal, shift 1
    observe(monitor, events(i0=2), new_user_events=1,
            new=[[5.0, 5.0], [0.0, 2.0]], old=[None, np.array([1.0, 0.0], np.float32)])
    snap = monitor.snapshot()
    np.testing.assert_allclose(snap.cosine_shift, [1.0])
    np.testing.assert_allclose(snap.vector_norm, [math.sqrt(50.0), 2.0])
    # mean of (5, 5), (0, 2) = (2.5, 3.5); from (1, 0): sqrt(1.5^2 + 3.5^2) / 1
    assert snap.centroid_distance == pytest.approx(math.sqrt(1.5**2 + 3.5**2))
    # all previous vectors as one array: every row has one; shifts are of this batch only
    observe(monitor, events(i1=2), new=[[2.0, 0.0], [0.0, 0.0]],
            old=np.array([[1.0, 0.0], [0.0, 0.0]]))
    snap = monitor.snapshot()
    np.testing.assert_allclose(snap.cosine_shift, [0.0, 0.0])  # same direction; both zero
    # window: both batches (4 events): mean of (5,5), (0,2), (2,0), (0,0) = (1.75, 1.75)
    assert snap.centroid_distance == pytest.approx(math.hypot(0.75, 1.75))
    # a third batch pushes the first out: mean of (2,0), (0,0), (1,0) = (1, 0) -> 0
    observe(monitor, events(i2=2), new=[[1.0, 0.0]], old=None)
    snap = monitor.snapshot()
    assert snap.batches == 2 and snap.centroid_distance == pytest.approx(0.0, abs=1e-12)
    assert snap.cosine_shift.shape == (0,)


def test_loss_ratio_is_the_weighted_window_loss_over_training(make_monitor):
    monitor = make_monitor(window_events=3, train_loss=0.5)
    # (0.4 * 1 + 0.8 * 3) / (1 + 3) = 0.7; / 0.5 = 1.4
    observe(monitor, events(i0=2), new=np.ones((2, 2)), losses=[0.4, 0.8], weights=[1.0, 3.0])
    assert monitor.snapshot().loss_ratio == pytest.approx(1.4)
    # a batch without weights counts each loss once:
    # (0.4 * 1 + 0.8 * 3 + 0.6 * 1) / (1 + 3 + 1) = 3.4 / 5 = 0.68; / 0.5 = 1.36
    observe(monitor, events(i1=1), new=np.ones((1, 2)), losses=[0.6])
    assert monitor.snapshot().loss_ratio == pytest.approx(1.36)
    # no training loss: undefined
    none = make_monitor(train_loss=None)
    observe(none, events(i0=1), new=np.ones((1, 2)), losses=[0.4])
    assert math.isnan(none.snapshot().loss_ratio)


def test_reset_empties_the_window_and_switches_reference(make_monitor):
    monitor = make_monitor()
    observe(monitor, events(i0=20, i1=30, i2=50), new_user_events=7, new=np.ones((3, 2)),
            losses=[1.0, 1.0, 1.0])
    monitor.reset()
    snap = monitor.snapshot()
    assert snap.events == 0 and math.isnan(snap.psi) and snap.version == "v000001"
    assert snap.vector_norm.shape == (0,)
    # a new model with four items, trained on 20, 30, 50, 0: top-2 = [2, 1]
    ref = DriftReference(np.array([20.0, 30.0, 50.0, 0.0]), np.array([0.0, 1.0, 0.0]),
                         0.25, "v000002")
    monitor.reset(ref)
    observe(monitor, events(i2=50, i1=30, i0=20), new=np.zeros((1, 3)))
    snap = monitor.snapshot()
    assert snap.version == "v000002"
    np.testing.assert_allclose(snap.expected, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(snap.actual, [0.5, 0.3, 0.2])
    assert snap.psi == pytest.approx(0.0, abs=1e-12)
    assert snap.centroid_distance == pytest.approx(1.0)  # zero mean vs (0, 1, 0)
    with pytest.raises(ConfigError, match=r"new_vectors must have shape \(m, 3\)"):
        observe(monitor, events(i0=1), new=np.ones((1, 2)))


def test_matches_a_brute_force_window_over_a_long_random_stream(make_monitor):
    rng = np.random.default_rng(5)
    n_items, k = 40, 4
    counts = rng.integers(0, 100, n_items).astype(float)
    centroid = rng.standard_normal(k)
    monitor = DriftMonitor(DriftReference(counts, centroid, 0.3), window_events=500,
                           top_items=8)
    batches = []
    for _ in range(400):  # enough evictions to re-sum the float totals several times
        e = int(rng.integers(0, 60))
        items = rng.integers(-1, n_items + 2, e)
        m = int(rng.integers(0, 10))
        new = rng.standard_normal((m, k))
        loss, weight = rng.random(m), rng.random(m) + 1
        nu = int(rng.integers(0, e + 1))
        monitor.observe_batch(items, nu, None, new, loss, weight)
        if e or m:
            batches.append((items, nu, new, loss, weight))
    # the window: the shortest suffix with >= 500 events
    total, start = 0, len(batches)
    while start > 0 and total < 500:
        start -= 1
        total += len(batches[start][0])
    window = batches[start:]
    items = np.concatenate([b[0] for b in window])
    known = items[(items >= 0) & (items < n_items)]
    top = fdrift.top_items(counts, 8)
    expected = fdrift.popularity_distribution(counts, top)
    actual = fdrift.popularity_distribution(np.bincount(known, minlength=n_items), top)
    vectors = np.concatenate([b[2] for b in window])
    loss = np.concatenate([b[3] for b in window])
    weight = np.concatenate([b[4] for b in window])
    snap = monitor.snapshot()
    assert snap.events == len(items) and snap.batches == len(window)
    assert snap.unknown_item_ratio == pytest.approx(1 - len(known) / len(items))
    assert snap.new_user_ratio == pytest.approx(sum(b[1] for b in window) / len(items))
    np.testing.assert_allclose(snap.actual, actual, rtol=1e-12)
    assert snap.psi == pytest.approx(fdrift.psi(expected, actual), rel=1e-9)
    assert snap.js == pytest.approx(fdrift.js_divergence(expected, actual), rel=1e-9)
    assert snap.centroid_distance == pytest.approx(fdrift.centroid_distance(vectors, centroid),
                                                   rel=1e-9)
    assert snap.loss_ratio == pytest.approx(np.dot(loss, weight) / weight.sum() / 0.3, rel=1e-9)


def test_rejects_bad_batches(make_monitor):
    monitor = make_monitor()
    with pytest.raises(ConfigError, match="new_user_events must be <= the batch's 2"):
        observe(monitor, events(i0=2), new_user_events=3)
    with pytest.raises(ConfigError, match="old_vectors must have one entry per new vector"):
        observe(monitor, events(i0=1), new=np.ones((2, 2)), old=[None])
    with pytest.raises(ConfigError, match="losses must have one entry"):
        observe(monitor, events(i0=1), new=np.ones((2, 2)), losses=[1.0])
    with pytest.raises(ConfigError, match="window_events must be an integer >= 1, got 0"):
        DriftMonitor(monitor.reference, window_events=0)


def test_reference_from_artifact():
    rng = np.random.default_rng(0)
    users = rng.random((4, 2), dtype=np.float32)
    artifact = ModelArtifact(
        item_factors=rng.random((3, 2), dtype=np.float32), user_factors=users,
        item_ids=["a", "b", "c"], user_ids=["u", "v", "w", "x"],
        metrics={"item_counts": [50, 30, 20], "train_loss": 0.125},
    )
    ref = DriftReference.from_artifact(artifact, version="v000003")
    np.testing.assert_array_equal(ref.item_counts, COUNTS)
    np.testing.assert_allclose(ref.user_centroid, users.astype(float).mean(axis=0))
    assert ref.train_loss == 0.125 and ref.version == "v000003"
    # explicit counts win; metrics without counts need them
    ref = DriftReference.from_artifact(artifact, item_counts=[1, 2, 3], train_loss=0.5)
    np.testing.assert_array_equal(ref.item_counts, [1, 2, 3])
    assert ref.train_loss == 0.5
    artifact.metrics = {}
    with pytest.raises(ConfigError, match="pass item_counts"):
        DriftReference.from_artifact(artifact)
    with pytest.raises(ConfigError, match=r"one entry per model item \(3\)"):
        DriftReference.from_artifact(artifact, item_counts=[1, 2])
    assert DriftReference.from_artifact(artifact, item_counts=[1, 2, 3]).train_loss is None


def test_publish_sets_gauges_and_histograms(make_monitor):
    metrics = Metrics(CollectorRegistry())
    monitor = make_monitor()
    observe(monitor, events(i0=20, i1=30, i2=50, unknown=25), new_user_events=25,
            new=[[3.0, 4.0], [0.0, 1.0]], old=[np.array([0.0, 1.0]), None],
            losses=[0.5, 0.5])
    publish(metrics, monitor.snapshot())
    get = metrics.registry.get_sample_value
    assert get("foldstream_unknown_item_ratio") == pytest.approx(0.2)
    assert get("foldstream_new_user_ratio") == pytest.approx(0.2)
    assert get("foldstream_item_popularity_psi") == pytest.approx(PSI_SKEW, rel=1e-8)
    assert get("foldstream_item_popularity_js_divergence") == pytest.approx(JS_SKEW, rel=1e-8)
    assert get("foldstream_foldin_loss_ratio") == pytest.approx(1.0)
    # mean of (3, 4), (0, 1) = (1.5, 2.5); from (1, 0): sqrt(0.25 + 6.25)
    assert get("foldstream_user_centroid_distance") == pytest.approx(math.sqrt(6.5))
    assert get("foldstream_user_vector_norm_count") == 2
    assert get("foldstream_user_vector_norm_sum") == pytest.approx(6.0)
    # (0, 1) -> (3, 4): cos = 4 / 5, shift 0.2
    assert get("foldstream_foldin_cosine_shift_count") == 1
    assert get("foldstream_foldin_cosine_shift_sum") == pytest.approx(0.2)
