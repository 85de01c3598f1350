"""Turns what the consumer loop did into Prometheus metrics and drift measurements.

The loop calls :meth:`ServiceObserver.model_loaded` when the active model changes,
:meth:`model_switched` when partitions were re-folded against it, :meth:`batch` after each
turn (once the vectors are acknowledged), and :meth:`assignment` / :meth:`store_sizes`
when partitions or stores change; the retrain scheduler calls :meth:`retrain_started`,
:meth:`retrain` and :meth:`retrain_seen`. Nothing here touches Kafka or RocksDB: it only
reads what it is handed.
"""

from __future__ import annotations

import logging
import math
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
        self._last_retrain_success = 0.0
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

    def model_switched(self, users: int) -> None:
        """``users`` were re-folded against the active model and their vectors republished."""
        self.metrics.users_refolded.inc(users)
        self.metrics.published.inc(users)

    # -- batches ---------------------------------------------------------------------
    def batch(self, outcomes: Iterable[BatchOutcome], model: LoadedModel,
              acked_at_ms: float, events_since_model: int,
              losses: dict[str, tuple[float, float]] | None = None) -> None:
        """One turn's outcomes; drift uses the vectors folded against ``model`` (the active one).

        ``losses``: fold-in loss and weight of some updated users (a sample), for the
        loss ratio; partitions still on a previous model are left out of the drift window.
        """
        m = self.metrics
        outcomes = list(outcomes)
        losses = losses or {}
        items: list[str] = []
        new_users = 0
        new_vectors, old_vectors, loss, loss_weight = [], [], [], []
        for o in outcomes:
            if o.consumed:
                m.batch_size.observe(o.consumed)
            m.consumed.inc(o.consumed)
            m.applied.inc(o.applied)
            m.duplicates.inc(o.duplicates)
            m.replayed.inc(o.skipped_replayed)
            m.forgotten.inc(o.forgotten)
            m.unknown_items.inc(o.unknown_item_events)
            m.history_cache_lookups.inc(o.history_cache_hits + o.history_cache_misses)
            m.history_cache_hits.inc(o.history_cache_hits)
            m.gram_cache_solves.inc(o.gram_cache_hits + o.gram_cache_misses)
            m.gram_cache_hits.inc(o.gram_cache_hits)
            for _, rejected in o.rejected:
                m.dead_lettered.labels(reason=rejected.reason).inc()
            if o.users_updated:
                m.foldin_seconds.observe(o.fold_seconds)
            if o.last_offset >= 0:
                m.write_seconds.observe(o.write_seconds)
            m.published.inc(len(o.outbox))
            if o.record_times_ms:
                m.latency.observe_many(np.maximum(
                    0.0, (acked_at_ms - np.asarray(o.record_times_ms, dtype=np.float64)) / 1000.0))
                m.last_event_time.set(max(o.record_times_ms) / 1000.0)
                if not math.isnan(o.polled_at_ms):
                    m.consumer_latency.observe_many(np.full(
                        len(o.record_times_ms), max(0.0, (acked_at_ms - o.polled_at_ms) / 1000.0)))
            items.extend(o.applied_items)
            new_users += o.new_user_events
            m.new_users.inc(o.new_users)
            for user, record in o.vectors.items():
                if record.model_version != model.version:
                    continue
                new_vectors.append(record.vector)
                old_vectors.append(o.previous_vectors.get(user))
                lw = losses.get(user)
                loss.append(math.nan if lw is None else lw[0])
                loss_weight.append(math.nan if lw is None else lw[1])
        if any(o.last_offset >= 0 for o in outcomes):
            m.last_batch_time.set(time.time())
        m.events_since_retrain.set(events_since_model)
        if self.drift is not None and (items or new_vectors):
            self.drift.observe_batch(
                model.item_indices(items), new_users,
                old_vectors if new_vectors else None,
                np.asarray(new_vectors, dtype=np.float64).reshape(len(new_vectors), model.factors),
                loss if losses else None, loss_weight if losses else None,
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

    def cache_sizes(self, history_events: int, history_capacity: int,
                    gram_entries: int, gram_capacity: int) -> None:
        """What the consumer's caches hold (:meth:`PartitionProcessor.cache_sizes`)."""
        m = self.metrics
        m.history_cache_events.set(history_events)
        m.history_cache_capacity.set(history_capacity)
        m.gram_cache_entries.set(gram_entries)
        m.gram_cache_capacity.set(gram_capacity)

    # -- retraining --------------------------------------------------------------------
    def retrain_started(self) -> None:
        self.metrics.retrain_running.set(1)

    def retrain(self, outcome: str, seconds: float, finished_at: float) -> None:
        """A retrain this process started finished (``outcome`` as in RETRAIN_OUTCOMES)."""
        m = self.metrics
        m.retrain_running.set(0)
        m.retrains.labels(outcome=outcome).inc()
        m.retrain_seconds.observe(seconds)
        if outcome in ("promoted", "rejected", "skipped"):
            self.retrain_seen(finished_at)

    def retrain_seen(self, finished_at: float) -> None:
        """A retrain (by any process, read from the history) finished without failing then."""
        if finished_at > self._last_retrain_success:
            self._last_retrain_success = finished_at
            self.metrics.retrain_last_success.set(finished_at)
