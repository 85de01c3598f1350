"""Duplicate delivery to `foldstream run`: Kafka offsets reset backwards, and re-sent event ids.

The in-process versions (the service seeking backwards itself, one re-send) are in
tests/streamer/test_service.py; these drive the real command and end with `verify`.
"""

from __future__ import annotations

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from streamer.broker import free_port
from streamer.kafka_io import make_consumer
from tests.faults.conftest import assert_verified, committed_offsets, metric, stored_offsets, wait_running
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, snapshot, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, wait_for

COUNTERS = ("consumed", "applied", "replayed_skipped", "duplicate")


def run_to_end(config, path, log, total: int, port: int | None = None, expect: int = 1) -> dict[str, float]:
    """Run ``foldstream run`` until ``total`` records are applied, SIGTERM it; its counters
    once they count ``expect`` records consumed."""
    proc = ConsumerProcess(path, log)
    counts = {}
    try:
        wait_running(lambda: applied_events(config) >= total, 60, f"{total} records applied", proc)
        if port is not None:
            wait_for(lambda: metric(port, "foldstream_interactions_consumed_total") >= expect, 10,
                     "the counters to count every record read")
            counts = {c: metric(port, f"foldstream_interactions_{c}_total") for c in COUNTERS}
    finally:
        code = proc.terminate()
    assert code == 0, proc.text()
    return counts


def first_run(make_app_config, producer, events, first: int, tmp_path):
    """Config (with a metrics port), its file and port; ``events[:first]`` sent and applied
    by one ``foldstream run``; the state snapshot after it."""
    port = free_port()
    config = make_app_config(partitions=2, processing={"batch_max_records": 50, "batch_max_ms": 10},
                             metrics={"host": "127.0.0.1", "port": port})
    path = write_config(config, tmp_path / "fs.toml")
    send_all(producer, config.kafka.input_topic, events[:first])
    run_to_end(config, path, tmp_path / "first.log", first)
    return config, path, port, snapshot(config)


def test_offsets_reset_backwards_change_no_state(make_app_config, make_kafka_producer,
                                                 synthetic_log, tmp_path):
    # No event ids: a record applied a second time would lengthen its user's history.
    events = stream_events(synthetic_log, 3000, 1200, with_ids=False)
    producer = make_kafka_producer()
    config, path, port, before = first_run(make_app_config, producer, events, 1000, tmp_path)

    # Move the group's committed offsets backwards: partition 0 to the start, 1 to its middle.
    k = config.kafka
    rewind = {0: 0, 1: before["offsets"][f"{k.input_topic}-1"] // 2}
    admin = make_consumer(k.bootstrap_servers, k.group_id)
    try:
        admin.commit({TopicPartition(k.input_topic, p): OffsetAndMetadata(o, "", -1)
                      for p, o in rewind.items()})
    finally:
        admin.close(autocommit=False)
    assert committed_offsets(config) == rewind

    # The restart re-reads from the rewound offsets; the stored applied offsets decide.
    send_all(producer, config.kafka.input_topic, events[1000:])
    counts = run_to_end(config, path, tmp_path / "second.log", len(events), port, expect=200)
    assert counts == {"consumed": 200, "applied": 200, "replayed_skipped": 0, "duplicate": 0}
    assert committed_offsets(config) == {p: o + 1 for p, o in stored_offsets(config).items()}
    after = snapshot(config)
    untouched = before["users"] - {e["user"] for e in events[1000:]}
    assert untouched and all(after["vectors"][u] == before["vectors"][u] for u in untouched)
    assert_verified(config, events)


def test_resent_event_ids_are_dropped_as_duplicates(make_app_config, make_kafka_producer,
                                                    synthetic_log, tmp_path):
    events = stream_events(synthetic_log, 3000, 1000, with_ids=True)
    producer = make_kafka_producer()
    config, path, port, before = first_run(make_app_config, producer, events, len(events), tmp_path)

    # A producer retries the first 400 events (same event ids, new offsets): half of them
    # before the consumer restarts, half while it runs.
    send_all(producer, config.kafka.input_topic, events[:200])
    proc = ConsumerProcess(path, tmp_path / "second.log")
    try:
        wait_running(lambda: applied_events(config) >= len(events) + 200, 60, "first re-sends read", proc)
        send_all(producer, config.kafka.input_topic, events[200:400])
        wait_running(lambda: applied_events(config) >= len(events) + 400, 60, "all re-sends read", proc)
        wait_for(lambda: metric(port, "foldstream_interactions_consumed_total") >= 400, 10,
                 "the counters to count every re-send")
        counts = {c: metric(port, f"foldstream_interactions_{c}_total") for c in COUNTERS}
    finally:
        code = proc.terminate()
    assert code == 0, proc.text()
    assert counts == {"consumed": 400, "applied": 0, "replayed_skipped": 0, "duplicate": 400}
    after = snapshot(config)
    assert after["vectors"] == before["vectors"] and after["users"] == before["users"]
    assert_verified(config, events, records=len(events) + 400)
