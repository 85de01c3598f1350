import numpy as np
import pytest

from factors.data import IdIndex, Interactions
from factors.errors import ConfigError
from factors.evaluate import temporal_split
from factors.pipeline import TrainParams, evaluate, fold_in_users, train
from factors.synth import SynthParams, generate

PARAMS = TrainParams(factors=8, iterations=5, regularization=0.1, alpha=5.0, seed=1)


@pytest.fixture(scope="module")
def log():
    return generate(SynthParams(users=200, items=80, events=4000, seed=5))


def test_artifact_keeps_only_ids_seen_in_training(log):
    early, _ = temporal_split(log, 0.3)
    result = train(early, PARAMS)
    art = result.artifact(early)
    seen_items = {early.item_ids.id_of(i) for i in np.unique(early.items)}
    seen_users = {early.user_ids.id_of(u) for u in np.unique(early.users)}
    assert set(art.item_ids) == seen_items and set(art.user_ids) == seen_users
    assert len(seen_items) < len(log.item_ids)  # the split really hides some items
    rows = {u: i for i, u in enumerate(early.user_ids.ids)}
    for row, user in enumerate(art.user_ids):
        assert np.array_equal(art.user_factors[row], result.model.user_factors_[rows[user]])


def test_fold_in_of_training_users_matches_one_more_user_half_step(log):
    result = train(log, PARAMS)
    art = result.artifact(log)
    vectors, unknown = fold_in_users(art.item_factors, art.item_ids, PARAMS, log)
    assert unknown.sum() == 0
    # One more exact user half-step against the final item factors, done by the estimator.
    expected, _ = result.model.fold_in(result.weights.indptr, result.weights.indices,
                                       result.weights.data)
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)


def test_fold_in_counts_unknown_items_and_ignores_them():
    users, items = IdIndex.from_ids(["a", "b"]), IdIndex.from_ids(["x", "y", "new"])
    inter = Interactions(users=np.array([0, 0, 1, 1], np.int32), items=np.array([0, 2, 2, 2], np.int32),
                         weights=np.ones(4, np.float32), timestamps=np.arange(4.0),
                         user_ids=users, item_ids=items)
    Y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    vectors, unknown = fold_in_users(Y, ["x", "y"], TrainParams(factors=2), inter)
    assert unknown.tolist() == [1, 2]
    assert np.all(vectors[1] == 0) and vectors[0][0] > 0


@pytest.mark.parametrize("mode", ["batch", "prequential"])
def test_evaluate_reports_metrics(log, mode):
    out = evaluate(log, PARAMS, cutoff=0.7, k=5, mode=mode)
    assert out["train_events"] + out["test_events"] == len(log)
    if mode == "batch":
        assert 0 <= out["ndcg"] <= 1 and out["users"] > 0
    else:
        assert out["foldin"]["events"] == out["stale"]["events"] == out["test_events"]
        assert out["foldin"]["hit_rate"] >= 0


@pytest.mark.parametrize("field, value, message", [
    ("factors", 0, "factors must be >= 1, got 0"),
    ("solver", "lu", "solver must be one of"),
    ("iterations", 0, "iterations must be >= 1"),
    ("alpha", -1.0, "alpha"),
])
def test_train_params_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainParams(**{field: value})


def test_artifact_records_training_events_per_item(log):
    result = train(log, PARAMS)
    art = result.artifact(log)
    counts = dict(zip(art.item_ids, art.metrics["item_counts"]))
    for item in art.item_ids[:10]:
        assert counts[item] == int(np.sum(log.items == log.item_ids.index(item)))


def test_train_params_round_trip_through_a_model_dict_ignoring_unknown_keys():
    params = TrainParams(factors=7, solver="cholesky", half_life_seconds=60.0)
    assert TrainParams.from_dict({**params.as_dict(), "added_by_a_newer_version": 1}) == params
