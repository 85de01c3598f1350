"""factors.synth: determinism, popularity shape, releases, drift and the taste signal."""

import numpy as np
import pytest

from factors.errors import ConfigError
from factors.synth import (
    CLICK_WEIGHT,
    PURCHASE_WEIGHT,
    VIEW_WEIGHT,
    SynthParams,
    generate,
    generate_with_truth,
)


@pytest.fixture(scope="module")
def default_log():
    """The default-sized log and its truth, shared: generating is the slow part."""
    return generate_with_truth(SynthParams(events=30_000))


def quarter_distributions(inter, n_items):
    q = len(inter) // 4
    first = np.bincount(inter.items[:q], minlength=n_items) / q
    last = np.bincount(inter.items[-q:], minlength=n_items) / q
    return first, last


def test_same_seed_same_log_other_seed_other_log():
    params = SynthParams(users=300, items=200, events=5000, seed=7)
    a, b = generate(params), generate(params)
    for field in ("users", "items", "weights", "timestamps"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    c = generate(SynthParams(users=300, items=200, events=5000, seed=8))
    assert not np.array_equal(a.items, c.items)
    assert not np.array_equal(a.timestamps, c.timestamps)


def test_log_shape_ids_and_time_order(default_log):
    inter, _ = default_log
    p = SynthParams()
    assert len(inter) == 30_000
    assert inter.user_ids.ids[:2] == ["u0", "u1"] and len(inter.user_ids) == p.users
    assert inter.item_ids.id_of(45) == "i45" and len(inter.item_ids) == p.items
    assert inter.users.dtype == np.int32 and inter.items.dtype == np.int32
    assert inter.weights.dtype == np.float32 and inter.timestamps.dtype == np.float64
    ts = inter.timestamps
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] >= p.start_ts and ts[-1] <= p.start_ts + p.span_seconds
    assert ts[-1] - ts[0] > 0.9 * p.span_seconds


def test_weights_are_mostly_views(default_log):
    inter, _ = default_log
    kinds, counts = np.unique(inter.weights, return_counts=True)
    assert kinds.tolist() == [VIEW_WEIGHT, CLICK_WEIGHT, PURCHASE_WEIGHT]
    assert counts[0] > 0.8 * len(inter) and counts[2] < counts[1]


def test_item_popularity_is_heavy_tailed(default_log):
    inter, _ = default_log
    counts = np.sort(np.bincount(inter.items, minlength=SynthParams().items))[::-1]
    top_share = counts[: len(counts) // 100].sum() / len(inter)
    assert top_share > 0.25  # the top 1% of items: 25x their uniform share, or more
    users = np.sort(np.bincount(inter.users))[::-1]
    assert users[: len(users) // 100].sum() / len(inter) > 0.2


def test_new_items_never_appear_before_release(default_log):
    inter, truth = default_log
    first_seen = np.full(len(truth.release_ts), np.inf)
    np.minimum.at(first_seen, inter.items, inter.timestamps)
    assert np.all(first_seen >= truth.release_ts)
    new = truth.release_ts > SynthParams().start_ts
    assert new.sum() == round(0.2 * len(new))
    assert np.isfinite(first_seen[new]).sum() > 0.5 * new.sum()  # most new items do get events


def test_almost_all_mass_unreleased_still_terminates_and_respects_release():
    params = SynthParams(users=50, items=40, events=2000, new_item_fraction=0.95, seed=3)
    inter, truth = generate_with_truth(params)
    assert len(inter) == 2000
    assert np.all(inter.timestamps >= truth.release_ts[inter.items])


def test_drift_changes_popular_items_between_first_and_last_quarter():
    def change(drift):
        params = SynthParams(events=20_000, drift=drift, new_item_fraction=0.0, seed=1)
        first, last = quarter_distributions(generate(params), params.items)
        return 0.5 * np.abs(first - last).sum()  # total-variation distance

    still, drifting = change(0.0), change(1.0)
    assert drifting > still + 0.15


def test_events_follow_ground_truth_tastes(default_log):
    inter, truth = default_log
    at_event = np.einsum(
        "nk,nk->n",
        truth.user_factors_at(inter.timestamps[0])[inter.users],
        truth.item_factors[inter.items],
    )
    rng = np.random.default_rng(0)
    by_popularity = rng.choice(len(truth.item_popularity), size=len(inter), p=truth.item_popularity)
    baseline = np.einsum(
        "nk,nk->n", truth.user_start[inter.users], truth.item_factors[by_popularity]
    )
    assert at_event.mean() > baseline.mean() + 0.5


def test_user_factors_at_rotates_by_drift():
    inter, truth = generate_with_truth(SynthParams(users=20, items=30, events=10, drift=1.0))
    p = truth.params
    start, end = truth.user_factors_at(p.start_ts), truth.user_factors_at(p.start_ts + p.span_seconds)
    np.testing.assert_allclose(start, truth.user_start)
    np.testing.assert_allclose(np.einsum("uk,uk->u", start, end), 0.0, atol=1e-5)  # quarter turn
    np.testing.assert_allclose(np.linalg.norm(end, axis=1), np.linalg.norm(start, axis=1), rtol=1e-5)


def test_no_events_is_an_empty_log():
    inter = generate(SynthParams(users=3, items=4, events=0))
    assert len(inter) == 0 and len(inter.item_ids) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"users": 0}, "users must be >= 1, got 0"),
        ({"events": -1}, "events must be >= 0, got -1"),
        ({"items": 2.5}, "items must be an integer >= 1, got 2.5"),
        ({"drift": -0.1}, "drift must be >= 0, got -0.1"),
        ({"new_item_fraction": 1.0}, "new_item_fraction must be in [0, 1), got 1.0"),
        ({"span_seconds": 0.0}, "span_seconds must be > 0, got 0.0"),
        ({"temperature": float("nan")}, "temperature must be > 0, got nan"),
    ],
)
def test_params_validate(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SynthParams(**kwargs)
    assert str(err.value) == message
