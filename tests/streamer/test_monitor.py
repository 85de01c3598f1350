"""ServiceMonitor: when the slower readings (lag, store and cache sizes) reach the metrics."""

from __future__ import annotations

from types import SimpleNamespace

from kafka import TopicPartition

from prometheus_client import CollectorRegistry

from streamer import monitor as monitor_module
from streamer.metrics import Metrics
from streamer.monitor import ServiceMonitor
from streamer.observer import ServiceObserver
from streamer.service import ServiceStats


class FakeStore:
    def __init__(self, applied: int) -> None:
        self.applied = applied

    def applied_offset(self) -> int:
        return self.applied

    def disk_bytes(self) -> int:
        return 1000

    def estimated_keys(self) -> dict[str, int]:
        return {"vectors": 3}


def fake_service(highwater: dict) -> SimpleNamespace:
    """What ServiceMonitor reads of a FoldService: two partitions, one rebalance seen."""
    stores = {TopicPartition("in", 0): FakeStore(9), TopicPartition("in", 1): FakeStore(4)}
    return SimpleNamespace(
        model=SimpleNamespace(version="v1"), registry=None, stats=ServiceStats(rebalances=1),
        stores=stores, last_applied=(),
        consumer=SimpleNamespace(highwater=lambda tp: highwater.get(tp.partition)),
        processor=SimpleNamespace(cache_sizes=lambda: (10, 20, 1, 2)),
    )


def test_a_lag_unknown_at_the_slow_reading_is_read_again_at_the_next_turn(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(monitor_module.time, "monotonic", lambda: clock[0])
    metrics = Metrics(CollectorRegistry())
    monitor = ServiceMonitor(ServiceObserver(metrics))
    monitor.model_loaded = lambda service: None  # no registry here
    highwater = {0: 15}  # partition 1 not fetched yet
    service = fake_service(highwater)
    get = metrics.registry.get_sample_value
    lag = "foldstream_consumer_lag_records"

    monitor.after_batch(service, [])  # the assignment: every slow reading at once
    assert get(lag, {"partition": "0"}) == 5 and get(lag, {"partition": "1"}) is None
    assert get("foldstream_history_cache_events") == 10 and get("foldstream_rocksdb_size_bytes") == 2000

    clock[0] += 0.1  # the next turn, long before the next slow reading
    highwater[1] = 10
    service.stores[TopicPartition("in", 0)].applied = 14
    monitor.after_batch(service, [])
    assert get(lag, {"partition": "1"}) == 5  # read as soon as it is known
    assert get(lag, {"partition": "0"}) == 0

    clock[0] += 0.1  # every lag known: back to one reading per SLOW_EVERY_S
    highwater[1] = 20
    monitor.after_batch(service, [])
    assert get(lag, {"partition": "1"}) == 5
    clock[0] += monitor_module.SLOW_EVERY_S
    monitor.after_batch(service, [])
    assert get(lag, {"partition": "1"}) == 15
