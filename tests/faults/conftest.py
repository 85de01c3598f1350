"""The fault tests use the streaming fixtures: a trained registry and app configs on the test broker.

Helpers shared by the fault modules: what Kafka and the stores say about offsets, the
consumer's Prometheus counters, a producer that keeps sending while a fault happens, and
the oracle every fault test ends with.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streamer.kafka_io import make_consumer, make_producer
from streamer.reader import StoreReader
from streamer.verify import verify
from tests.streamer.conftest import encode_event, make_app_config, synthetic_log, trained_registry  # noqa: F401
from tests.streamer.test_service_processes import ConsumerProcess


class ModuleProcess(ConsumerProcess):
    """``python -m MODULE ARGS...`` (a patched consumer) as a child process, logging like ConsumerProcess."""

    def __init__(self, module: str, args: list[str], log_path: Path) -> None:
        self._spawn([sys.executable, "-m", module, *map(str, args)], log_path)


def committed_offsets(config) -> dict[int, int | None]:
    """The group's committed Kafka offset per input partition (None: nothing committed)."""
    k = config.kafka
    consumer = make_consumer(k.bootstrap_servers, k.group_id)
    try:
        return {p: consumer.committed(TopicPartition(k.input_topic, p), timeout_ms=10_000)
                for p in range(k.input_partitions)}
    finally:
        consumer.close(autocommit=False)


def stored_offsets(config) -> dict[int, int]:
    """The applied offset each partition store holds (-1: nothing applied, or no store yet)."""
    offsets = {p: -1 for p in range(config.kafka.input_partitions)}
    prefix = f"{config.kafka.input_topic}-"
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        for name, offset in reader.applied_offsets().items():
            offsets[int(name[len(prefix):])] = offset
    return offsets


def metric(port: int, name: str) -> float:
    """One unlabelled sample of a ``foldstream run`` process's /metrics (0.0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


class BackgroundProducer:
    """Sends ``events`` from a thread at about ``rate`` per second; :meth:`join` waits for the acks.

    ``hold_at``: after that many events the thread waits until :meth:`release`, so a test can
    make sure the rest is sent after something it does (a freeze, a kill), however slow the host.
    """

    def __init__(self, bootstrap: str, topic: str, events: list[dict], rate: float,
                 hold_at: int | None = None) -> None:
        self.bootstrap, self.topic, self.events, self.rate = bootstrap, topic, events, rate
        self.hold_at = hold_at
        self.sent = 0
        self._released = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-producer", daemon=True)

    def start(self) -> "BackgroundProducer":
        self._thread.start()
        return self

    def release(self) -> None:
        """Let a producer held at ``hold_at`` go on."""
        self._released.set()

    def _run(self) -> None:
        producer = make_producer(self.bootstrap)
        try:
            started = time.monotonic()
            for n, event in enumerate(self.events):
                if n == self.hold_at:
                    self._released.wait()
                    started = time.monotonic() - n / self.rate
                lead = started + n / self.rate - time.monotonic()
                if lead > 0:
                    time.sleep(lead)
                key, value = encode_event(event)
                producer.send(self.topic, key=key, value=value)
                self.sent = n + 1
            producer.flush(timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            producer.close(timeout=5)

    def join(self, timeout_s: float = 90.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"producer still sending after {timeout_s}s ({self.sent} sent)"
        assert self.error is None, f"producer failed: {self.error!r}"


def assert_verified(config, events: list[dict], records: int | None = None) -> None:
    """The oracle: every record applied exactly once, every vector right and published.

    ``records``: how many records the input topic holds (default ``len(events)``).
    """
    report = verify(config)
    assert report.ok, report.lines()
    assert report.records_pending == 0 and report.outbox_pending == 0, report.lines()
    assert report.records_read == (len(events) if records is None else records), report.lines()
    assert report.users_checked == len({e["user"] for e in events}), report.lines()


def wait_running(predicate, timeout_s: float, what: str, *procs, every_s: float = 0.1) -> None:
    """Wait for ``predicate()`` while every ConsumerProcess in ``procs`` keeps running;
    on a timeout or an early exit, fail with the processes' logs."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        exited = [p for p in procs if p.proc.poll() is not None]
        if exited or time.monotonic() > deadline:
            why = (f"consumer exited with {exited[0].proc.returncode}" if exited
                   else f"timed out after {timeout_s}s")
            logs = "\n".join(f"--- {p.log_path.name}:\n{p.text()[-4000:]}" for p in procs)
            raise AssertionError(f"{why} waiting for {what}\n{logs}")
        time.sleep(every_s)


DISK_BYTES = 32 * 2**20


def _is_small_fs(path: Path) -> bool:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize == DISK_BYTES


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 32 MiB tmpfs to fill up; yields a directory path on it that any process can use.

    Tries, in order: a user+mount namespace of a holder process (``unshare -rm``; works
    unprivileged, and the mount vanishes with the holder), reached from outside through
    ``/proc/<holder>/root``; then a plain ``mount -t tmpfs`` (needs root; unmounted at
    teardown). Skips when neither is allowed.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    tried = []
    if shutil.which("unshare"):
        holder = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c",
             f"mount -t tmpfs -o size={DISK_BYTES} tmpfs '{mount_point}' && echo mounted && exec sleep 3600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = holder.stdout.readline().strip() == "mounted"
        path = Path(f"/proc/{holder.pid}/root{mount_point}")
        try:
            if ready and _is_small_fs(path):
                yield path
                return
            why = holder.stderr.read().strip() if not ready else "not a small fs"
            tried.append(f"unshare -rm + mount -t tmpfs: {why}")
        finally:
            holder.kill()
            holder.wait()
    else:
        tried.append("unshare: not installed")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode == 0:
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
        return
    tried.append(f"mount -t tmpfs: {done.stderr.strip()}")
    pytest.skip("cannot mount a small tmpfs here; tried " + "; ".join(tried))


def fill_disk(path: Path) -> Path:
    """Write ``path/filler`` until the filesystem is full; returns the filler's path."""
    filler = path / "filler"
    block = b"\0" * 2**16
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    with open(filler, "ab", buffering=0) as fh:  # the last partial block
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler
