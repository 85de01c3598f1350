"""Encodings of the state store: round trips, append semantics, and corrupt bytes."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer import codec
from streamer.codec import UserHistory, VectorRecord
from streamer.errors import ConfigError, InvalidRecordError, StoreFormatError

ids = st.text(max_size=12)
weights = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
times = st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)
hashes = st.one_of(st.just(0), st.integers(1, 5), st.integers(0, 2**64 - 1))
events = st.lists(st.tuples(ids, weights, times, hashes), max_size=30)
records = st.builds(
    VectorRecord,
    vector=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=40),
    model_version=st.text(max_size=20),
    n_interactions=st.integers(0, 2**63 - 1),
    last_event_time=st.floats(allow_nan=False),
    processed_at=st.floats(allow_nan=False),
)


def build(evs, max_events=10_000):
    items, w, t, h = zip(*evs) if evs else ((), (), (), ())
    return UserHistory.empty().append(list(items), w, t, h, max_events=max_events)


def reference_append(old, new, max_events):
    """Slow, obvious append over (item, weight, time, hash) tuples; returns (kept, added, duplicates, evicted)."""
    seen = {e[3] for e in old if e[3]}
    tagged, duplicates = [(e, False) for e in old], 0
    for e in new:
        if e[3] and e[3] in seen:
            duplicates += 1
            continue
        if e[3]:
            seen.add(e[3])
        tagged.append((e, True))
    tagged.sort(key=lambda pair: pair[0][2])  # stable: equal times keep arrival order
    evicted = max(0, len(tagged) - max_events)
    kept = tagged[evicted:]
    return [e for e, _ in kept], sum(is_new for _, is_new in kept), duplicates, evicted


def as_tuples(history):
    return list(zip(history.item_ids, history.weights.tolist(), history.times.tolist(), history.event_hashes.tolist()))


def f32(x):
    return float(np.float32(x))


# ---------------------------------------------------------------- histories


@given(events, events, st.integers(1, 40))
def test_append_matches_reference(first, second, max_events):
    old = build(first).history
    items, w, t, h = zip(*second) if second else ((), (), (), ())
    update = old.append(list(items), w, t, h, max_events=max_events)
    new = [(i, f32(w), t, h) for i, w, t, h in second]
    kept, added, duplicates, evicted = reference_append(as_tuples(old), new, max_events)
    assert as_tuples(update.history) == kept
    assert (update.added, update.duplicates, update.evicted) == (added, duplicates, evicted)


def test_append_counts_and_purity():
    old = build([("a", 1.0, 1.0, 7), ("b", 1.0, 2.0, 0)]).history
    update = old.append(["c", "d", "e"], [1, 1, 1], [0.5, 3.0, 4.0], [7, 8, 8], max_events=2)
    # "c" repeats hash 7 and "e" repeats 8; "d" is kept and pushes "a" out of the cap.
    assert (update.duplicates, update.evicted, update.added) == (2, 1, 1)
    assert update.history.item_ids == ("b", "d")
    assert len(old) == 2 and old.item_ids == ("a", "b")
    with pytest.raises(ValueError):
        old.weights[0] = 5.0


def test_late_event_is_dropped_when_full_and_ties_keep_arrival_order():
    full = build([("a", 1.0, 10.0, 0), ("b", 1.0, 20.0, 0)], max_events=2).history
    late = full.append(["old"], [1.0], [5.0], max_events=2)
    assert late.history.item_ids == ("a", "b") and (late.added, late.evicted) == (0, 1)
    tie = full.append(["c"], [1.0], [20.0], max_events=3).history
    assert tie.item_ids == ("a", "b", "c")


def test_evicted_event_id_can_no_longer_be_deduped():
    h = build([("a", 1.0, 1.0, 42)], max_events=2).history
    h = h.append(["b", "c"], [1, 1], [2.0, 3.0], max_events=2).history  # event 42 falls out of the cap
    again = h.append(["a"], [1.0], [4.0], [42], max_events=2)
    assert again.duplicates == 0 and again.history.item_ids == ("c", "a")


def test_append_rejects_bad_events():
    with pytest.raises(InvalidRecordError, match="time must be finite, got nan"):
        UserHistory.empty().append(["a"], [1.0], [math.nan], max_events=5)
    with pytest.raises(InvalidRecordError, match="weight must be finite"):
        UserHistory.empty().append(["a"], [math.inf], [1.0], max_events=5)
    with pytest.raises(InvalidRecordError, match="must have 1 entries"):
        UserHistory.empty().append(["a"], [1.0, 2.0], [1.0], max_events=5)
    with pytest.raises(InvalidRecordError, match="item id must be"):
        UserHistory.empty().append(["\ud800"], [1.0], [1.0], max_events=5)
    with pytest.raises(InvalidRecordError, match="event hashes in 0..2"):
        UserHistory.empty().append(["a"], [1.0], [1.0], [-1], max_events=5)
    with pytest.raises(ConfigError, match="max_events must be >= 1, got 0"):
        UserHistory.empty().append([], [], [], max_events=0)


@given(events)
def test_aggregate_matches_reference(evs):
    history = build(evs).history
    sums: dict[str, float] = {}
    for item, w in zip(history.item_ids, history.weights.tolist()):
        sums[item] = sums.get(item, 0.0) + w
    items, summed = history.aggregate()
    assert items == list(sums)
    assert summed.dtype == np.float32
    np.testing.assert_array_equal(summed, np.array(list(sums.values()), dtype=np.float32))


def test_aggregate_and_last_event_time_of_empty_and_single():
    items, summed = UserHistory.empty().aggregate()
    assert items == [] and summed.shape == (0,) and summed.dtype == np.float32
    assert math.isnan(UserHistory.empty().last_event_time)
    one = build([("x", 2.5, 9.0, 0)]).history
    assert one.aggregate()[0] == ["x"] and one.last_event_time == 9.0


@given(events)
def test_history_round_trip(evs):
    history = build(evs).history
    assert codec.decode_history(codec.encode_history(history)) == history


# ---------------------------------------------------------------- vectors, offsets, outbox


@given(records)
def test_vector_record_round_trip(record):
    assert codec.decode_vector_record(codec.encode_vector_record(record)) == record


def test_vector_record_rejects_bad_vectors():
    with pytest.raises(InvalidRecordError, match="finite, got nan"):
        VectorRecord([1.0, math.nan], "m", 1, 0.0, 0.0)
    with pytest.raises(InvalidRecordError, match="1-D, got shape"):
        VectorRecord(np.ones((2, 2)), "m", 1, 0.0, 0.0)
    with pytest.raises(InvalidRecordError, match="n_interactions must be >= 0, got -1"):
        VectorRecord([1.0], "m", -1, 0.0, 0.0)


@given(st.integers(-(2**63), 2**63 - 1))
def test_offset_round_trip(offset):
    assert codec.decode_offset(codec.encode_offset(offset)) == offset


@given(st.text())
def test_text_round_trip(text):
    assert codec.decode_text(codec.encode_text(text)) == text


@given(ids, st.one_of(st.none(), records))
def test_outbox_value_round_trip(user_id, record):
    assert codec.decode_outbox_value(codec.encode_outbox_value(user_id, record)) == (user_id, record)


@given(st.lists(st.tuples(st.integers(0, 2**63 - 1), ids), min_size=2, max_size=20))
def test_outbox_keys_sort_by_offset_then_user(pairs):
    keys = [codec.encode_outbox_key(o, u) for o, u in pairs]
    assert [codec.decode_outbox_key(k) for k in keys] == pairs
    by_key = [codec.decode_outbox_key(k) for k in sorted(keys)]
    assert by_key == sorted(pairs, key=lambda p: (p[0], p[1].encode()))


def test_event_id_hash():
    assert codec.event_id_hash(None) == 0 and codec.event_id_hash("") == 0
    assert codec.event_id_hash("evt-1") == codec.event_id_hash(b"evt-1") != 0
    assert codec.event_id_hash("evt-1") != codec.event_id_hash("evt-2")
    assert 0 < codec.event_id_hash("evt-1") < 2**64


# ---------------------------------------------------------------- corruption

DECODERS = {
    "history": codec.decode_history,
    "vector": codec.decode_vector_record,
    "offset": codec.decode_offset,
    "outbox": codec.decode_outbox_value,
    "text": codec.decode_text,
    "head": codec.decode_history_head,
}


def samples():
    history = build([("item-é", 1.5, 10.0, 3), ("b", 2.0, 11.0, 0)]).history
    record = VectorRecord(np.arange(5, dtype=np.float32), "m-1", 2, 11.0, 12.0)
    return {
        "history": codec.encode_history(history),
        "vector": codec.encode_vector_record(record),
        "offset": codec.encode_offset(17),
        "outbox": codec.encode_outbox_value("u", record),
        "tombstone": codec.encode_outbox_value("u", None),
        "head": codec.encode_history_head(3, history),
    }


@pytest.mark.parametrize("kind", ["history", "vector", "offset", "outbox", "tombstone", "head"])
def test_truncated_or_padded_bytes_raise_format_error(kind):
    buf = samples()[kind]
    decode = DECODERS["outbox" if kind == "tombstone" else kind]
    for cut in range(len(buf)):
        with pytest.raises(StoreFormatError):
            decode(buf[:cut])
    with pytest.raises(StoreFormatError):
        decode(buf + b"\x00")


@pytest.mark.parametrize("kind", list(DECODERS))
def test_wrong_format_byte_names_both_values(kind):
    buf = samples()["outbox" if kind == "text" else kind]
    wrong = bytes([0x7F]) + buf[1:]
    with pytest.raises(StoreFormatError, match=r"must be 0x\w\w, got 0x7f"):
        DECODERS[kind](wrong)


def test_a_vector_is_not_decoded_as_a_history():
    with pytest.raises(StoreFormatError, match="must be 0x11, got 0x21"):
        codec.decode_history(samples()["vector"])


def test_invalid_utf8_id_raises_format_error():
    buf = bytearray(samples()["history"])
    buf[-1] = 0xFF
    with pytest.raises(StoreFormatError, match="invalid UTF-8"):
        codec.decode_history(bytes(buf))


@settings(max_examples=300)
@given(st.sampled_from(list(DECODERS)), st.binary(max_size=200), st.data())
def test_random_bytes_never_crash(kind, tail, data):
    # Start most inputs with the right format byte so the decoders get past the first check.
    first = data.draw(st.sampled_from([codec.HISTORY_FORMAT, codec.VECTOR_FORMAT, codec.OFFSET_FORMAT, codec.OUTBOX_FORMAT, codec.TEXT_FORMAT, 0]))
    try:
        DECODERS[kind](bytes([first]) + tail)
    except StoreFormatError:
        pass


@given(st.sampled_from(["history", "vector", "outbox"]), st.data())
def test_flipped_bytes_never_crash(kind, data):
    buf = bytearray(samples()[kind])
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    try:
        DECODERS[kind](bytes(buf))
    except StoreFormatError:
        pass


# ---------------------------------------------------------------- many histories at once

batch_events = st.lists(st.tuples(st.integers(0, 3), ids, weights, times, hashes), max_size=40)


@given(st.lists(events, min_size=1, max_size=4), batch_events, st.integers(1, 12))
def test_append_histories_equals_append_per_history(olds, new, max_events):
    bases = [build(evs).history for evs in olds]
    new = [e for e in new if e[0] < len(bases)]
    # The caller's column: a distinct marker per event, to check it follows its event.
    base_extras = [np.arange(len(b), dtype=np.int32) + 1000 * u for u, b in enumerate(bases)]
    seg = np.array([e[0] for e in new], dtype=np.int64)
    batch = codec.append_histories(
        bases, base_extras, seg, [e[1].encode() for e in new],
        np.array([e[2] for e in new], np.float32), np.array([e[3] for e in new], np.float64),
        np.array([e[4] for e in new], np.uint64), -1 - np.arange(len(new), dtype=np.int32),
        max_events=max_events)
    for u, base in enumerate(bases):
        mine = [(j, e) for j, e in enumerate(new) if e[0] == u]
        _, items, w, t, h = zip(*[e for _, e in mine]) if mine else ((),) * 5
        one = base.append(list(items), w, t, h, max_events=max_events)
        assert batch.histories[u] == one.history
        assert codec.encode_history(batch.histories[u]) == codec.encode_history(one.history)
        assert (batch.added[u], batch.duplicates[u], batch.evicted[u]) == (one.added, one.duplicates, one.evicted)
        # Carry the markers through the reference append as a (hash-free) replay.
        tagged = [(x, tt) for x, tt in zip(base_extras[u].tolist(), base.times.tolist())]
        seen = {hh for hh in base.event_hashes.tolist() if hh}
        for j, e in mine:
            if e[4] and e[4] in seen:
                continue
            seen.add(e[4]) if e[4] else None
            tagged.append((-1 - j, e[3]))
        tagged.sort(key=lambda p: p[1])
        expected = [x for x, _ in tagged[max(0, len(tagged) - max_events):]]
        assert batch.extras[u].tolist() == expected


def test_history_ids_are_decoded_only_when_read_and_match():
    history = build([("映画", 1.0, 1.0, 0), ("b", 1.0, 2.0, 0), ("", 1.0, 3.0, 0), ("ü-x", 1.0, 4.0, 0)]).history
    again = codec.decode_history(codec.encode_history(history))
    assert again.item_ids == ("映画", "b", "", "ü-x")
    assert again == history and len(again) == 4
    with pytest.raises(AttributeError):
        again.weights = np.zeros(4, np.float32)


def test_an_id_that_starts_inside_a_character_raises_format_error():
    buf = bytearray(codec.encode_history(build([("é", 1.0, 1.0, 0), ("a", 1.0, 2.0, 0)]).history))
    # Lengths 2 and 1 become 1 and 2: the whole is still UTF-8, the first id is not.
    n_lengths_at = len(buf) - 3 - 8
    buf[n_lengths_at:n_lengths_at + 8] = np.array([1, 2], "<u4").tobytes()
    with pytest.raises(StoreFormatError, match="invalid UTF-8"):
        codec.decode_history(bytes(buf))


def test_vector_records_built_many_at_once_equal_one_by_one():
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    many = VectorRecord.many(vectors, "v1", [1, 2, 3], [10.0, math.nan, 12.0], 99.0)
    for row, record in enumerate(many):
        one = VectorRecord(vectors[row], "v1", row + 1, [10.0, math.nan, 12.0][row], 99.0)
        assert record == one
        assert codec.encode_vector_record(record) == codec.encode_vector_record(one)
        assert codec.encode_vector_record(record) is codec.encode_vector_record(record)  # kept
        assert not record.vector.flags.writeable
    bad = vectors.copy()
    bad[1, 2] = np.inf
    with pytest.raises(InvalidRecordError, match="vector must be finite"):
        VectorRecord.many(bad, "v1", [1, 2, 3], [1.0, 2.0, 3.0], 0.0)
    with pytest.raises(InvalidRecordError, match="n_interactions must be >= 0"):
        VectorRecord.many(vectors, "v1", [1, -2, 3], [1.0, 2.0, 3.0], 0.0)


def test_history_pickles_and_copies():
    import copy
    import pickle

    history = build([("映画", 1.0, 1.0, 5), ("b", 2.0, 2.0, 0)]).history
    assert pickle.loads(pickle.dumps(history)) == history
    assert copy.deepcopy(history) == history


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5), st.integers(0, 9), st.text(max_size=8),
       st.lists(st.floats(allow_nan=True), min_size=5, max_size=5), st.floats(allow_nan=False))
def test_many_pre_encodes_the_bytes_encode_vector_record_writes(n, k, version, lasts, processed_at):
    vectors = np.arange(n * k, dtype=np.float32).reshape(n, k) / 7
    records = VectorRecord.many(vectors, version, range(n), lasts[:n], processed_at)
    for record in records:
        fresh = VectorRecord(record.vector, record.model_version, record.n_interactions,
                             record.last_event_time, record.processed_at)
        assert codec.encode_vector_record(record) == codec.encode_vector_record(fresh)
        assert codec.decode_vector_record(codec.encode_vector_record(record)) == record


@given(events, events, st.integers(0, 12))
def test_history_parts_join_into_the_history_they_split(first, second, evicted):
    # A history split anywhere, its first ``evicted`` events marked evicted, joins back
    # into the history without them.
    whole = build(first + second, max_events=100).history
    at = len(first) if len(first) <= len(whole) else len(whole)
    evicted = min(evicted, at)
    blob, lengths = whole._id_bytes()
    ids = whole.item_ids
    sealed = UserHistory(ids[:at], whole.weights[:at], whole.times[:at], whole.event_hashes[:at])
    head = UserHistory(ids[at:], whole.weights[at:], whole.times[at:], whole.event_hashes[at:])
    record = codec.encode_history_head(evicted, head)
    assert codec.decode_history_head(record) == (evicted, head)
    joined = codec.join_history(codec.encode_history(sealed), record)
    assert joined == UserHistory(ids[evicted:], whole.weights[evicted:], whole.times[evicted:],
                                 whole.event_hashes[evicted:])
    assert codec.join_history(codec.encode_history(whole), None) == whole


def test_join_history_refuses_parts_that_are_not_a_history():
    sealed = build([("a", 1.0, 10.0, 0), ("b", 1.0, 20.0, 0)]).history
    late = build([("c", 1.0, 15.0, 0)]).history
    with pytest.raises(StoreFormatError, match="neither a sealed part nor a head"):
        codec.join_history(None, None)
    with pytest.raises(StoreFormatError, match="head without a sealed part"):
        codec.join_history(None, codec.encode_history_head(0, late))
    with pytest.raises(StoreFormatError, match="evicts 3 events of a sealed part of 2"):
        codec.join_history(codec.encode_history(sealed), codec.encode_history_head(3, late))
    with pytest.raises(StoreFormatError, match="older than the sealed part"):
        codec.join_history(codec.encode_history(sealed), codec.encode_history_head(1, late))
    # Once the newer sealed event is evicted too, the head follows what is left.
    assert codec.join_history(codec.encode_history(sealed), codec.encode_history_head(2, late)) == late
    with pytest.raises(StoreFormatError, match="must be 0x61, got 0x11"):
        codec.join_history(codec.encode_history(sealed), codec.encode_history(late))
    with pytest.raises(InvalidRecordError, match="evicted must be in"):
        codec.encode_history_head(-1, late)


def test_vector_of_version_reads_the_factors_of_one_model_version():
    record = VectorRecord(np.arange(5, dtype=np.float32) / 3, "v000002", 4, 11.0, 12.0)
    buf = codec.encode_vector_record(record)
    got = codec.vector_of_version(buf, "v000002")
    assert got.dtype == np.float32 and np.array_equal(got, codec.decode_vector_record(buf).vector)
    assert codec.vector_of_version(buf, "v000001") is None
    with pytest.raises(StoreFormatError, match="need"):
        codec.vector_of_version(buf[:-1], "v000002")
    with pytest.raises(StoreFormatError, match="must be 0x21"):
        codec.vector_of_version(codec.encode_offset(3), "v000002")


@given(st.lists(ids, max_size=8))
def test_outbox_users_round_trip(users):
    assert codec.decode_outbox_users(codec.encode_outbox_users(users)) == users


@given(st.lists(st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)), min_size=2, max_size=20))
def test_outbox_users_keys_sort_by_offset_then_sequence(pairs):
    keys = [codec.encode_outbox_users_key(o, q) for o, q in pairs]
    assert [codec.decode_outbox_users_key(k) for k in sorted(keys)] == sorted(pairs)


def test_outbox_users_refuse_damage():
    buf = codec.encode_outbox_users(["a", "bé"])
    for cut in range(len(buf)):
        with pytest.raises(StoreFormatError):
            codec.decode_outbox_users(buf[:cut])
    with pytest.raises(StoreFormatError):
        codec.decode_outbox_users(buf + b"x")
    with pytest.raises(StoreFormatError, match="must be 0x52, got 0x51"):
        codec.decode_outbox_users(codec.encode_outbox_value("u", None))
    with pytest.raises(InvalidRecordError):
        codec.encode_outbox_users_key(-1, 0)
    with pytest.raises(StoreFormatError, match="must be 16 bytes, got 15"):
        codec.decode_outbox_users_key(bytes(15))
