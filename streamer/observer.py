"""Turns what the consumer loop did into Prometheus metrics and drift measurements.

The loop calls :meth:`ServiceObserver.model_loaded` when it starts folding against a
model, :meth:`batch` after each turn (once the vectors are acknowledged), and
:meth:`assignment` / :meth:`store_sizes` when partitions or stores change. Nothing here
touches Kafka or RocksDB: it only reads what it is handed.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Iterable

import numpy as np

from factors.errors import ConfigError
from streamer.drift import DriftMonitor, DriftReference, publish
from streamer.events import REASONS
from streamer.metrics import Metrics
from streamer.model import LoadedModel
from streamer.processor import BatchOutcome

log = logging.getLogger(__name__)

RETRAIN_OUTCOMES = ("promoted", "rejected", "skipped", "failed")


class ServiceObserver:
    def __init__(self, metrics: Metrics, window_events: int = 50_000) -> None:
        self.metrics = metrics
        self.window_events = window_events
        self.drift: DriftMonitor | None = None
        self._model_label: str | None = None
        self._lag_partitions: set[int] = set()
        # Series that alerts use with increase()/rate() must exist before their first event.
        for reason in REASONS:
            metrics.dead_lettered.labels(reason=reason)
        for outcome in RETRAIN_OUTCOMES:
            metrics.retrains.labels(outcome=outcome)

    # -- model -----------------------------------------------------------------------
    def model_loaded(self, version: str, artifact) -> None:
        """The loop folds against ``version`` (a :class:`factors.artifacts.ModelArtifact`) now."""
        m = self.metrics
        if self._model_label is not None and self._model_label != version:
            m.model_version.remove(self._model_label)
        m.model_version.labels(version=version).set(1)
        self._model_label = version
        try:
            m.model_created.set(datetime.fromisoformat(artifact.created).timestamp())
        except (TypeError, ValueError):
            log.warning("model %s has no parsable creation time: %r", version, artifact.created)
        try:
            reference = DriftReference.from_artifact(artifact, version=version)
        except ConfigError as exc:
            log.warning("drift monitoring off for %s: %s", version, exc)
            self.drift = None
            return
        if self.drift is None:
            self.drift = DriftMonitor(reference, window_events=self.window_events)
        else:
            self.drift.reset(reference)

    # -- batches ---------------------------------------------------------------------
    def batch(self, outcomes: Iterable[BatchOutcome], model: LoadedModel,
              acked_at_ms: float, events_since_model: int) -> None:
        m = self.metrics
        outcomes = list(outcomes)
        items: list[str] = []
        new_users = 0
        new_vectors, old_vectors = [], []
        for o in outcomes:
            if o.consumed:
                m.batch_size.observe(o.consumed)
            m.consumed.inc(o.consumed)
            m.applied.inc(o.applied)
            m.duplicates.inc(o.duplicates)
            m.replayed.inc(o.skipped_replayed)
            m.forgotten.inc(o.forgotten)
            m.unknown_items.inc(o.unknown_item_events)
            for _, rejected in o.rejected:
                m.dead_lettered.labels(reason=rejected.reason).inc()
            if o.users_updated:
                m.foldin_seconds.observe(o.fold_seconds)
            if o.last_offset >= 0:
                m.write_seconds.observe(o.write_seconds)
            m.published.inc(len(o.outbox))
            for t in o.record_times_ms:
                m.latency.observe(max(0.0, (acked_at_ms - t) / 1000.0))
            if o.record_times_ms:
                m.last_event_time.set(max(o.record_times_ms) / 1000.0)
            items.extend(o.applied_items)
            new_users += o.new_user_events
            m.new_users.inc(o.new_users)
            for user, record in o.vectors.items():
                new_vectors.append(record.vector)
                old_vectors.append(o.previous_vectors.get(user))
        if any(o.last_offset >= 0 for o in outcomes):
            m.last_batch_time.set(time.time())
        m.events_since_retrain.set(events_since_model)
        if self.drift is not None and (items or new_vectors):
            self.drift.observe_batch(
                model.item_indices(items), new_users,
                old_vectors if new_vectors else None,
                np.asarray(new_vectors, dtype=np.float64).reshape(len(new_vectors), model.factors),
            )
            publish(m, self.drift.snapshot())

    def publish_failed(self) -> None:
        self.metrics.publish_errors.inc()

    # -- partitions and stores ---------------------------------------------------------
    def assignment(self, partitions: Iterable[int], rebalances: int) -> None:
        owned = set(partitions)
        for gone in self._lag_partitions - owned:
            self.metrics.lag.remove(str(gone))
        self._lag_partitions = owned
        self.metrics.assigned.set(len(owned))
        self.metrics.rebalances.inc(rebalances)

    def lag(self, partition: int, records: int) -> None:
        if partition in self._lag_partitions:
            self.metrics.lag.labels(partition=str(partition)).set(max(0, records))

    def store_sizes(self, disk_bytes: int, keys: dict[str, int]) -> None:
        self.metrics.store_bytes.set(disk_bytes)
        for family, count in keys.items():
            self.metrics.store_keys.labels(column_family=family).set(count)

    def retrain(self, outcome: str, seconds: float, finished_at: float) -> None:
        m = self.metrics
        m.retrains.labels(outcome=outcome).inc()
        m.retrain_seconds.observe(seconds)
        if outcome in ("promoted", "rejected", "skipped"):
            m.retrain_last_success.set(finished_at)
