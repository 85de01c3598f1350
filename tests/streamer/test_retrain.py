"""Retraining from a live store behind the quality gate (no Kafka needed: the store is filled directly)."""

from __future__ import annotations

import numpy as np
import pytest

from factors.pipeline import TrainParams, train
from factors.synth import SynthParams, generate
from streamer.codec import UserHistory
from streamer.config import AppConfig
from streamer.registry import ModelRegistry
from streamer.retrain import load_histories, retrain_history, retrain_once
from streamer.store import PartitionStore

PARAMS = TrainParams(factors=8, iterations=5, regularization=0.1, alpha=5.0, seed=4)


@pytest.fixture(scope="module")
def log():
    return generate(SynthParams(users=300, items=120, events=9000, seed=21, activity_exponent=0.8))


def fill_store(state_dir, topic, inter, partitions=2):
    """Write every user's events as its history, users spread over partitions."""
    by_user = {}
    for row in range(len(inter)):
        by_user.setdefault(int(inter.users[row]), []).append(row)
    for p in range(partitions):
        histories = {}
        for u, rows in by_user.items():
            if u % partitions != p:
                continue
            h = UserHistory.empty().append(
                [inter.item_ids.id_of(int(inter.items[r])) for r in rows],
                inter.weights[rows], inter.timestamps[rows], max_events=10_000).history
            histories[inter.user_ids.id_of(u)] = h
        with PartitionStore.open(state_dir, topic, p) as store:
            store.commit_batch(histories, {}, [], offset=len(histories))


def make_config(tmp_path, **retrain) -> AppConfig:
    return AppConfig().replace(store={"state_dir": tmp_path / "state"},
                               model={"registry_dir": tmp_path / "models"},
                               retrain={"min_events": 100, **retrain})


def test_load_histories_reads_every_event(tmp_path, log):
    config = make_config(tmp_path)
    fill_store(config.store.state_dir, config.kafka.input_topic, log)
    inter = load_histories(config.store.state_dir, config.kafka.input_topic)
    assert len(inter) == len(log)
    assert len(inter.user_ids) == len(np.unique(log.users))
    assert np.isclose(inter.weights.sum(), log.weights.sum())


def test_candidate_trained_on_more_data_is_promoted(tmp_path, log):
    config = make_config(tmp_path)
    early = log.subset(np.arange(len(log) // 4))
    registry = ModelRegistry(config.model.registry_dir)
    registry.promote(registry.add(train(early, PARAMS).artifact(early)))
    fill_store(config.store.state_dir, config.kafka.input_topic, log)

    record = retrain_once(config, trigger="test")
    assert record.outcome == "promoted", record.reason
    assert record.new_version == "v000002" == registry.active_version()
    assert record.events == len(log)
    assert record.candidate_metrics["ndcg"] >= record.current_metrics["ndcg"] * 0.98
    active = registry.load().artifact
    assert len(active.item_ids) > 0 and active.params["factors"] == PARAMS.factors
    (entry,) = retrain_history(config.model.registry_dir)
    assert entry["outcome"] == "promoted" and entry["trigger"] == "test" and entry["seconds"] > 0
    # The input records consumed, as the snapshot's applied offsets count them.
    applied = []
    for p in range(2):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p) as store:
            applied.append(store.applied_offset())
    assert entry["input_records"] == sum(offset + 1 for offset in applied)


def test_rejected_candidate_leaves_the_active_model_untouched(tmp_path, log):
    # The current model has seen the holdout (trained on everything): no candidate can match it.
    config = make_config(tmp_path, tolerance=0.0)
    registry = ModelRegistry(config.model.registry_dir)
    cheat = TrainParams(**{**PARAMS.as_dict(), "iterations": 15})
    registry.promote(registry.add(train(log, cheat).artifact(log)))
    before = (registry.root / "v000001" / "item_factors.npy").read_bytes()
    fill_store(config.store.state_dir, config.kafka.input_topic, log)

    record = retrain_once(config)
    assert record.outcome == "rejected", record
    assert "candidate" in record.reason
    assert registry.versions() == ["v000001"] and registry.active_version() == "v000001"
    assert (registry.root / "v000001" / "item_factors.npy").read_bytes() == before
    assert retrain_history(config.model.registry_dir)[-1]["outcome"] == "rejected"


def test_failures_and_small_stores_are_recorded_not_raised(tmp_path, log):
    config = make_config(tmp_path)
    assert retrain_once(config).outcome == "failed"  # no active model
    registry = ModelRegistry(config.model.registry_dir)
    small = log.subset(np.arange(50))
    registry.promote(registry.add(train(small, PARAMS).artifact(small)))
    fill_store(config.store.state_dir, config.kafka.input_topic, small)
    record = retrain_once(config)
    assert record.outcome == "skipped" and "min_events" in record.reason
    assert [e["outcome"] for e in retrain_history(config.model.registry_dir)] == ["failed", "skipped"]
