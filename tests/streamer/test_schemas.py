"""The documented JSON Schemas agree with what the decoder accepts and the publisher writes."""

import json

import numpy as np

from streamer.codec import VectorRecord
from streamer.config import ProcessingConfig
from streamer.events import EventDecoder, Interaction
from streamer.publisher import vector_message
from tests.paths import REPO

SCHEMAS = REPO / "docs" / "schemas"


def test_interaction_examples_decode_and_required_fields_are_required():
    schema = json.loads((SCHEMAS / "interaction.schema.json").read_text())
    decoder = EventDecoder(ProcessingConfig())
    for example in schema["examples"]:
        out = decoder.decode(example["user"].encode(), json.dumps(example).encode(), offset=0)
        assert isinstance(out, Interaction), (example, out)
    for field in schema["required"]:
        doc = dict(schema["examples"][0])
        del doc[field]
        out = decoder.decode(b"u42", json.dumps(doc).encode(), offset=0)
        assert not isinstance(out, Interaction)
    assert set(schema["properties"]) == {"user", "item", "ts", "weight", "event", "event_id"}


def test_published_vector_has_exactly_the_schema_fields():
    schema = json.loads((SCHEMAS / "user-vector.schema.json").read_text())
    record = VectorRecord(np.array([0.1, -2.5], np.float32), "v000001", 3, 1700000000.0, 1700000001.0)
    doc = json.loads(vector_message("u1", record))
    assert set(doc) == set(schema["properties"]) == set(schema["required"])
    assert np.array_equal(np.asarray(doc["vector"], np.float32), record.vector)
    assert vector_message("u1", None) is None
