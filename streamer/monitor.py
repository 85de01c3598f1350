"""Feeds a :class:`streamer.observer.ServiceObserver` from a running :class:`FoldService`.

Hooked in as the service's ``on_batch`` callback: after every turn of the loop it passes
on the batch outcomes, and every few seconds the slower readings (lag per partition,
store sizes, assignment).
"""

from __future__ import annotations

import time

from streamer.observer import ServiceObserver

SLOW_EVERY_S = 5.0


class ServiceMonitor:
    def __init__(self, observer: ServiceObserver) -> None:
        self.observer = observer
        self._version: str | None = None
        self._rebalances = 0
        self._slow_at = 0.0
        self._events_at_model = 0

    def model_loaded(self, service) -> None:
        model = service.model
        if model.version != self._version:
            self.observer.model_loaded(model.version, service.registry.load(model.version).artifact)
            self._version = model.version
            self._events_at_model = service.stats.applied

    def after_batch(self, service, outcomes) -> None:
        self.model_loaded(service)
        self.observer.batch(outcomes, service.model, time.time() * 1000.0,
                            service.stats.applied - self._events_at_model)
        now = time.monotonic()
        if service.stats.rebalances != self._rebalances or now >= self._slow_at:
            self._slow_readings(service)
            self._slow_at = now + SLOW_EVERY_S

    def _slow_readings(self, service) -> None:
        new = service.stats.rebalances - self._rebalances
        self._rebalances = service.stats.rebalances
        self.observer.assignment([tp.partition for tp in service.stores], new)
        disk, keys = 0, {}
        for tp, store in service.stores.items():
            high = service.consumer.highwater(tp)
            if high is not None:
                self.observer.lag(tp.partition, high - store.applied_offset() - 1)
            disk += store.disk_bytes()
            for family, count in store.estimated_keys().items():
                keys[family] = keys.get(family, 0) + count
        self.observer.store_sizes(disk, keys)
