"""Disk full under the state dir: the consumer fail-stops, commits and publishes nothing it did
not write, and after space is freed a restart catches up and `verify` passes.

What RocksDB does (rocksdict 0.3, on tmpfs): the WriteBatch's WAL append fails with
``IO error: No space left on device: While appending to file: .../000004.log``, which
``PartitionStore.commit_batch`` raises as ``StateStoreError``. The database then stays in
its background-error state: every later write fails the same way even after space is
freed, and ``close()`` reports ``Writer has previous error``; reopening it (a new process)
works, and the batch that failed is absent.
"""

from __future__ import annotations

import json


from streamer.reader import snapshot
from streamer.verify import read_topic, verify
from tests.faults.conftest import (
    assert_verified,
    committed_offsets,
    fill_disk,
    stored_offsets,
    wait_running,
)
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events


def test_disk_full_fail_stops_then_resumes_after_space_is_freed(
        make_app_config, make_kafka_producer, synthetic_log, small_disk, tmp_path):
    config = make_app_config(partitions=2, store={"state_dir": small_disk / "state"},
                             processing={"batch_max_records": 50, "batch_max_ms": 10})
    path = write_config(config, tmp_path / "fs.toml")
    events = stream_events(synthetic_log, 3000, 1200, with_ids=False)
    producer = make_kafka_producer()
    send_all(producer, config.kafka.input_topic, events[:600])

    consumer = ConsumerProcess(path, tmp_path / "full.log")
    try:
        wait_running(lambda: applied_events(config) >= 600, 60, "the first events applied", consumer)
        filler = fill_disk(small_disk)
        send_all(producer, config.kafka.input_topic, events[600:])
        code = consumer.proc.wait(60)
    finally:
        if consumer.proc.poll() is None:
            consumer.kill()
    consumer.log.close()

    # Fail-stop, saying why: the write that failed, not a follow-on error of closing its store
    # (which says "Writer has previous error", or "No space left" of a flush at close).
    text = consumer.text()
    last = text.splitlines()[-1]
    assert code != 0, text[-3000:]
    assert "No space left on device" in last and "error: closing" not in last, text[-3000:]

    # Nothing committed to Kafka past what the stores hold.
    stored = stored_offsets(config)
    assert 600 <= sum(o + 1 for o in stored.values()) < len(events), stored
    for partition, committed in committed_offsets(config).items():
        assert committed is None or committed <= stored[partition] + 1, (partition, committed, stored)

    # Nothing published that the stores do not hold: the newest vector per user is the stored
    # one (or still in an outbox), and no message counts more events than the stored history.
    report = verify(config)
    assert report.ok, report.lines()
    assert report.records_pending == len(events) - sum(o + 1 for o in stored.values())
    with snapshot(config.store.state_dir, config.kafka.input_topic) as stores:
        stored_counts = {u: len(h) for store in stores.values() for u, h in store.iter_users()}
    output = read_topic(config.kafka.bootstrap_servers, config.kafka.output_topic)
    for record in (r for records in output.values() for r in records):
        doc = json.loads(record.value)
        assert doc["interactions"] <= stored_counts[doc["user"]], doc

    # Free the space: a restart reopens the databases and catches up.
    filler.unlink()
    survivor = ConsumerProcess(path, tmp_path / "after.log")
    try:
        wait_running(lambda: applied_events(config) >= len(events), 60, "every event applied", survivor)
    finally:
        assert survivor.terminate() == 0, survivor.text()
    assert_verified(config, events)
