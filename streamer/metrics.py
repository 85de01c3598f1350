"""Prometheus metrics of the consumer process.

Every metric is created on the registry passed in (tests build a fresh
``CollectorRegistry`` and read values with ``get_sample_value``); the service exposes that
registry on ``/metrics``. Names follow Prometheus conventions: prefix ``foldstream_``,
base units (seconds, bytes), ``_total`` for counters. No user or item ids are labels.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

PREFIX = "foldstream"

# Histogram buckets.
BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 500, 1_000, 2_000, 5_000, 10_000, 20_000)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
NORM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
SHIFT_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0)
RETRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


class BulkHistogram:
    """A Prometheus histogram (no labels) that takes many observations in one call.

    client_python's ``Histogram.observe`` takes a lock and searches the buckets per value,
    about 1.6 us each: for a per-event histogram at tens of thousands of events a second
    that was a few percent of the consumer. :meth:`observe_many` counts an array with one
    ``searchsorted``; the exposition is a histogram family like ``Histogram``'s (``_bucket``
    with ``le``, ``_count``, ``_sum``; no ``_created``). Thread-safe.
    """

    def __init__(self, name: str, documentation: str, buckets, registry: CollectorRegistry) -> None:
        upper = [float(b) for b in buckets]
        if not upper or upper != sorted(set(upper)) or not np.isfinite(upper).all():
            raise ValueError(f"buckets must be finite and increasing, got {buckets}")
        self._name, self._doc = name, documentation
        self._upper = np.array(upper)
        self._counts = np.zeros(len(upper) + 1, np.int64)  # per bucket, the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], dtype=np.float64))

    def observe_many(self, values) -> None:
        """Count each value in the first bucket whose upper bound (``le``) is >= it."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not values.size:
            return
        counts = np.bincount(np.searchsorted(self._upper, values, side="left"),
                             minlength=self._counts.shape[0])
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self):
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        labels = [floatToGoString(b) for b in self._upper.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(self._name, self._doc, buckets=list(zip(labels, cumulative)),
                                    sum_value=total)

    def describe(self):
        return [HistogramMetricFamily(self._name, self._doc)]


class Metrics:
    """All metrics of one consumer process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def counter(name, doc, labels=()):
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        def histogram(name, doc, buckets, labels=()):
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)

        # Throughput and health.
        self.consumed = counter("interactions_consumed_total", "Records read from the input topic.")
        self.applied = counter("interactions_applied_total", "Interactions folded into a user's history.")
        self.duplicates = counter("interactions_duplicate_total",
                                  "Interactions dropped because their event_id was already applied.")
        self.replayed = counter("interactions_replayed_skipped_total",
                                "Records at or below the stored applied offset (redelivered), skipped.")
        self.dead_lettered = counter("interactions_dead_lettered_total",
                                     "Records sent to the dead-letter topic, by reason.", ["reason"])
        self.forgotten = counter("users_forgotten_total", "Users deleted by a tombstone.")
        self.published = counter("vectors_published_total", "Vector messages acknowledged by Kafka.")
        self.publish_errors = counter("publish_errors_total", "Failed flushes of vectors or dead letters.")
        self.rebalances = counter("rebalances_total", "Partition assignments received.")
        self.lag = gauge("consumer_lag_records", "High watermark minus next offset to apply, per partition.",
                         ["partition"])
        self.assigned = gauge("assigned_partitions", "Input partitions this process owns.")
        self.batch_size = histogram("batch_size_records", "Records per partition micro-batch.",
                                    BATCH_SIZE_BUCKETS)
        self.foldin_seconds = histogram("foldin_seconds", "Batched fold-in solve time per micro-batch.",
                                        SECONDS_BUCKETS)
        self.write_seconds = histogram("rocksdb_write_seconds", "RocksDB WriteBatch time per micro-batch.",
                                       SECONDS_BUCKETS)
        self.latency = BulkHistogram(f"{PREFIX}_event_to_published_seconds",
                                     "From the record's broker timestamp to the vector's acknowledgement.",
                                     LATENCY_BUCKETS, r)
        self.consumer_latency = BulkHistogram(
            f"{PREFIX}_poll_to_published_seconds",
            "From poll() returning the record to the vector's acknowledgement: the consumer's "
            "share of event_to_published (the rest is the producer's and the broker's).",
            LATENCY_BUCKETS, r)
        self.last_event_time = gauge("last_event_timestamp_seconds",
                                     "Broker timestamp of the newest record applied.")
        self.last_batch_time = gauge("last_batch_timestamp_seconds",
                                     "Wall-clock time the last micro-batch was written.")
        self.model_version = gauge("model_info", "The active model version (value 1).", ["version"])
        self.model_created = gauge("model_created_timestamp_seconds", "When the active model was trained.")
        self.users_refolded = counter("users_refolded_total",
                                      "Users re-folded against a newly active model and republished "
                                      "by live model switches.")
        self.events_since_retrain = gauge("events_since_retrain", "Interactions applied since the active model was trained.")
        self.history_cache_lookups = counter(
            "history_cache_lookups_total",
            "Users of a batch with a stored history, looked up in the history cache.")
        self.history_cache_hits = counter(
            "history_cache_hits_total",
            "Of history_cache_lookups_total, those found in memory (the others read RocksDB).")
        self.history_cache_events = gauge(
            "history_cache_events", "Events held by the history caches (plus a fixed overhead per user).")
        self.history_cache_capacity = gauge(
            "history_cache_capacity_events", "The history caches' bound (processing.history_cache_events).")
        self.gram_cache_solves = counter(
            "gram_cache_solves_total", "Long-history solves that use the normal-equation cache.")
        self.gram_cache_hits = counter(
            "gram_cache_hits_total",
            "Of gram_cache_solves_total, those that updated the user's cached Cholesky factor "
            "(the others rebuilt the normal equations from the whole history).")
        self.gram_cache_entries = gauge("gram_cache_entries", "Users whose normal equations are cached.")
        self.gram_cache_capacity = gauge(
            "gram_cache_capacity_entries", "Users the normal-equation caches can hold (processing.gram_cache_bytes).")
        self.store_bytes = gauge("rocksdb_size_bytes", "Disk size of the owned partition databases.")
        self.store_keys = gauge("rocksdb_estimated_keys", "Estimated keys in the owned databases.",
                                ["column_family"])

        # Drift.
        self.unknown_items = counter("unknown_item_events_total",
                                     "Applied interactions on items the active model does not know.")
        self.new_users = counter("new_users_total", "Users seen for the first time (no stored history).")
        self.unknown_item_ratio = gauge("unknown_item_ratio",
                                        "Share of recent interactions on items unknown to the model.")
        self.new_user_ratio = gauge("new_user_ratio", "Share of recent interactions from users new to the store.")
        self.popularity_psi = gauge("item_popularity_psi",
                                    "PSI of item popularity: recent window vs the training window.")
        self.popularity_js = gauge("item_popularity_js_divergence",
                                   "Jensen-Shannon divergence (bits) of item popularity, recent vs training.")
        self.vector_norm = histogram("user_vector_norm", "L2 norm of updated user vectors.", NORM_BUCKETS)
        self.cosine_shift = histogram("foldin_cosine_shift",
                                      "1 - cos(old, new) of a user's vector across one update.", SHIFT_BUCKETS)
        self.centroid_distance = gauge("user_centroid_distance",
                                       "Distance of the mean recently updated user vector from the training centroid, "
                                       "relative to the training centroid's norm.")
        self.loss_ratio = gauge("foldin_loss_ratio",
                                "Weighted loss per interaction of recent fold-ins over the training loss.")

        # Retraining.
        self.retrains = counter("retrains_total", "Retrain attempts by outcome.", ["outcome"])
        self.retrain_seconds = histogram("retrain_duration_seconds", "Wall time of a retrain.",
                                         RETRAIN_BUCKETS)
        self.retrain_last_success = gauge("retrain_last_success_timestamp_seconds",
                                          "When a retrain last finished without failing "
                                          "(promoted, rejected or skipped).")
        self.retrain_running = gauge("retrain_running", "1 while a retrain is in progress.")
