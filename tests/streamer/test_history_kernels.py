"""The batched history kernels against their NumPy references in streamer.codec."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer import codec
from streamer.codec import UserHistory
from streamer.errors import StoreFormatError
from streamer.history_kernels import (
    HistoryColumns,
    check_histories,
    encode_histories,
    merge_new_events,
    parse_histories,
)

ids = st.text(max_size=6)
# Few distinct times and hashes: ties, late events and duplicates are the cases that matter.
times = st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0, -4.0, 1e9])
hashes = st.one_of(st.just(0), st.integers(1, 4), st.integers(0, 2**64 - 1))
weights = st.floats(0, 100, width=32)
events = st.lists(st.tuples(ids, weights, times, hashes), max_size=12)
users = st.lists(st.tuples(events, events), min_size=1, max_size=6)  # (stored, new) per user


def history(evs, cap):
    items, w, t, h = zip(*evs) if evs else ((), (), (), ())
    return UserHistory.empty().append(list(items), w, t, h, max_events=cap).history


def user_columns(columns: HistoryColumns, u: int):
    a, b = columns.ptr[u], columns.ptr[u + 1]
    buf = columns.id_buf.tobytes()
    items = tuple(buf[p:p + n].decode("utf-8")
                  for p, n in zip(columns.id_pos[a:b].tolist(), columns.id_len[a:b].tolist()))
    return items, columns.weights[a:b], columns.times[a:b], columns.hashes[a:b]


def assert_same(columns: HistoryColumns, u: int, expected: UserHistory):
    items, w, t, h = user_columns(columns, u)
    assert items == expected.item_ids
    assert np.array_equal(w, expected.weights)
    assert np.array_equal(t, expected.times)
    assert np.array_equal(h, expected.event_hashes)


@settings(max_examples=200, deadline=None)
@given(users, st.integers(1, 8))
def test_parse_and_encode_match_the_per_history_codec(data, cap):
    histories = [history(stored, cap) for stored, _ in data]
    blobs = [codec.encode_history(h) for h in histories]
    columns = parse_histories(blobs, tail="é-tail".encode())
    for u, h in enumerate(histories):
        assert_same(columns, u, h)
    assert columns.id_buf.tobytes().endswith("é-tail".encode())
    assert encode_histories(columns) == blobs


@settings(max_examples=300, deadline=None)
@given(users, st.integers(1, 8), st.randoms(use_true_random=False))
def test_merge_matches_append_histories(data, cap, rnd):
    bases = [history(stored, cap) for stored, _ in data]
    # The batch's events in an arbitrary arrival order across users, each user's in order.
    arrivals = [(u, e) for u, (_, new) in enumerate(data) for e in new]
    queues = {u: [e for v, e in arrivals if v == u] for u in range(len(data))}
    order = [u for u, _ in arrivals]
    rnd.shuffle(order)
    arrived = [(u, queues[u].pop(0)) for u in order]
    seg = np.array([u for u, _ in arrived], dtype=np.int64)
    new = [e for _, e in arrived]
    items = [e[0].encode("utf-8") for e in new]
    w = np.array([e[1] for e in new], dtype=np.float32)
    t = np.array([e[2] for e in new], dtype=np.float64)
    h = np.array([e[3] for e in new], dtype=np.uint64)
    expected = codec.append_histories(bases, [np.zeros(len(b), np.int32) for b in bases], seg, items, w, t, h,
                                      np.zeros(len(new), np.int32), max_events=cap)

    old = parse_histories([codec.encode_history(b) for b in bases])
    by_user = np.argsort(seg, kind="stable")
    new_ptr = np.zeros(len(bases) + 1, np.int64)
    np.cumsum(np.bincount(seg, minlength=len(bases)), out=new_ptr[1:])
    ptr, source, added, duplicates, evicted = merge_new_events(
        old.ptr, old.times, old.hashes, new_ptr, t[by_user], h[by_user], cap)

    assert added.tolist() == expected.added.tolist()
    assert duplicates.tolist() == expected.duplicates.tolist()
    assert evicted.tolist() == expected.evicted.tolist()
    new_blob = b"".join(items)
    new_len = np.array([len(i) for i in items], dtype=np.int64)
    new_pos = np.concatenate([[0], np.cumsum(new_len)[:-1]]).astype(np.int64) + old.id_buf.shape[0]
    buf = np.frombuffer(old.id_buf.tobytes() + new_blob, np.uint8)
    merged = HistoryColumns(
        ptr, np.concatenate([old.weights, w[by_user]])[source], np.concatenate([old.times, t[by_user]])[source],
        np.concatenate([old.hashes, h[by_user]])[source], np.concatenate([old.id_pos, new_pos[by_user]])[source],
        np.concatenate([old.id_len, new_len[by_user]])[source], buf)
    for u, want in enumerate(expected.histories):
        assert_same(merged, u, want)
    assert encode_histories(merged) == [codec.encode_history(x) for x in expected.histories]


def _decodes(blob: bytes) -> bool:
    try:
        codec.decode_history(blob)
    except StoreFormatError:
        return False
    return True


def _mutations(blob: bytes, rnd) -> list[bytes]:
    """Damaged copies of a valid blob: flipped, cut, grown, a NaN or unsorted column."""
    out = [blob[:-1], blob + b"x", blob[:rnd.randrange(len(blob))], b"", bytes([0x12]) + blob[1:]]
    raw = bytearray(blob)
    at = rnd.randrange(len(raw))
    raw[at] ^= 1 << rnd.randrange(8)
    out.append(bytes(raw))
    n = int.from_bytes(blob[1:5], "little")
    if n:
        i = rnd.randrange(n)
        nan = bytearray(blob)
        nan[5 + 4 * i:9 + 4 * i] = np.float32(np.nan).tobytes()
        out.append(bytes(nan))
        count = bytearray(blob)
        count[1:5] = (n + 1).to_bytes(4, "little")
        out.append(bytes(count))
        late = bytearray(blob)
        late[5 + 4 * n + 8 * i:13 + 4 * n + 8 * i] = np.float64(-1e300).tobytes()
        out.append(bytes(late))  # unsorted unless it is the first event
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_check_histories_accepts_exactly_what_decode_history_accepts(stored, rnd):
    blobs = [codec.encode_history(history(evs, 8)) for evs in stored]
    check_histories(blobs)  # valid: no error (ASCII or not)
    for blob in blobs:
        for bad in _mutations(blob, rnd):
            if _decodes(bad):
                check_histories(blobs + [bad])
            else:
                with pytest.raises(StoreFormatError):
                    check_histories(blobs + [bad])
                with pytest.raises(StoreFormatError):
                    check_histories([bad] + blobs)
