import json
import math

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.config import ProcessingConfig
from streamer.events import REASONS, EventDecoder, Forget, Interaction, Rejected, event_id_hash


@pytest.fixture
def decoder():
    return EventDecoder(ProcessingConfig(max_id_bytes=32))


def enc(doc) -> bytes:
    return json.dumps(doc).encode()


def test_full_event(decoder):
    out = decoder.decode(b"u1", enc({"user": "u1", "item": "i9", "ts": 10.5, "weight": 2,
                                      "event": "click", "event_id": "e1"}), offset=7)
    assert out == Interaction("u1", "i9", 2.0, 10.5, event_id_hash("e1"), 7)


def test_defaults_use_event_weight_then_default_weight_and_broker_time(decoder):
    out = decoder.decode(b"u", enc({"user": "u", "item": "i", "event": "purchase"}), 3,
                         broker_ts_ms=1500)
    assert (out.weight, out.ts, out.event_id_hash) == (10.0, 1.5, 0)
    out = decoder.decode(b"u", enc({"user": "u", "item": "i"}), 3)
    assert out.weight == 1.0 and math.isnan(out.ts)


def test_iso_timestamps(decoder):
    out = decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": "1970-01-01T00:01:00Z"}), 0)
    assert out.ts == 60.0
    out = decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": "1970-01-01T01:00:00+01:00"}), 0)
    assert out.ts == 0.0


def test_unicode_ids_round_trip(decoder):
    user = "ü, \"quoted\"\n"
    out = decoder.decode(user.encode(), enc({"user": user, "item": "映画"}), 0)
    assert (out.user, out.item) == (user, "映画")


def test_tombstone_is_forget(decoder):
    assert decoder.decode(b"u1", None, 4) == Forget("u1", 4)


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (None, enc({"user": "u", "item": "i"}), "missing_key"),
        (None, None, "missing_key"),
        (b"\xff", enc({"user": "u", "item": "i"}), "invalid_utf8"),
        (b"u", b"\xff\xfe", "invalid_utf8"),
        (b"u", b"{not json", "invalid_json"),
        (b"u", b'{"user": "u", "item": "i", "weight": NaN}', "invalid_json"),
        (b"u", b"[1, 2]", "not_an_object"),
        (b"u", enc({"item": "i"}), "missing_field"),
        (b"u", enc({"user": "u"}), "missing_field"),
        (b"u", enc({"user": 5, "item": "i"}), "wrong_type"),
        (b"u", enc({"user": "u", "item": "i", "weight": "2"}), "wrong_type"),
        (b"u", enc({"user": "u", "item": "i", "weight": True}), "wrong_type"),
        (b"u", enc({"user": "u", "item": "i", "event": 3}), "wrong_type"),
        (b"u", enc({"user": "u", "item": "i", "event_id": 3}), "wrong_type"),
        (b"", enc({"user": "", "item": "i"}), "invalid_id"),
        (b"u", enc({"user": "u", "item": "x" * 33}), "invalid_id"),
        (b"v", enc({"user": "u", "item": "i"}), "key_mismatch"),
        (b"u", enc({"user": "u", "item": "i", "weight": -1}), "invalid_weight"),
        (b"u", b'{"user": "u", "item": "i", "weight": 1e999}', "invalid_weight"),
        (b"u", enc({"user": "u", "item": "i", "ts": "yesterday"}), "invalid_timestamp"),
        (b"u", enc({"user": "u", "item": "i", "ts": [1]}), "invalid_timestamp"),
        (b"u", enc({"user": "u", "item": "i", "event": "teleport"}), "unknown_event"),
    ],
)
def test_rejections_name_their_reason(decoder, key, value, reason):
    out = decoder.decode(key, value, offset=11)
    assert isinstance(out, Rejected), out
    assert out.reason == reason and out.offset == 11
    assert out.detail


def test_event_id_hash_is_stable_and_nonzero():
    assert event_id_hash("a") == event_id_hash("a") != event_id_hash("b")
    assert event_id_hash("") == 0 and event_id_hash(None) == 0


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=40)), value=st.one_of(st.none(), st.binary(max_size=200)))
def test_arbitrary_bytes_never_raise(key, value):
    out = EventDecoder(ProcessingConfig()).decode(key, value, offset=0)
    assert isinstance(out, (Interaction, Forget, Rejected))
    if isinstance(out, Rejected):
        assert out.reason in REASONS


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=10))


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["user", "item", "ts", "weight", "event", "event_id", "x"]),
                           json_scalars, max_size=7))
