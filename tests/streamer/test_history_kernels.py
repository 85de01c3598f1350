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
    check_history_parts,
    encode_histories,
    merge_new_events,
    parse_histories,
    plan_history_writes,
    plan_history_writes_reference,
    take_merged,
    take_merged_reference,
    visible_events,
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


def _random_columns(rng, n: int, buf: np.ndarray) -> HistoryColumns:
    return HistoryColumns(None, rng.random(n, dtype=np.float32), rng.normal(size=n),
                          rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),
                          rng.integers(0, 1000, n), rng.integers(0, 9, n), buf)


@pytest.mark.parametrize("seed", range(6))
def test_take_merged_matches_its_reference(seed):
    rng = np.random.default_rng(seed)
    buf = np.frombuffer(b"item ids", np.uint8)
    parsed, n_new = int(rng.integers(0, 50)), int(rng.integers(0, 10))
    old, new = _random_columns(rng, parsed, buf), _random_columns(rng, n_new, buf)
    # Without an index every parsed row is an old event; with one, a subset in order.
    index = None if seed % 2 else np.sort(rng.choice(parsed, int(rng.integers(0, parsed + 1)), replace=False))
    n_old = parsed if index is None else len(index)
    source = rng.choice(n_old + n_new, int(rng.integers(0, n_old + n_new + 1)), replace=False).astype(np.int64)
    rows = rng.integers(-1, 100, n_old + n_new).astype(np.int32)
    got, got_rows = take_merged(source, old, index, new, rows)
    want, want_rows = take_merged_reference(source, old, index, new, rows)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert got_rows.dtype == want_rows.dtype and np.array_equal(got_rows, want_rows)


def _accepted(reference, *args) -> bool:
    """Whether ``reference(*args)`` accepts (does not raise StoreFormatError)."""
    try:
        reference(*args)
    except StoreFormatError:
        return False
    return True


def assert_same_verdict(check, valid: list, bad, accepted: bool) -> None:
    """``check`` accepts ``bad`` among valid inputs when the reference does, and else
    raises wherever ``bad`` stands."""
    if accepted:
        check(valid + [bad])
        return
    with pytest.raises(StoreFormatError):
        check(valid + [bad])
    with pytest.raises(StoreFormatError):
        check([bad] + valid)


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
            assert_same_verdict(check_histories, blobs, bad, _accepted(codec.decode_history, bad))


# ------------------------------------------------------------- sealed part + head


def split(h: UserHistory, at: int) -> tuple[UserHistory, UserHistory]:
    ids = h.item_ids
    return (UserHistory(ids[:at], h.weights[:at], h.times[:at], h.event_hashes[:at]),
            UserHistory(ids[at:], h.weights[at:], h.times[at:], h.event_hashes[at:]))


@settings(max_examples=300, deadline=None)
@given(users, st.integers(1, 8), st.integers(0, 3), st.data())
def test_planned_heads_join_into_the_merged_history(data, cap, min_head, draw):
    """Stored histories in two parts (some evicted), new events merged in: where the plan
    writes only a head, the stored sealed part and that head join into exactly the merged
    history; the kernel's plan equals its reference."""
    stored, parts, evicted = [], [], []
    for old, _ in data:
        full = history(old, 100)
        at = draw.draw(st.integers(0, len(full)))
        gone = draw.draw(st.integers(0, at))
        sealed, head = split(full, at)
        parts += [sealed, head]
        evicted.append(gone)
        stored.append(split(full, gone)[1])
    # Each user's history is its parts' join, and visible_events picks exactly it.
    columns = parse_histories([codec.encode_history(p) for p in parts])
    ptr, idx = visible_events(columns.ptr, np.array(evicted, np.int64))
    rows = np.arange(columns.ptr[-1]) if idx is None else idx
    joined = HistoryColumns(ptr, *(c[rows] for c in columns[1:6]), columns.id_buf)
    for u, want in enumerate(stored):
        assert_same(joined, u, want)

    seg = np.array([u for u, (_, new) in enumerate(data) for _ in new], dtype=np.int64)
    new = [e for _, evs in data for e in evs]
    t = np.array([e[2] for e in new], dtype=np.float64)
    h = np.array([e[3] for e in new], dtype=np.uint64)
    new_ptr = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.bincount(seg, minlength=len(data)), out=new_ptr[1:])
    m_ptr, source, *_ = merge_new_events(joined.ptr, joined.times, joined.hashes, new_ptr, t, h, cap)
    sealed_count = np.array([len(p) for p in parts[::2]], np.int64)
    ev = np.array(evicted, np.int64)
    whole = np.array([draw.draw(st.booleans()) for _ in data])
    args = (m_ptr, source, joined.ptr, sealed_count - ev, ev, whole, min_head)
    head_from, total = plan_history_writes(*args)
    ref_from, ref_total = plan_history_writes_reference(*args)
    assert head_from.tolist() == ref_from.tolist()
    assert total[head_from >= 0].tolist() == ref_total[ref_from >= 0].tolist()

    ids = [e[0].encode("utf-8") for e in new]
    new_len = np.array([len(i) for i in ids], dtype=np.int64)
    new_pos = np.concatenate([[0], np.cumsum(new_len)[:-1]]).astype(np.int64) + joined.id_buf.shape[0]
    buf = np.frombuffer(joined.id_buf.tobytes() + b"".join(ids), np.uint8)
    w = np.array([e[1] for e in new], dtype=np.float32)
    merged = HistoryColumns(
        m_ptr, np.concatenate([joined.weights, w])[source], np.concatenate([joined.times, t])[source],
        np.concatenate([joined.hashes, h])[source], np.concatenate([joined.id_pos, new_pos])[source],
        np.concatenate([joined.id_len, new_len])[source], buf)
    whole_blobs = encode_histories(merged)
    planned = encode_histories(merged, np.where(head_from >= 0, head_from, m_ptr[:-1]), m_ptr[1:],
                               np.where(head_from >= 0, total, -1))
    for u in range(len(data)):
        if whole[u] or head_from[u] < 0:
            assert planned[u] == whole_blobs[u]
            continue
        assert planned[u][0] == codec.HISTORY_HEAD_FORMAT
        assert codec.join_history(codec.encode_history(parts[2 * u]), planned[u]) == \
            codec.decode_history(whole_blobs[u])
        # A head stays small: the bound, or the sealed events it follows.
        kept = head_from[u] - m_ptr[u]
        bound = max(min_head, int(np.sqrt(2.0 * kept)))
        assert m_ptr[u + 1] - head_from[u] <= bound and total[u] <= bound


