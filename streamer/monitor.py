"""Feeds a :class:`streamer.observer.ServiceObserver` from a running :class:`FoldService`.

Hooked in as the service's ``on_batch`` callback: after every turn of the loop it passes
on the batch outcomes (with the fold-in loss of a sample of the updated users), the model
switches since the last turn, and every few seconds the slower readings (lag per
partition, store sizes, assignment). A partition's lag needs its high watermark, which the
consumer learns from its first fetch of it: while one is unknown (just after an
assignment), the lag is read again at every turn, so that it appears within a turn of
becoming known instead of up to SLOW_EVERY_S later.
"""

from __future__ import annotations

import time

import numpy as np

from streamer.observer import ServiceObserver

SLOW_EVERY_S = 5.0
# Updated users whose fold-in loss feeds the loss-ratio gauge, at most once a second: their
# histories are read again and indexed (about 10 ms for 32 histories of 1,000 events), and
# a sample is enough for a ratio over a window of thousands of interactions.
LOSS_SAMPLE_USERS = 32
LOSS_EVERY_S = 1.0


class ServiceMonitor:
    def __init__(self, observer: ServiceObserver) -> None:
        self.observer = observer
        self._version: str | None = None
        self._rebalances = 0
        self._slow_at = 0.0
        self._events_at_model = 0
        self._refolded = 0
        self._loss_at = 0.0
        self._lag_unknown = False  # some owned partition's high watermark was not known yet

    def model_loaded(self, service) -> None:
        model = service.model
        if model.version != self._version:
            self.observer.model_loaded(model.version, service.registry.load(model.version).artifact)
            self._version = model.version
            self._events_at_model = service.stats.applied

    def after_batch(self, service, outcomes) -> None:
        self.model_loaded(service)
        refolded = service.stats.users_refolded - self._refolded
        if refolded:
            self.observer.model_switched(refolded)
            self._refolded = service.stats.users_refolded
        self.observer.batch(outcomes, service.model, time.time() * 1000.0,
                            service.stats.applied - self._events_at_model,
                            losses=self._loss_sample(service))
        now = time.monotonic()
        if service.stats.rebalances != self._rebalances or now >= self._slow_at:
            self._slow_readings(service)
            self._slow_at = now + SLOW_EVERY_S
        elif self._lag_unknown:
            self._lag_readings(service)

    def _loss_sample(self, service) -> dict[str, tuple[float, float]]:
        """Fold-in loss and weight of up to LOSS_SAMPLE_USERS users updated on the active model."""
        model = service.model
        sample: dict[str, tuple[float, float]] = {}
        now = time.monotonic()
        if now < self._loss_at:
            return sample
        for store, outcome in getattr(service, "last_applied", ()):
            room = LOSS_SAMPLE_USERS - len(sample)
            if room <= 0:
                break
            users = [u for u, r in outcome.vectors.items() if r.model_version == model.version][:room]
            histories = store.get_histories(users)
            users = [u for u in users if u in histories]
            if not users:
                continue
            vectors = np.stack([outcome.vectors[u].vector for u in users])
            loss, weight = model.losses([histories[u] for u in users], vectors)
            sample.update(zip(users, zip(loss.tolist(), weight.tolist())))
        if sample:
            self._loss_at = now + LOSS_EVERY_S
        return sample

    def _slow_readings(self, service) -> None:
        new = service.stats.rebalances - self._rebalances
        self._rebalances = service.stats.rebalances
        self.observer.assignment([tp.partition for tp in service.stores], new)
        self._lag_readings(service)
        disk, keys = 0, {}
        for store in service.stores.values():
            disk += store.disk_bytes()
            for family, count in store.estimated_keys().items():
                keys[family] = keys.get(family, 0) + count
        self.observer.store_sizes(disk, keys)
        self.observer.cache_sizes(*service.processor.cache_sizes())

    def _lag_readings(self, service) -> None:
        unknown = False
        for tp, store in service.stores.items():
            high = service.consumer.highwater(tp)
            if high is None:
                unknown = True
            else:
                self.observer.lag(tp.partition, high - store.applied_offset() - 1)
        self._lag_unknown = unknown
