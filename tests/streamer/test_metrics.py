"""streamer.metrics: BulkHistogram exposes what client_python's Histogram does."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from streamer.metrics import LATENCY_BUCKETS, BulkHistogram, Metrics


def samples(registry: CollectorRegistry, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples
            if s.name.startswith(name) and not s.name.endswith("_created")}


values = st.lists(st.one_of(st.floats(-1, 200, allow_nan=False), st.sampled_from(LATENCY_BUCKETS)),
                  max_size=60)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, max_size=4))
def test_bulk_observations_expose_what_histogram_observe_does(batches):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x_seconds", "doc", LATENCY_BUCKETS, ours)
    reference = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    for batch in batches:
        bulk.observe_many(np.array(batch))
        for v in batch:
            reference.observe(v)
    got, want = samples(ours, "x_seconds"), samples(theirs, "x_seconds")
    assert got.keys() == want.keys()
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-12, abs_tol=1e-9), key


def test_single_observations_and_exposition():
    registry = CollectorRegistry()
    bulk = BulkHistogram("y_seconds", "doc", (0.1, 1.0), registry)
    bulk.observe(0.1)  # on a bound: counted in that bucket (le)
    bulk.observe_many([])
    bulk.observe_many([[0.5, 5.0]])
    text = generate_latest(registry).decode()
    assert 'y_seconds_bucket{le="0.1"} 1.0' in text
    assert 'y_seconds_bucket{le="1.0"} 2.0' in text
    assert 'y_seconds_bucket{le="+Inf"} 3.0' in text
    assert "y_seconds_count 3.0" in text and "y_seconds_sum 5.6" in text
    with pytest.raises(ValueError, match="increasing"):
        BulkHistogram("z", "doc", (1.0, 0.5), registry)


def test_the_latency_metric_is_a_bulk_histogram():
    metrics = Metrics()
    metrics.latency.observe_many([0.003, 0.2])
    assert metrics.registry.get_sample_value("foldstream_event_to_published_seconds_count") == 2
    assert metrics.registry.get_sample_value("foldstream_event_to_published_seconds_bucket", {"le": "0.005"}) == 1
