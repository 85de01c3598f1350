"""The batch decoder (streamer.event_kernels via EventDecoder.decode_batch) against the
record-by-record decoder, its reference: the same result for every record (compared by
repr, so -0.0 and 0.0 differ), and the common shape really taken by the kernel."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, given, settings

from streamer.config import ProcessingConfig
from streamer.codec import event_id_hash
from streamer.event_kernels import event_id_hashes, scan_interactions
from streamer.events import EventDecoder, InteractionColumns

CONFIG = ProcessingConfig(max_id_bytes=12, event_weights={"view": 1.0, "buy": 5.0})
DECODER = EventDecoder(CONFIG)


def assert_same(keys, values):
    offsets = list(range(100, 100 + len(values)))
    times = [1_700_000_000_000 + i for i in range(len(values))]
    got = DECODER.decode_batch(keys, values, offsets, times)
    if isinstance(got, InteractionColumns):
        assert len(got.offsets) == len(values)
        got = got.interactions()
    want = [DECODER.decode(k, v, o, t) for k, v, o, t in zip(keys, values, offsets, times)]
    assert [repr(e) for e in got] == [repr(e) for e in want]
    return got


def fast(keys, values):
    return scan_interactions(keys, values, CONFIG.max_id_bytes, CONFIG.default_weight)[0].tolist()


_ids = st.one_of(st.text("abcXYZ019_-", min_size=0, max_size=14),
                 st.text(max_size=4), st.sampled_from(['a"b', "a\\b", "\u00e9t\u00e9", "x\x01"]))
_number_text = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(-1e6, 1e10, allow_nan=False).map(lambda x: f"{x:.3f}"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: f"{x:e}"),
    st.decimals(allow_nan=False, allow_infinity=False, places=6).map(str),
    st.sampled_from(["0", "-0", "0.0", "-0.0", "1E5", "1e-5", "1.5e+22", "9007199254740993",
                     "9007199254740992.0", "1e23", "123456789012345678901", "0.1e-22",
                     "01", "1.", ".5", "+1", "1e", "-", "1700000000.123456"]),
)
_other = st.one_of(_number_text, st.sampled_from(['"x"', "true", "false", "null", "[]", '{"a": 1}',
                                                  '"\\u00e9"', "tru", "nul", '""']))


@st.composite
def value_doc(draw):
    """JSON text of an interaction-ish object: mostly the common shape, often not."""
    user = draw(_ids)
    fields = {"user": json.dumps(user), "item": json.dumps(draw(_ids))}
    if draw(st.booleans()) or draw(st.booleans()):
        fields["ts"] = draw(st.one_of(_number_text, st.sampled_from(['"2024-01-02T03:04:05Z"', "null", "true"])))
    if draw(st.booleans()):
        fields["weight"] = draw(st.one_of(_number_text, st.sampled_from(['"2"', "null", "false"])))
    if draw(st.booleans()):
        fields["event_id"] = draw(st.one_of(_ids.map(json.dumps), st.sampled_from(["null", "7"])))
    if draw(st.integers(0, 9)) == 0:
        fields["event"] = draw(st.sampled_from(['"view"', '"buy"', '"nope"', "3"]))
    for name in draw(st.lists(st.sampled_from(["extra", "source", "user", "ts", "a\\u0062"]), max_size=2)):
        fields[name + ("" if draw(st.booleans()) else "_x")] = draw(_other)
    items = list(fields.items())
    items = draw(st.permutations(items))
    if draw(st.integers(0, 9)) == 0 and items:
        items.append(items[0])  # a repeated field
    ws = draw(st.sampled_from(["", " ", "\n\t ", "\r"]))
    body = ("," + ws).join(f'{ws}"{k}"{ws}:{ws}{v}{ws}' for k, v in items)
    text = ws + "{" + body + "}" + ws
    key = user if draw(st.integers(0, 5)) else draw(_ids)
    return key.encode("utf-8", "surrogatepass"), text.encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(value_doc(), min_size=1, max_size=8))
def test_batch_decode_equals_record_by_record(records):
    keys, values = map(list, zip(*records))
    assert_same(keys, values)


@settings(max_examples=200, deadline=None)
@given(base=value_doc(), cut=st.integers(0, 200), flip=st.integers(0, 255), at=st.integers(0, 200))
def test_damaged_values_decode_as_the_reference(base, cut, flip, at):
    key, value = base
    damaged = bytearray(value[:max(len(value) - cut, 0)])
    if damaged:
        damaged[at % len(damaged)] = flip
    assert_same([key, key, None, b"u"], [bytes(damaged), value, value, None])


def test_the_common_shape_takes_the_kernel():
    values = [b'{"user": "u1", "item": "i9", "ts": 1700000000.5, "weight": 2.0, "event_id": "c0ffee"}',
              b'{"item":"i9","user":"u1","ts":1700000000,"source":"web","n":null,"ok":true}',
              b' {"user": "u1", "item": "i9", "ts": -0.0, "weight": -0.0} ',
              b'{"user": "u1", "item": "i9", "ts": 1.25e9, "weight": 0}']
    keys = [b"u1"] * len(values)
    assert fast(keys, values) == [1, 1, 1, 1]
    assert isinstance(DECODER.decode_batch(keys, values, [1, 2, 3, 4], [0] * 4), InteractionColumns)
    got = assert_same(keys, values)
    assert got[0].ts == 1700000000.5 and got[0].weight == 2.0 and got[0].event_id_hash != 0
    assert got[1].ts == 1700000000.0 and got[1].weight == CONFIG.default_weight
    assert np.signbit(got[2].ts) and np.signbit(got[2].weight)


def test_what_the_kernel_leaves_to_the_decoder():
    common = b'"user": "u1", "item": "i9", "ts": 1.5'
    cases = {
        b"u2": b"{" + common + b"}",  # key mismatch
        b"u1": b"{" + common + b', "event": "view"}',  # a weight by event name
    }
    more = [b"{" + common + b', "weight": -1}', b"{" + common + b', "ts": 2}',
            b"{" + common + b', "x": {"y": 1}}', b'{"user": "u\\u0031", "item": "i9", "ts": 1.5}',
            b"{" + common + b"", b"[1]", b"{" + common + b"} x",
            b'{"user": "u1", "item": "i9"}', b"{" + common + b', "event_id": ""}']
    keys = list(cases) + [b"u1"] * len(more)
    values = list(cases.values()) + more
    assert fast(keys, values) == [0] * len(values)
    assert_same(keys, values)
    # Numbers it cannot convert exactly come back as text; converted, the decoder checks them.
    values = [b"{" + common + b', "weight": 1e400}', b'{"user": "u1", "item": "i9", "ts": 1e999}',
              b"{" + common + b', "weight": -12345678901234567890}']
    assert fast([b"u1"] * 3, values) == [1, 1, 1]
    assert_same([b"u1"] * 3, values)


def test_numbers_are_the_correctly_rounded_doubles():
    """The kernel's numbers against Python's float() of the same text, on many decimals
    of every length the fast path takes (and some it must decline)."""
    rng = np.random.default_rng(7)
    texts = []
    for _ in range(20_000):
        digits = "".join(rng.choice(list("0123456789"), size=rng.integers(1, 21)))
        digits = digits.lstrip("0") or "0"
        point = rng.integers(0, len(digits) + 1)
        text = digits if point == len(digits) else (digits[:point] or "0") + "." + digits[point:]
        if rng.random() < 0.3:
            text += f"e{rng.integers(-30, 30)}"
        texts.append(("-" if rng.random() < 0.2 else "") + text)
    values = [b'{"user": "u", "item": "i", "ts": %s}' % t.encode() for t in texts]
    status, ints, floats, _ = scan_interactions([b"u"] * len(values), values, 8, 1.0)
    assert status.all()
    taken = ints[:, 7] == 0  # converted by the kernel (the rest is left to float())
    assert 0.3 < taken.mean() < 0.9
    want = np.array([float(t) for t in texts])
    np.testing.assert_array_equal(floats[taken, 0], want[taken])
    ints = np.array(["." not in t and "e" not in t for t in texts])
    sign = np.signbit(want) & ~(ints & (want == 0))  # "-0" is the integer 0
    assert (np.signbit(floats[taken, 0]) == sign[taken]).all()
    assert_same([b"u"] * 3000, values[:3000])


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6))
def test_event_id_hashes_equal_hashlibs(ids):
    """The numba BLAKE2b against codec.event_id_hash (hashlib), across block boundaries."""
    buf = b"".join(ids)
    lengths = np.array([len(i) for i in ids])
    pos = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert event_id_hashes(buf, pos, lengths).tolist() == [event_id_hash(i) for i in ids]


def test_event_id_hashes_at_block_edges():
    ids = [(b"ab" * 200)[:n] for n in (1, 127, 128, 129, 255, 256, 257)]
    buf = b"".join(ids)
    lengths = np.array([len(i) for i in ids])
    pos = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert event_id_hashes(buf, pos, lengths).tolist() == [event_id_hash(i) for i in ids]
