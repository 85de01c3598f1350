"""The consumer service end to end, against the real broker and RocksDB."""

from __future__ import annotations

import json

import numpy as np
from confluent_kafka import Consumer as RdKafkaConsumer
from confluent_kafka import TopicPartition as RdTopicPartition

from streamer.kafka_io import make_consumer
from streamer.reader import StoreReader
from streamer.service import FoldService
from streamer.store import PartitionStore
from tests.streamer.conftest import encode_event, offline_vectors, run_until


def stream_events(synthetic_log, start: int, count: int, with_ids: bool = True) -> list[dict]:
    """Events ``start:start+count`` of the synthetic log, in the producer's JSON shape."""
    users, items = synthetic_log.user_ids.ids, synthetic_log.item_ids.ids
    out = []
    for row in range(start, start + count):
        event = {
            "user": users[synthetic_log.users[row]],
            "item": items[synthetic_log.items[row]],
            "ts": float(synthetic_log.timestamps[row]),
            "weight": float(synthetic_log.weights[row]),
        }
        if with_ids:
            event["event_id"] = f"e{row}"
        out.append(event)
    return out


def send_all(producer, topic: str, events: list[dict]) -> None:
    for event in events:
        key, value = encode_event(event)
        producer.send(topic, key=key, value=value)
    producer.flush()


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = make_consumer(bootstrap, None)
    try:
        partitions = consumer.partitions_for_topic(topic)
        from kafka import TopicPartition
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        got = []
        import time
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
        return got
    finally:
        consumer.close()


def latest_by_key(records) -> dict:
    latest = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        latest[r.key.decode()] = None if r.value is None else json.loads(r.value)
    return latest


def test_every_vector_equals_the_offline_fold_in(make_app_config, make_kafka_producer,
                                                  synthetic_log, trained_registry, kafka_broker):
    config = make_app_config(partitions=3)
    events = stream_events(synthetic_log, 3000, 1500)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)

    service = FoldService(config, consumer_overrides={})
    service.start()
    try:
        run_until(service, lambda s: s.stats.applied >= len(events))
    finally:
        service.close()

    expected = offline_vectors(trained_registry, events)
    assert service.stats.applied == len(events)
    assert service.stats.dead_lettered == 0
    assert service.stats.users_updated >= len(expected)
    # Each batch's time in the consumer (poll to acknowledgement) is part of the
    # event-to-published latency of every one of its events.
    assert sum(n for _, n in service.stats.consumer_ms) == len(events)
    for latencies, (in_consumer, n) in zip(service.stats.latencies_ms, service.stats.consumer_ms):
        assert n == len(latencies) and 0.0 <= in_consumer <= latencies.min()

    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        stored = reader.get_vectors(list(expected))
    assert set(stored) == set(expected)
    for user, vector in expected.items():
        np.testing.assert_allclose(stored[user].vector, vector, rtol=1e-5, atol=1e-6)
        assert stored[user].n_interactions == sum(e["user"] == user for e in events)

    published = latest_by_key(read_topic(kafka_broker.bootstrap, config.kafka.output_topic,
                                         expected=service.stats.published))
    assert set(published) == set(expected)
    for user, vector in expected.items():
        doc = published[user]
        assert doc["user"] == user and doc["model_version"] == "v000001"
        assert np.array_equal(np.asarray(doc["vector"], dtype=np.float32), stored[user].vector)


def test_librdkafka_consumer_decodes_published_vectors(make_app_config, make_kafka_producer,
                                                        synthetic_log, kafka_broker):
    config = make_app_config(partitions=1)
    events = stream_events(synthetic_log, 3000, 200)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)
    run_service(config, lambda s: s.stats.applied >= len(events))

    consumer = RdKafkaConsumer({"bootstrap.servers": kafka_broker.bootstrap,
                                "group.id": "rdkafka-reader", "enable.auto.commit": False})
    try:
        consumer.assign([RdTopicPartition(config.kafka.output_topic, 0, 0)])
        decoded = {}
        import time
        deadline = time.monotonic() + 30
        while len(decoded) < len({e["user"] for e in events}) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            doc = json.loads(msg.value())
            decoded[msg.key().decode()] = np.asarray(doc["vector"], dtype=np.float32)
    finally:
        consumer.close()
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        stored = reader.get_vectors(list(decoded))
    assert set(decoded) == {e["user"] for e in events}
    for user, vector in decoded.items():
        assert vector.shape == (8,)
        assert np.array_equal(vector, stored[user].vector)


def run_service(config, until, timeout_s: float = 60.0) -> FoldService:
    service = FoldService(config)
    service.start()
    try:
        run_until(service, until, timeout_s)
    finally:
        service.close()
    return service


def snapshot(config) -> dict:
    """Applied offsets, every vector (bytes, count) and every user with a history."""
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        offsets = reader.applied_offsets()
    state, users = {}, set()
    for p in range(config.kafka.input_partitions):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p) as store:
            for user, record in store.iter_vectors():
                state[user] = (record.vector.tobytes(), record.n_interactions)
            for user, history in store.iter_users():
                users.add(user)
    return {"offsets": offsets, "vectors": state, "users": users}


