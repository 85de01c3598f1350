"""The published vector message: the documented object, float32 values exact, as any JSON parser reads it."""

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamer.codec import VectorRecord
from streamer.publisher import vector_message


def reference_doc(user: str, record: VectorRecord) -> dict:
    """The documented object, as the stdlib would read the message."""
    return {
        "user": user,
        "vector": record.vector.astype(float).tolist(),
        "model_version": record.model_version,
        "interactions": record.n_interactions,
        "last_event_time": record.last_event_time if math.isfinite(record.last_event_time) else None,
        "processed_at": record.processed_at if math.isfinite(record.processed_at) else None,
    }


def read(message: bytes) -> dict:
    """Parse with the stdlib; vector values read back as float32, as the contract says."""
    doc = json.loads(message)
    doc["vector"] = np.asarray(doc["vector"], np.float32).reshape(-1).astype(float).tolist()
    return doc


@given(
    user=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20),
    vector=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=70),
    version=st.text(max_size=12),
    n=st.integers(0, 2**63 - 1),
    last=st.floats(),
    processed=st.floats(),
)
def test_vector_message_reads_back_as_the_documented_object(user, vector, version, n, last, processed):
    record = VectorRecord(np.array(vector, np.float32), version, n, last, processed)
    message = vector_message(user, record)
    assert read(message) == reference_doc(user, record)
    doc = json.loads(message)
    assert np.array_equal(np.asarray(doc["vector"], np.float32).reshape(-1), record.vector)
    assert b"\n" not in message  # control characters are escaped: one message, one line


def test_zero_vector_and_unicode_user():
    record = VectorRecord(np.zeros(3, np.float32), "v1", 0, math.nan, 5.0)
    assert read(vector_message('ü "q"', record)) == reference_doc('ü "q"', record)
    assert b'"vector":[0.0,0.0,0.0]' in vector_message("u", record)
    assert b'"last_event_time":null' in vector_message("u", record)


def test_vector_values_are_shortest_float32_reprs():
    record = VectorRecord(np.array([0.1, -2.5, 1e-8], np.float32), "v1", 1, 1.0, 2.0)
    assert b'"vector":[0.1,-2.5,1e-8]' in vector_message("u", record)
    view = np.arange(12, dtype=np.float32).reshape(3, 4)[:, 1]  # not contiguous
    record = VectorRecord(view, "v1", 1, 1.0, 2.0)
    assert read(vector_message("u", record))["vector"] == [1.0, 5.0, 9.0]