def test_near_valid_json_is_applied_or_rejected_with_reason(doc):
    decoder = EventDecoder(ProcessingConfig())
    key = doc.get("user") if isinstance(doc.get("user"), str) else "k"
    out = decoder.decode(key.encode("utf-8", "surrogatepass"), json.dumps(doc).encode(), offset=1)
    if isinstance(out, Interaction):
        assert out.user == doc["user"] and out.item == doc["item"]
        assert math.isfinite(out.weight) and out.weight >= 0
    else:
        assert isinstance(out, Rejected) and out.reason in REASONS


def test_event_id_that_is_not_unicode_text_is_rejected_not_raised(decoder):
    # JSON can escape a lone surrogate; hashing it used to raise out of decode().
    out = decoder.decode(b"u", b'{"user": "u", "item": "i", "event_id": "\\ud800"}', 5)
    assert isinstance(out, Rejected) and out.reason == "invalid_id" and out.offset == 5


def test_common_shape_and_general_path_agree(decoder):
    # Float ts / float weight take the short path; ints and strings the general one.
    a = decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": 12.0, "weight": 2.0}), 1)
    b = decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": 12, "weight": 2}), 1)
    c = decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": "1970-01-01T00:00:12Z",
                                  "weight": 2}), 1)
    assert a == b == c == Interaction("u", "i", 2.0, 12.0, 0, 1)
    assert decoder.decode(b"u", enc({"user": "u", "item": "i", "ts": None}), 1, 3000).ts == 3.0


def test_an_integer_weight_beyond_any_float_is_rejected_not_raised(decoder):
    # orjson refuses integers beyond 64 bits; the stdlib parser then reads them exactly.
    for extra in ("", ', "event": null'):
        value = b'{"user": "u", "item": "i", "ts": 1.0, "weight": 1' + b"0" * 400 + extra.encode() + b"}"
        out = decoder.decode(b"u", value, 4)
        assert isinstance(out, Rejected) and out.reason == "invalid_weight" and out.offset == 4
        assert "1329 bits" in out.detail


ids_or_not = st.sampled_from(["u", "ü", "", "u" * 300, 3, None])
documents = st.fixed_dictionaries(
    # Mostly the common shape (ASCII ids, a float time), so the short path is taken often.
    {"user": st.one_of(st.just("u"), ids_or_not), "item": st.one_of(st.just("i"), ids_or_not),
     "ts": st.one_of(st.floats(-1e12, 1e12), json_scalars, st.just("2024-01-01T00:00:00Z"))},
    optional={"weight": st.one_of(st.floats(-5, 5), json_scalars,
                                  st.sampled_from([0.0, -0.0, 1e308, 2**63 - 1, 2**63, -(2**63) - 1])),
              "event": st.one_of(st.none(), st.sampled_from(["view", "click", "nope"])),
              "event_id": st.one_of(st.sampled_from(["e1", "é1", ""]), json_scalars)})


@settings(max_examples=400, deadline=None)
@given(doc=documents, key=st.sampled_from([b"u", b"u", "ü".encode(), b"k"]))
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event_id": ""}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event_id": "é1"}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event_id": 3}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event_id": None}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event": "click"}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event": None}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "event": "nope"}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "weight": True}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "weight": -1.0}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "weight": 2}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "weight": "2"}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 5.0, "weight": None}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": None}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": 7}, key=b"u")
@example(doc={"user": "u", "item": "i", "ts": "2024-01-01T00:00:00Z"}, key=b"u")
@example(doc={"user": "u", "item": "ü", "ts": 5.0}, key=b"u")
@example(doc={"user": "u", "item": "", "ts": 5.0}, key=b"u")
@example(doc={"user": "ü", "item": "i", "ts": 5.0}, key="ü".encode())
@example(doc={"user": "u", "item": "i", "ts": 5.0}, key=b"k")
@example(doc={"user": "u" * 300, "item": "i", "ts": 5.0}, key=b"u" * 300)
def test_the_short_path_decides_as_the_general_one(doc, key):
    """decode() accepts the common shape itself; _from_object (the general path) must agree
    on every document, accepted or rejected (same Interaction, same reason)."""
    decoder = EventDecoder(ProcessingConfig(event_weights={"view": 1.0, "click": 2.0}))
    value = json.dumps(doc).encode()
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:  # Infinity: decode() rejects it before either path
        return
    got = decoder.decode(key, value, 7, 5000)
    want = decoder._from_object(parsed, key.decode(), 7, 5000)
    if isinstance(want, Rejected):
        assert isinstance(got, Rejected) and got.reason == want.reason
    else:
        assert got == want
