"""The published vector message: byte for byte what json.dumps writes for the documented object."""

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamer.codec import VectorRecord
from streamer.publisher import vector_message


def reference_message(user: str, record: VectorRecord) -> bytes:
    """The slow, obvious encoding: a dict through json.dumps."""
    doc = {
        "user": user,
        "vector": record.vector.astype(float).tolist(),
        "model_version": record.model_version,
        "interactions": record.n_interactions,
        "last_event_time": record.last_event_time if math.isfinite(record.last_event_time) else None,
        "processed_at": record.processed_at,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@given(
    user=st.text(min_size=1, max_size=20),
    vector=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=70),
    version=st.text(max_size=12),
    n=st.integers(0, 2**63 - 1),
    last=st.floats(),
    processed=st.floats(),
)
def test_vector_message_equals_json_dumps(user, vector, version, n, last, processed):
    record = VectorRecord(np.array(vector, np.float32), version, n, last, processed)
    message = vector_message(user, record)
    assert message == reference_message(user, record)
    doc = json.loads(message)
    assert np.array_equal(np.asarray(doc["vector"], np.float32).reshape(-1), record.vector)


def test_zero_vector_and_unicode_user():
    record = VectorRecord(np.zeros(3, np.float32), "v1", 0, math.nan, 5.0)
    assert vector_message('ü "q"', record) == reference_message('ü "q"', record)
    assert b'"vector":[0.0,0.0,0.0]' in vector_message("u", record)