def test_plan_writes_heads_for_appends_and_whole_histories_otherwise():
    # One user: sealed part of 100 events (times 0..99), 2 evicted, no head; cases below.
    sealed = 100
    old_ptr = np.array([0, sealed - 2], np.int64)

    def plan(source, whole=False, evicted=2):
        ptr = np.array([0, len(source)], np.int64)
        return plan_history_writes(ptr, np.array(source, np.int64), old_ptr,
                                   np.array([sealed - 2]), np.array([evicted]), np.array([whole]), 16)

    old = list(range(sealed - 2))
    new = [sealed - 2 + j for j in range(3)]  # source indices of three new events
    assert [a.tolist() for a in plan(old + new)] == [[sealed - 2], [2]]  # appended: a head
    assert [a.tolist() for a in plan(old[1:] + new)] == [[sealed - 3], [3]]  # one more evicted
    assert plan(old[:5] + new[:1] + old[5:] + new[1:])[0].tolist() == [-1]  # a late event among them
    assert plan(old + new, whole=True)[0].tolist() == [-1]  # forgotten, or no sealed part
    # The bound: max(16, sqrt(2 * 98) = 14) = 16 head events, or 16 evicted in all.
    assert plan(old + list(range(sealed - 2, sealed + 14)))[0].tolist() == [sealed - 2]  # 16
    assert plan(old + list(range(sealed - 2, sealed + 15)))[0].tolist() == [-1]  # 17
    assert plan(old[14:] + new)[0].tolist() == [sealed - 2 - 14]  # 2 + 14 evicted
    assert plan(old[15:] + new)[0].tolist() == [-1]  # 2 + 15


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(events, events), min_size=1, max_size=4), st.data(),
       st.randoms(use_true_random=False))
def test_check_history_parts_accepts_exactly_what_join_history_accepts(stored, draw, rnd):
    parts = []
    for old, new in stored:
        sealed = codec.encode_history(history(old, 8))
        head = history(new, 8)
        n = codec.decode_history(sealed).__len__()
        parts.append((sealed, codec.encode_history_head(draw.draw(st.integers(0, n + 1)), head)))
        parts.append((sealed, None))
    good = [p for p in parts if _accepted(codec.join_history, *p)]
    check_history_parts(good)  # valid: no error
    for sealed, head in parts:
        damaged = [(sealed, head), (None, head), (sealed, head[:4] if head else b"")]
        if head is not None:
            damaged += [(sealed, bytes([0x11]) + head[1:])]
            damaged += [(sealed, head[:5] + bad) for bad in _mutations(head[5:], rnd)]
            damaged += [(bad, head) for bad in _mutations(sealed, rnd)]
        for pair in damaged:
            if pair != (None, None):
                assert_same_verdict(check_history_parts, good, pair, _accepted(codec.join_history, *pair))
