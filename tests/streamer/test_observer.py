"""ServiceObserver: what a turn's outcomes and the processor's cache sizes become in Prometheus."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from streamer.metrics import Metrics
from streamer.observer import ServiceObserver
from streamer.processor import BatchOutcome


def test_cache_lookups_and_sizes_reach_their_metrics():
    metrics = Metrics(CollectorRegistry())
    observer = ServiceObserver(metrics)
    get = metrics.registry.get_sample_value
    outcomes = [BatchOutcome(history_cache_hits=5, history_cache_misses=2, gram_cache_hits=3, gram_cache_misses=1),
                BatchOutcome(history_cache_hits=1, history_cache_misses=4, gram_cache_misses=2)]
    observer.batch(outcomes, model=None, acked_at_ms=0.0, events_since_model=0)
    observer.batch([BatchOutcome(history_cache_hits=10)], model=None, acked_at_ms=0.0, events_since_model=0)
    assert get("foldstream_history_cache_lookups_total") == 22
    assert get("foldstream_history_cache_hits_total") == 16
    assert get("foldstream_gram_cache_solves_total") == 6
    assert get("foldstream_gram_cache_hits_total") == 3

    observer.cache_sizes(1_500, 2_000, 30, 64)
    assert (get("foldstream_history_cache_events"), get("foldstream_history_cache_capacity_events"),
            get("foldstream_gram_cache_entries"), get("foldstream_gram_cache_capacity_entries")) == (1_500, 2_000, 30, 64)


def test_latencies_split_at_the_poll():
    metrics = Metrics(CollectorRegistry())
    observer = ServiceObserver(metrics)
    get = metrics.registry.get_sample_value
    # Two records produced 400 and 300 ms before the acknowledgement, polled 30 ms before it;
    # a batch without a poll time (NaN) counts only end to end.
    polled = BatchOutcome(record_times_ms=[9_600, 9_700], polled_at_ms=9_970.0)
    unpolled = BatchOutcome(record_times_ms=[9_990])
    observer.batch([polled, unpolled], model=None, acked_at_ms=10_000.0, events_since_model=0)
    assert get("foldstream_event_to_published_seconds_count") == 3
    assert get("foldstream_event_to_published_seconds_bucket", {"le": "0.25"}) == 1
    assert get("foldstream_poll_to_published_seconds_count") == 2
    assert get("foldstream_poll_to_published_seconds_bucket", {"le": "0.025"}) == 0
    assert get("foldstream_poll_to_published_seconds_bucket", {"le": "0.05"}) == 2
    assert abs(get("foldstream_poll_to_published_seconds_sum") - 0.06) < 1e-9