def test_redelivery_and_resent_event_ids_change_nothing(make_app_config, make_kafka_producer,
                                                       synthetic_log):
    config = make_app_config(partitions=2)
    events = stream_events(synthetic_log, 3000, 600)
    producer = make_kafka_producer()
    send_all(producer, config.kafka.input_topic, events)
    first = run_service(config, lambda s: s.stats.applied >= len(events))
    before = snapshot(config)

    # 1. Kafka redelivers already-applied records (offsets moved backwards): all skipped.
    service = FoldService(config)
    service.start()
    try:
        run_until(service, lambda s: len(s.stores) == 2)
        from kafka import TopicPartition
        for p in range(2):
            service.consumer.seek(TopicPartition(config.kafka.input_topic, p), 0)
        run_until(service, lambda s: s.stats.skipped_replayed >= len(events))
    finally:
        service.close()
    assert service.stats.applied == 0 and service.stats.published == 0
    assert snapshot(config) == before

    # 2. A producer re-sends the same events (same event_id, new offsets): dropped as duplicates.
    send_all(producer, config.kafka.input_topic, events[:300])
    again = run_service(config, lambda s: s.stats.consumed >= 300)
    assert again.stats.duplicates == 300 and again.stats.applied == 0
    assert again.stats.published == 0
    after = snapshot(config)
    assert after["vectors"] == before["vectors"]
    assert first.stats.applied == len(events)


def test_bad_input_is_dead_lettered_once_each_and_the_rest_applied(
        make_app_config, make_kafka_producer, synthetic_log, kafka_broker):
    config = make_app_config(partitions=1)
    good = stream_events(synthetic_log, 3000, 50)
    bad = [
        (b"u1", b"not json", "invalid_json"),
        (b"u1", b"\xff\xfe", "invalid_utf8"),
        (None, json.dumps({"user": "u1", "item": "i1"}).encode(), "missing_key"),
        (b"u1", json.dumps({"user": "u1"}).encode(), "missing_field"),
        (b"u1", json.dumps({"user": "u1", "item": "i1", "weight": -3}).encode(), "invalid_weight"),
        (b"u2", json.dumps({"user": "u1", "item": "i2"}).encode(), "key_mismatch"),
        (b"u1", json.dumps([1, 2]).encode(), "not_an_object"),
        (b"u1", json.dumps({"user": "u1", "item": "i1", "ts": "soon"}).encode(), "invalid_timestamp"),
    ]
    producer = make_kafka_producer()
    for i, event in enumerate(good):
        key, value = encode_event(event)
        producer.send(config.kafka.input_topic, key=key, value=value,
                      headers=[("trace", str(i).encode())])
        if i < len(bad):
            producer.send(config.kafka.input_topic, key=bad[i][0], value=bad[i][1],
                          headers=[("trace", b"bad")])
    producer.flush()
    service = run_service(config, lambda s: s.stats.consumed >= len(good) + len(bad))
    assert service.stats.applied == len(good)
    assert service.stats.dead_lettered == len(bad)

    dead = read_topic(kafka_broker.bootstrap, config.kafka.dead_letter_topic, expected=len(bad))
    assert len(dead) == len(bad)
    by_value = {r.value: dict(r.headers) for r in dead}
    for key, value, reason in bad:
        headers = by_value[value]
        assert headers["reason"] == reason.encode()
        assert headers["source_topic"] == config.kafka.input_topic.encode()
        assert headers["source_partition"] == b"0"
        assert int(headers["source_offset"]) >= 0
        assert headers["trace"] == b"bad"
        assert headers["detail"]


def test_tombstone_forgets_the_user_everywhere(make_app_config, make_kafka_producer,
                                              synthetic_log, kafka_broker):
    config = make_app_config(partitions=1)
    events = stream_events(synthetic_log, 3000, 100)
    producer = make_kafka_producer()
    send_all(producer, config.kafka.input_topic, events)
    victim = events[0]["user"]
    producer.send(config.kafka.input_topic, key=victim.encode(), value=None)
    producer.flush()
    service = run_service(config, lambda s: s.stats.consumed >= len(events) + 1)
    assert service.stats.forgotten == 1

    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        assert reader.get_vector(victim) is None
        assert reader.get_vector(events[-1]["user"]) is not None or events[-1]["user"] == victim
    assert victim not in snapshot(config)["users"]
    published = latest_by_key(read_topic(kafka_broker.bootstrap, config.kafka.output_topic,
                                         expected=service.stats.published))
    assert published[victim] is None

    # Events after the forget start a fresh history.
    send_all(producer, config.kafka.input_topic, [dict(events[0], event_id="after")])
    again = run_service(config, lambda s: s.stats.consumed >= 1)
    assert again.stats.applied == 1
    assert snapshot(config)["vectors"][victim][1] == 1


def test_latency_samples_are_bounded_to_the_most_recent(monkeypatch):
    from streamer import service

    monkeypatch.setattr(service, "LATENCY_SAMPLES", 10)
    stats = service.ServiceStats()
    for batch in range(6):
        stats.add_latencies(np.full(4, float(batch)), consumer_ms=batch / 10)
    kept = np.concatenate(stats.latencies_ms)
    assert kept.tolist() == [4.0] * 4 + [5.0] * 4  # the newest batches, at most 10 values
    assert stats.consumer_ms == [(0.4, 4), (0.5, 4)]  # trimmed alongside
    stats.clear_latencies()  # as the benchmark does between runs
    stats.add_latencies(np.ones(3))
    assert stats.latency_percentiles(50) == [1.0]
    assert np.isnan(stats.consumer_latency_percentiles(50)[0])  # no poll time given


def test_consumer_latency_is_per_event():
    from streamer import service

    stats = service.ServiceStats()
    stats.add_latencies(np.full(199, 50.0), consumer_ms=10.0)  # one batch of 199 events
    stats.add_latencies(np.full(1, 500.0), consumer_ms=400.0)  # and one of a single event
    assert stats.consumer_latency_percentiles(50, 99) == [10.0, 10.0]
    assert stats.consumer_latency_percentiles(100) == [400.0]
