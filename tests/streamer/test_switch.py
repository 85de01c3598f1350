"""Live model switches: per-partition re-fold, promote / rollback / retrain while consuming."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from factors.data import IdIndex, Interactions
from factors.pipeline import TrainParams, fold_in_users, train
from streamer.codec import UserHistory, VectorRecord
from streamer.metrics import Metrics
from streamer.model import LoadedModel
from streamer.monitor import ServiceMonitor
from streamer.observer import ServiceObserver
from streamer.registry import ActiveModel, ModelRegistry
from streamer.retrain import retrain_history
from streamer.service import FoldService
from streamer.store import PartitionStore
from streamer.switch import ModelCache, switch_partition
from streamer.verify import verify
from tests.streamer.conftest import TEST_PARAMS, offline_vectors, run_until, write_config
from tests.streamer.test_service import latest_by_key, read_topic, run_service, send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, wait_for

V1, V2 = "v000001", "v000002"


def reindexed(log: Interactions, rows) -> Interactions:
    """Events ``rows`` of ``log`` with ids indexed in order of first appearance.

    A model trained on it knows every id it was given and orders its items differently
    from one trained on ``log``'s own index: item indices of one model are wrong for the other.
    """
    users, items = IdIndex(), IdIndex()
    u = np.array([users.add(log.user_ids.id_of(int(log.users[r]))) for r in rows], np.int32)
    i = np.array([items.add(log.item_ids.id_of(int(log.items[r]))) for r in rows], np.int32)
    return Interactions(users=u, items=i, weights=log.weights[rows], timestamps=log.timestamps[rows],
                        user_ids=users, item_ids=items)


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory, trained_registry, synthetic_log) -> Path:
    """The session registry (v000001 active) plus v000002, trained on later events, not active."""
    root = tmp_path_factory.mktemp("switch-registry") / "models"
    shutil.copytree(trained_registry, root)
    later = reindexed(synthetic_log, np.arange(1500, 4500))
    ModelRegistry(root).add(train(later, TEST_PARAMS).artifact(later))
    return root


@pytest.fixture
def registry_dir(registry_template, tmp_path) -> Path:
    """A private copy of ``registry_template``: tests promote, roll back and retrain in it."""
    return Path(shutil.copytree(registry_template, tmp_path / "models"))


def histories_of(events: list[dict]) -> dict[str, UserHistory]:
    by_user: dict[str, list[dict]] = {}
    for e in events:
        by_user.setdefault(e["user"], []).append(e)
    return {user: UserHistory.empty().append([e["item"] for e in es], [e["weight"] for e in es],
                                             [e["ts"] for e in es], max_events=10_000).history
            for user, es in by_user.items()}


def assert_all_on(stores, version: str, expected: dict[str, np.ndarray], counts: dict[str, int],
                  published: dict | None) -> None:
    """Every partition and vector on ``version``, equal to the offline fold-in; outboxes empty."""
    stored: dict[str, VectorRecord] = {}
    for store in stores:
        assert store.model_version() == version, f"{store.name} on {store.model_version()}"
        assert list(store.iter_outbox()) == [], f"outbox of {store.name} not drained"
        stored.update(store.iter_vectors())
    assert set(stored) == set(expected)
    for user, vector in expected.items():
        record = stored[user]
        assert record.model_version == version, user
        assert record.n_interactions == counts[user], f"{user}: events lost or applied twice"
        np.testing.assert_allclose(record.vector, vector, rtol=1e-5, atol=1e-6)
        if published is not None:
            assert published[user]["model_version"] == version, user
            assert np.array_equal(np.asarray(published[user]["vector"], np.float32), record.vector)


def counts_of(events: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e["user"]] = counts.get(e["user"], 0) + 1
    return counts


# -- the switch itself, on a store ---------------------------------------------------------

def test_switch_partition_refolds_every_user_in_one_write(registry_dir, synthetic_log, tmp_path):
    registry = ModelRegistry(registry_dir)
    old, new = LoadedModel(registry.load(V1)), LoadedModel(registry.load(V2))
    assert old.item_index != new.item_index  # the same item has another row in each model
    histories = histories_of(stream_events(synthetic_log, 3000, 900))
    with PartitionStore.open(tmp_path / "state", "in", 0) as store:
        vectors, _ = old.fold(histories.values())
        records = dict(zip(histories, VectorRecord.many(
            vectors, V1, [len(h) for h in histories.values()],
            [h.last_event_time for h in histories.values()], time.time())))
        store.commit_batch(histories, records, [], offset=41, model_version=V1)
        store.ack_outbox([e.key for e in store.iter_outbox()])

        outcome = switch_partition(store, new, chunk_users=7)  # many chunks, one write

        assert (outcome.from_version, outcome.to_version, outcome.users) == (V1, V2, len(histories))
        assert store.model_version() == V2 and store.applied_offset() == 41
        stored = dict(store.iter_vectors())
        outbox = {e.user_id: e.record for e in store.iter_outbox()}
        assert set(stored) == set(outbox) == set(histories)
        artifact = registry.load(V2).artifact
        for user, history in histories.items():
            inter = reindexed_history(user, history)
            expected, _ = fold_in_users(artifact.item_factors, artifact.item_ids,
                                        TrainParams.from_dict(artifact.params), inter)
            assert stored[user] == outbox[user]
            assert stored[user].model_version == V2 and stored[user].n_interactions == len(history)
            np.testing.assert_allclose(stored[user].vector, expected[0], rtol=1e-5, atol=1e-6)


def reindexed_history(user: str, history: UserHistory) -> Interactions:
    items = IdIndex()
    i = np.array([items.add(item) for item in history.item_ids], np.int32)
    users = IdIndex()
    users.add(user)
    return Interactions(users=np.zeros(len(history), np.int32), items=i,
                        weights=np.asarray(history.weights), timestamps=np.asarray(history.times),
                        user_ids=users, item_ids=items)


def test_model_cache_keeps_the_active_model_and_one_other(registry_dir, synthetic_log):
    registry = ModelRegistry(registry_dir)
    third = reindexed(synthetic_log, np.arange(0, 2000))
    v3 = registry.add(train(third, TEST_PARAMS).artifact(third))
    cache = ModelCache(registry)
    active = cache.activate()
    assert active.version == V1 and cache.get(V1) is active
    two = cache.get(V2)
    assert cache.get(V2) is two and len(cache) == 2
    cache.get(v3)  # a third version evicts the other one, never the active one
    assert len(cache) == 2 and V1 in cache and v3 in cache and V2 not in cache
    assert cache.activate(v3).version == v3 and cache.get(V2) is not two
    assert len(cache) == 2 and v3 in cache and V2 in cache


def test_loss_of_the_fitted_rows_is_the_training_loss(synthetic_log):
    inter = reindexed(synthetic_log, np.arange(len(synthetic_log)))  # every id has events
    artifact = train(inter, TEST_PARAMS).artifact(inter)
    model = LoadedModel(ActiveModel(V1, artifact, Path(".")))
    rows: dict[int, list[int]] = {}
    for r in range(len(inter)):
        rows.setdefault(int(inter.users[r]), []).append(r)
    histories = [UserHistory.empty().append(
        [inter.item_ids.id_of(int(inter.items[r])) for r in rows[u]], inter.weights[rows[u]],
        inter.timestamps[rows[u]], max_events=10_000).history for u in range(len(inter.user_ids))]

    loss, weight = model.losses(histories, artifact.user_factors)
    assert np.dot(loss, weight) / weight.sum() == pytest.approx(artifact.metrics["train_loss"], rel=1e-6)
    # The exact fold-in minimises each row's loss against the same items: never above.
    vectors, _ = model.fold(histories)
    folded, _ = model.losses(histories, vectors)
    assert np.all(folded <= loss * (1 + 1e-6))


# -- the consumer, in this process -----------------------------------------------------------

def test_promote_then_rollback_refold_and_republish_every_partition(
        make_app_config, make_kafka_producer, registry_dir, synthetic_log, kafka_broker):
    config = make_app_config(partitions=2,
                             model={"registry_dir": registry_dir, "check_interval_s": 0.05})
    registry = ModelRegistry(registry_dir)
    producer = make_kafka_producer()
    first, later = stream_events(synthetic_log, 3000, 800), stream_events(synthetic_log, 3800, 400)
    events = first + later
    metrics = Metrics(CollectorRegistry())
    monitor = ServiceMonitor(ServiceObserver(metrics))
    get = metrics.registry.get_sample_value
    service = FoldService(config, on_batch=monitor.after_batch)
    monitor.model_loaded(service)

    def published() -> dict:
        return latest_by_key(read_topic(kafka_broker.bootstrap, config.kafka.output_topic,
                                        expected=service.stats.published))

    def on(version):
        return lambda s: all(st.model_version() == version for st in s.stores.values())

    service.start()
    try:
        send_all(producer, config.kafka.input_topic, first)
        run_until(service, lambda s: s.stats.applied >= len(first))
        assert service.stats.partitions_switched == 0
        assert 0 < get("foldstream_foldin_loss_ratio") < 10

        registry.promote(V2)
        send_all(producer, config.kafka.input_topic, later)  # applied while partitions switch
        run_until(service, lambda s: s.stats.applied >= len(events) and s.stats.partitions_switched == 2
                  and on(V2)(s))
        assert len(service.stores) == 2
        assert_all_on(service.stores.values(), V2, offline_vectors(registry_dir, events),
                      counts_of(events), published())
        assert get("foldstream_model_info", {"version": V2}) == 1
        assert get("foldstream_model_info", {"version": V1}) is None
        refolded = service.stats.users_refolded
        assert len(counts_of(first)) <= refolded <= len(counts_of(events))
        assert get("foldstream_users_refolded_total") == refolded

        registry.rollback()
        run_until(service, lambda s: s.stats.partitions_switched == 4 and on(V1)(s))
        assert service.stats.users_refolded - refolded == len(counts_of(events))
        assert_all_on(service.stores.values(), V1, offline_vectors(registry_dir, events),
                      counts_of(events), published())
        assert get("foldstream_model_info", {"version": V1}) == 1
        assert get("foldstream_vectors_published_total") == service.stats.published
    finally:
        service.close()
    report = verify(config)
    assert report.ok, report.lines()
    assert report.users_checked == len(counts_of(events)) and report.outbox_pending == 0


def test_partition_assigned_on_an_old_version_switches_before_its_batches(
        make_app_config, make_kafka_producer, registry_dir, synthetic_log, kafka_broker):
    config = make_app_config(partitions=2,
                             model={"registry_dir": registry_dir, "check_interval_s": 0.05})
    producer = make_kafka_producer()
    first, later = stream_events(synthetic_log, 3000, 600), stream_events(synthetic_log, 3600, 400)
    send_all(producer, config.kafka.input_topic, first)
    run_service(config, lambda s: s.stats.applied >= len(first))

    ModelRegistry(registry_dir).promote(V2)
    send_all(producer, config.kafka.input_topic, later)
    folded_on: set[str] = set()
    service = FoldService(config, on_batch=lambda s, outcomes: folded_on.update(
        r.model_version for o in outcomes for r in o.vectors.values()))
    service.start()
    try:
        run_until(service, lambda s: s.stats.applied >= len(later) and s.stats.partitions_switched == 2)
        assert folded_on == {V2}  # no batch was folded against the stores' old version
        assert service.stats.users_refolded == len(counts_of(first))
        assert_all_on(service.stores.values(), V2, offline_vectors(registry_dir, first + later),
                      counts_of(first + later), None)
    finally:
        service.close()
    assert verify(config).ok


# -- the consumer process, with the scheduler ----------------------------------------------

def test_retrain_while_events_flow_switches_every_user_to_the_new_model(
        make_app_config, make_kafka_producer, registry_dir, synthetic_log, kafka_broker, tmp_path):
    # The event trigger starts a retrain mid-stream; a loose gate promotes its candidate.
    config = make_app_config(
        partitions=2, processing={"batch_max_records": 100, "batch_max_ms": 10},
        model={"registry_dir": registry_dir, "check_interval_s": 0.1},
        retrain={"every_events": 1200, "min_events": 200, "tolerance": 0.99,
                 "check_interval_s": 0.3, "cooldown_s": 3600.0})
    path = write_config(config, tmp_path / "fs.toml")
    topic = config.kafka.input_topic
    registry = ModelRegistry(registry_dir)
    start, trickle, tail = (stream_events(synthetic_log, 3000, 1300),
                            stream_events(synthetic_log, 4300, 1000),
                            stream_events(synthetic_log, 5300, 300))
    events = start + trickle + tail
    producer = make_kafka_producer()

    def send_slowly() -> None:
        for i in range(0, len(trickle), 50):
            send_all(producer, topic, trickle[i:i + 50])
            time.sleep(0.2)

    consumer = ConsumerProcess(path, tmp_path / "consumer.log")
    sender = threading.Thread(target=send_slowly)
    try:
        send_all(producer, topic, start)
        sender.start()
        wait_for(lambda: registry.active_version() == "v000003", 40, "the retrain to promote")
        sender.join()
        send_all(producer, topic, tail)
        wait_for(lambda: applied_events(config) >= len(events), 30, "every event applied")
        wait_for(lambda: consumer.text().count("switched from model v000001 to v000003") == 2, 30,
                 "both partitions switched")
        wait_for(lambda: verify(config).ok, 30, "verify to pass", every_s=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; consumer log:\n{consumer.text()[-6000:]}") from None
    finally:
        if sender.ident is not None:
            sender.join()
        assert consumer.terminate() == 0, consumer.text()

    (record,) = retrain_history(registry_dir)
    assert record["outcome"] == "promoted" and record["trigger"] == "events", record
    assert record["input_records"] >= 1200 and record["new_version"] == "v000003"
    report = verify(config)
    assert report.ok and report.records_pending == 0 and report.outbox_pending == 0, report.lines()
    assert report.users_checked == len(counts_of(events))
    stores = [PartitionStore.open(config.store.state_dir, topic, p) for p in range(2)]
    try:
        published = latest_by_key(read_topic(kafka_broker.bootstrap, config.kafka.output_topic,
                                             expected=10**9, timeout_s=3))
        assert_all_on(stores, "v000003", offline_vectors(registry_dir, events), counts_of(events),
                      published)
    finally:
        for store in stores:
            store.close()
