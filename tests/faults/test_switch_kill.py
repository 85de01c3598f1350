"""kill -9 in the middle of a live model switch: no partition is ever on two versions at once."""

from __future__ import annotations

import subprocess
import sys

from streamer.registry import ModelRegistry
from streamer.store import PartitionStore
from streamer.verify import verify
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, wait_for
from tests.streamer.test_switch import V1, V2, registry_dir, registry_template  # noqa: F401


def partition_versions(config) -> list[tuple[str | None, set[str]]]:
    """Per partition: the version in its meta, and the versions its vectors carry."""
    found = []
    for p in range(config.kafka.input_partitions):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p,
                                 create=False) as store:
            found.append((store.model_version(), {r.model_version for _, r in store.iter_vectors()}))
    return found


def crash(path, stage: str, n: int) -> None:
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.faults.crashing_consumer", str(path), stage, str(n)],
        capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr


def test_kill_during_a_model_switch_leaves_each_partition_on_one_version(
        make_app_config, make_kafka_producer, registry_dir, synthetic_log, tmp_path):  # noqa: F811
    # No event ids: an event applied twice would show up as a wrong history.
    config = make_app_config(partitions=2, processing={"batch_max_records": 50, "batch_max_ms": 10},
                             model={"registry_dir": registry_dir, "check_interval_s": 0.1})
    path = write_config(config, tmp_path / "fs.toml")
    producer = make_kafka_producer()
    first = stream_events(synthetic_log, 3000, 900, with_ids=False)
    later = stream_events(synthetic_log, 3900, 300, with_ids=False)
    send_all(producer, config.kafka.input_topic, first)
    consumer = ConsumerProcess(path, tmp_path / "first.log")
    try:
        wait_for(lambda: applied_events(config) >= len(first), 60, "the first events applied")
    finally:
        assert consumer.terminate() == 0, consumer.text()
    assert partition_versions(config) == [(V1, {V1})] * 2

    ModelRegistry(registry_dir).promote(V2)  # each start switches the stores first
    crash(path, "switch_before_write", 1)
    assert partition_versions(config) == [(V1, {V1})] * 2
    crash(path, "switch_after_write", 1)
    assert sorted(partition_versions(config)) == [(V1, {V1}), (V2, {V2})]

    send_all(producer, config.kafka.input_topic, later)
    survivor = ConsumerProcess(path, tmp_path / "survivor.log")
    try:
        wait_for(lambda: applied_events(config) >= len(first) + len(later), 60, "every event applied")
        wait_for(lambda: "switched from model v000001 to v000002" in survivor.text(), 30,
                 "the other partition switched")
        wait_for(lambda: verify(config).ok, 30, "verify to pass", every_s=1.0)
    finally:
        assert survivor.terminate() == 0, survivor.text()
    assert survivor.text().count("switched from model") == 1  # the switched one was kept
    assert partition_versions(config) == [(V2, {V2})] * 2
    report = verify(config)
    assert report.ok, report.lines()
    assert report.records_pending == 0 and report.outbox_pending == 0
    assert report.users_checked == len({e["user"] for e in first + later})
