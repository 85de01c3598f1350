import numpy as np
import pytest

from factors.errors import ConfigError
from factors.evaluate import temporal_split
from factors.gate import decide, score_model
from factors.pipeline import TrainParams, train
from factors.synth import SynthParams, generate

PARAMS = TrainParams(factors=8, iterations=6, regularization=0.1, alpha=5.0, seed=2)


@pytest.fixture(scope="module")
def split():
    log = generate(SynthParams(users=300, items=100, events=8000, seed=9, activity_exponent=0.8))
    return temporal_split(log, 0.85)


def test_trained_model_beats_random_factors_and_the_gate_says_so(split):
    history, holdout = split
    art = train(history, PARAMS).artifact(history)
    good = score_model(art.item_factors, art.item_ids, PARAMS, history, holdout, k=10)
    noise = np.random.default_rng(0).normal(size=art.item_factors.shape).astype(np.float32)
    bad = score_model(noise, art.item_ids, PARAMS, history, holdout, k=10)
    assert good["users"] == bad["users"] > 0
    assert good["ndcg"] > bad["ndcg"]
    assert decide(good, bad).promote is False
    assert "ndcg" in decide(good, bad).reason
    assert decide(bad, good).promote is True
    assert decide(good, good).promote is True


def test_items_unknown_to_a_model_are_relevant_but_unrecommendable(split):
    history, holdout = split
    art = train(history, PARAMS).artifact(history)
    keep = len(art.item_ids) // 2
    partial = score_model(art.item_factors[:keep], art.item_ids[:keep], PARAMS, history, holdout)
    full = score_model(art.item_factors, art.item_ids, PARAMS, history, holdout)
    assert partial["unrecommendable"] > full["unrecommendable"]
    assert partial["relevant"] == full["relevant"]


def test_tolerance_is_validated():
    with pytest.raises(ConfigError, match="tolerance must be in"):
        decide({"ndcg": 1, "recall": 1}, {"ndcg": 1, "recall": 1}, tolerance=1.5)
