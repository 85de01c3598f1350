"""The consumer as real processes: kill -9 mid-stream, and two processes in one group."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from streamer.reader import StoreReader
from streamer.store import PartitionStore
from tests.streamer.conftest import offline_vectors, write_config
from tests.streamer.test_service import latest_by_key, read_topic, send_all, stream_events


class ConsumerProcess:
    """``foldstream run --config FILE`` as a child process, its stderr captured to a file."""

    STARTED = b"SIGTERM/SIGINT finish the batch"  # logged once the stop handlers are in place

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self._spawn([sys.executable, "-m", "streamer.cli", "run", "--config", str(config_path),
                     "--quiet"], log_path)

    def _spawn(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.log_start = self.log.tell()  # several processes may share one log
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def started(self) -> bool:
        """True once this process logged that SIGTERM stops it cleanly (Python's imports
        come first, and a SIGTERM during them ends the process with the default action)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return self.STARTED in f.read()

    def terminate(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and not self.started() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self.log.close()
        return code

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


def applied_events(config) -> int:
    """Events applied so far, read beside the running consumer (offset + 1 per partition)."""
    if not Path(config.store.state_dir).exists():
        return 0
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        return sum(offset + 1 for offset in reader.applied_offsets().values())


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def assert_state_matches(config, registry_dir, events, bootstrap) -> None:
    expected = offline_vectors(registry_dir, events)
    counts = {}
    for e in events:
        counts[e["user"]] = counts.get(e["user"], 0) + 1
    stored = {}
    for p in range(config.kafka.input_partitions):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p) as store:
            assert list(store.iter_outbox()) == [], f"outbox of partition {p} not drained"
            stored.update(dict(store.iter_vectors()))
    assert set(stored) == set(expected)
    for user, vector in expected.items():
        assert stored[user].n_interactions == counts[user], f"{user}: events lost or applied twice"
        np.testing.assert_allclose(stored[user].vector, vector, rtol=1e-5, atol=1e-6)
    published = latest_by_key(read_topic(bootstrap, config.kafka.output_topic, expected=10**9,
                                         timeout_s=5))
    assert set(published) == set(expected)
    for user in expected:
        assert np.array_equal(np.asarray(published[user]["vector"], np.float32), stored[user].vector)


def test_kill_9_at_several_points_loses_and_repeats_nothing(
        make_app_config, make_kafka_producer, synthetic_log, trained_registry, kafka_broker, tmp_path):
    # No event ids: a double-applied event would show in the counts and the vectors.
    config = make_app_config(partitions=2, processing={"batch_max_records": 40, "batch_max_ms": 10})
    config_path = write_config(config, tmp_path / "fs.toml")
    events = stream_events(synthetic_log, 3000, 2400, with_ids=False)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)

    log = tmp_path / "consumer.log"
    for fraction in (0.15, 0.4, 0.7):
        proc = ConsumerProcess(config_path, log)
        wait_for(lambda: applied_events(config) >= fraction * len(events), 90,
                 f"{fraction:.0%} applied")
        proc.kill()
    proc = ConsumerProcess(config_path, log)
    wait_for(lambda: applied_events(config) >= len(events), 90, "all events applied")
    time.sleep(0.5)  # let it publish and drain the outbox of the last batch
    assert proc.terminate() == 0, proc.text()
    assert applied_events(config) == len(events)
    assert_state_matches(config, trained_registry, events, kafka_broker.bootstrap)


def test_two_processes_share_partitions_and_equal_one_process(
        make_app_config, make_kafka_producer, synthetic_log, trained_registry, kafka_broker, tmp_path):
    config = make_app_config(partitions=4, processing={"batch_max_records": 50, "batch_max_ms": 10})
    config_path = write_config(config, tmp_path / "fs.toml")
    events = stream_events(synthetic_log, 3000, 2000, with_ids=False)
    a = ConsumerProcess(config_path, tmp_path / "a.log")
    b = ConsumerProcess(config_path, tmp_path / "b.log")
    try:
        # Both members must have joined before the events arrive, so both get work.
        wait_for(lambda: "assignment" in a.text() and "assignment" in b.text(), 60, "both assigned")
        send_all(make_kafka_producer(), config.kafka.input_topic, events)
        wait_for(lambda: applied_events(config) >= len(events), 120, "all events applied")
        time.sleep(0.5)
        # Ownership while both ran (stopping one moves its partitions to the other).
        owned = [last_assignment(p.text()) for p in (a, b)]
    finally:
        codes = (a.terminate(), b.terminate())
    assert codes == (0, 0), (a.text(), b.text())
    assert owned[0] and owned[1], owned
    assert owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == {0, 1, 2, 3}
    assert_state_matches(config, trained_registry, events, kafka_broker.bootstrap)


def last_assignment(log_text: str) -> set[int]:
    """Partitions a process held at the end, from its 'assignment: +[...] -[...]' log lines."""
    owned: set[int] = set()
    for added, removed in re.findall(r"assignment: \+\[(.*?)\] -\[(.*?)\]", log_text):
        owned -= {int(p) for p in re.findall(r"partition=(\d+)", removed)}
        owned |= {int(p) for p in re.findall(r"partition=(\d+)", added)}
    return owned
