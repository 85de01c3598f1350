"""SIGTERM mid-stream: the consumer finishes its batch, commits, exits 0; a restart replays nothing."""

from __future__ import annotations

from streamer.broker import free_port
from streamer.verify import verify
from tests.faults.conftest import assert_verified, committed_offsets, metric, stored_offsets, wait_running
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, wait_for


def test_sigterm_mid_stream_stops_cleanly_and_restart_replays_nothing(
        make_app_config, make_kafka_producer, synthetic_log, tmp_path):
    # Small batches: the signal lands while plenty is left to do. No event ids: a replayed
    # event would be applied again and show up as a wrong history.
    config = make_app_config(partitions=2, processing={"batch_max_records": 10, "batch_max_ms": 10})
    events = stream_events(synthetic_log, 3000, 3000, with_ids=False)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)

    first = ConsumerProcess(write_config(config, tmp_path / "fs.toml"), tmp_path / "first.log")
    try:
        wait_running(lambda: applied_events(config) >= len(events) // 5, 60, "a fifth applied", first)
    finally:
        code = first.terminate()
    assert code == 0, first.text()
    assert "stopped: applied" in first.text()

    # Finished its batch: everything applied is published (outboxes empty) and committed.
    stored = stored_offsets(config)
    applied = sum(offset + 1 for offset in stored.values())
    assert 0 < applied < len(events), stored
    assert committed_offsets(config) == {p: offset + 1 if offset >= 0 else None
                                         for p, offset in stored.items()}
    report = verify(config)
    assert report.ok, report.lines()
    assert report.outbox_pending == 0 and report.records_pending == len(events) - applied

    # The restart starts right after the applied offsets: nothing skipped as replayed.
    port = free_port()
    restarted_config = config.replace(metrics={"host": "127.0.0.1", "port": port})
    second = ConsumerProcess(write_config(restarted_config, tmp_path / "fs2.toml"), tmp_path / "second.log")
    try:
        wait_running(lambda: applied_events(config) >= len(events), 90, "all events applied", second)
        wait_for(lambda: metric(port, "foldstream_interactions_consumed_total") >= len(events) - applied,
                 10, "the restart's metrics to count every record it read")
        consumed = metric(port, "foldstream_interactions_consumed_total")
        replayed = metric(port, "foldstream_interactions_replayed_skipped_total")
    finally:
        assert second.terminate() == 0, second.text()
    assert (replayed, consumed) == (0, len(events) - applied)
    assert_verified(config, events)
