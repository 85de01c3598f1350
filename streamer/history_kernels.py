"""One micro-batch's histories as columns: parse, merge and encode them all in one call each.

The consumer's per-batch history work used to go user by user: decode the cached bytes
into a :class:`~streamer.codec.UserHistory`, append, build a new object, encode it. At a
few thousand updated users per batch those per-user Python calls, not the arithmetic, were
most of the cost. Here a batch's histories live in flat columns with an ``indptr``
(user ``u`` owns rows ``ptr[u]:ptr[u+1]``), and numba kernels do the work:

- :func:`check_histories`: bytes read back from the store are valid histories (what
  :func:`streamer.codec.decode_history` checks), before they are parsed;
- :func:`parse_histories`: many encoded histories (the bytes the store holds) -> columns;
- :func:`merge_new_events`: append each user's new events (dedupe by event id, order by
  time, cap), as :meth:`UserHistory.append` does;
- :func:`encode_histories`: columns -> one encoded history per user, byte for byte what
  :func:`streamer.codec.encode_history` gives.

NumPy references, which the tests hold these kernels to: :func:`streamer.codec.decode_history`
(check, parse), :func:`streamer.codec.append_histories` (merge), :func:`streamer.codec.encode_history`
(encode). The history layout is documented in :mod:`streamer.codec`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numba as nb
import numpy as np

from streamer.codec import HISTORY_FORMAT, decode_history

_HEAD = 5  # format byte, uint32 event count
_BYTES_PER_EVENT = 4 + 8 + 8 + 4  # weight, time, event hash, id length


class HistoryColumns(NamedTuple):
    """Events of many histories, user by user (each user's oldest first).

    ``id_pos[e]`` / ``id_len[e]``: where event ``e``'s item id lies in ``id_buf``.
    """

    ptr: np.ndarray  # int64 (users + 1,)
    weights: np.ndarray  # float32
    times: np.ndarray  # float64
    hashes: np.ndarray  # uint64
    id_pos: np.ndarray  # int64
    id_len: np.ndarray  # int64
    id_buf: np.ndarray  # uint8

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)


@nb.njit(cache=True, nogil=True)
def _read_u32(buf, at):
    return (np.int64(buf[at]) | (np.int64(buf[at + 1]) << 8) | (np.int64(buf[at + 2]) << 16)
            | (np.int64(buf[at + 3]) << 24))


@nb.njit(cache=True, nogil=True)
def _count_events(buf, starts):
    ptr = np.zeros(starts.shape[0] + 1, np.int64)
    for u in range(starts.shape[0]):
        ptr[u + 1] = ptr[u] + _read_u32(buf, starts[u] + 1)
    return ptr


@nb.njit(cache=True, nogil=True)
def _parse(buf, starts, ptr, wb, tb, hb, id_pos, id_len):
    for u in range(starts.shape[0]):
        e0, n = ptr[u], ptr[u + 1] - ptr[u]
        at = starts[u] + _HEAD
        wb[4 * e0:4 * (e0 + n)] = buf[at:at + 4 * n]
        at += 4 * n
        tb[8 * e0:8 * (e0 + n)] = buf[at:at + 8 * n]
        at += 8 * n
        hb[8 * e0:8 * (e0 + n)] = buf[at:at + 8 * n]
        at += 8 * n
        ids_at = at + 4 * n
        for i in range(n):
            length = _read_u32(buf, at + 4 * i)
            id_pos[e0 + i] = ids_at
            id_len[e0 + i] = length
            ids_at += length


def parse_histories(blobs: Sequence[bytes], tail: bytes = b"") -> HistoryColumns:
    """Columns of encoded histories, one user per blob, in order.

    The blobs must be valid (this process's own :func:`encode_histories` output, or bytes
    :func:`streamer.codec.decode_history` accepted): nothing is checked here. ``tail`` is
    copied into ``id_buf`` after the blobs, at ``len(id_buf) - len(tail)`` (the batch's new
    item ids, so that old and new ids share one buffer).
    """
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    starts = np.zeros(len(blobs), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    buf = np.frombuffer(b"".join([*blobs, tail]), dtype=np.uint8)
    ptr = _count_events(buf, starts)
    n = int(ptr[-1])
    wb, tb, hb = np.empty(4 * n, np.uint8), np.empty(8 * n, np.uint8), np.empty(8 * n, np.uint8)
    id_pos, id_len = np.empty(n, np.int64), np.empty(n, np.int64)
    _parse(buf, starts, ptr, wb, tb, hb, id_pos, id_len)
    return HistoryColumns(ptr, wb.view("<f4").astype(np.float32, copy=False),
                          tb.view("<f8").astype(np.float64, copy=False),
                          hb.view("<u8").astype(np.uint64, copy=False), id_pos, id_len, buf)


@nb.njit(cache=True, nogil=True)
def _plainly_valid(buf, a, b, fmt):
    """Whether ``buf[a:b]`` is an encoded history with ASCII item ids that
    :func:`streamer.codec.decode_history` accepts (False: not known to be one)."""
    size = b - a
    if size < _HEAD or buf[a] != fmt:
        return False
    n = _read_u32(buf, a + 1)
    fixed = _HEAD + _BYTES_PER_EVENT * n
    if size < fixed:
        return False
    # Columns start at any offset: copy each value into aligned scratch (little-endian
    # host, as parse_histories assumes).
    w4 = np.empty(4, np.uint8)
    t8 = np.empty(8, np.uint8)
    wv = w4.view(np.float32)
    tv = t8.view(np.float64)
    previous = -np.inf
    for i in range(n):
        w4[:] = buf[a + _HEAD + 4 * i:a + _HEAD + 4 * i + 4]
        t8[:] = buf[a + _HEAD + 4 * n + 8 * i:a + _HEAD + 4 * n + 8 * i + 8]
        if not (np.isfinite(wv[0]) and np.isfinite(tv[0])) or tv[0] < previous:
            return False
        previous = tv[0]
    ids = 0
    at = a + _HEAD + 20 * n
    for i in range(n):
        ids += _read_u32(buf, at + 4 * i)
    if ids != size - fixed:
        return False
    for i in range(a + fixed, b):
        if buf[i] >= 0x80:
            return False
    return True


@nb.njit(cache=True, nogil=True)
def _check_all(buf, starts, ends, fmt, ok):
    for u in range(starts.shape[0]):
        ok[u] = _plainly_valid(buf, starts[u], ends[u], fmt)


def check_histories(blobs: Sequence[bytes]) -> None:
    """Raise :class:`streamer.errors.StoreFormatError` unless every blob is a valid encoded
    history: what :func:`streamer.codec.decode_history` (the reference) checks, in one kernel
    call for histories with ASCII item ids; any other blob goes to that function itself.

    Call on bytes read from the store before :func:`parse_histories`, which trusts them.
    """
    if not blobs:
        return
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    ends = np.cumsum(lengths)
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    ok = np.zeros(len(blobs), np.bool_)
    _check_all(buf, ends - lengths, ends, HISTORY_FORMAT, ok)
    for u in np.flatnonzero(~ok).tolist():
        decode_history(blobs[u])


@nb.njit(cache=True, nogil=True)
def merge_new_events(old_ptr, old_times, old_hashes, new_ptr, new_times, new_hashes, max_events):
    """Append each user's new events to its history: dedupe, order by time, cap.

    Semantics of :func:`streamer.codec.append_histories` (its NumPy reference): a new event
    whose non-zero hash is among the user's old events or its earlier kept new events is a
    duplicate; the rest follow the old events in arrival order, re-ordered by a stable sort
    on time only when one is older than its predecessor; the newest ``max_events`` stay.

    Parameters
    ----------
    old_ptr : int64 (users + 1,); old_times : float64; old_hashes : uint64
        The stored histories, each in time order.
    new_ptr : int64 (users + 1,); new_times : float64; new_hashes : uint64
        The batch's events grouped by user, each user's in arrival order.
    max_events : int

    Returns
    -------
    ptr : int64 (users + 1,)
        The merged histories' rows.
    source : int64
        Row ``r`` of the merged histories is old event ``source[r]`` when that is below
        ``len(old_times)``, else new event ``source[r] - len(old_times)``.
    added, duplicates, evicted : int64 (users,)
        Per user: new events kept, new events dropped as duplicates, events (old or
        new) dropped by the cap.
    """
    users = old_ptr.shape[0] - 1
    n_old_all = old_ptr[users]
    bound = 0
    for u in range(users):
        bound += min(old_ptr[u + 1] - old_ptr[u] + new_ptr[u + 1] - new_ptr[u], max_events)
    source = np.empty(bound, np.int64)
    ptr = np.zeros(users + 1, np.int64)
    added = np.zeros(users, np.int64)
    duplicates = np.zeros(users, np.int64)
    evicted = np.zeros(users, np.int64)
    pos = 0
    for u in range(users):
        oa, ob = old_ptr[u], old_ptr[u + 1]
        na, nb_ = new_ptr[u], new_ptr[u + 1]
        n_old = ob - oa
        cand = np.empty(n_old + nb_ - na, np.int64)
        times = np.empty(n_old + nb_ - na, np.float64)
        for i in range(n_old):
            cand[i] = oa + i
            times[i] = old_times[oa + i]
        c = n_old
        for j in range(na, nb_):
            h = new_hashes[j]
            dup = False
            if h != 0:
                for i in range(oa, ob):
                    if old_hashes[i] == h:
                        dup = True
                        break
                if not dup:
                    for q in range(n_old, c):
                        if new_hashes[cand[q] - n_old_all] == h:
                            dup = True
                            break
            if dup:
                duplicates[u] += 1
                continue
            cand[c] = n_old_all + j
            times[c] = new_times[j]
            c += 1
        for q in range(max(n_old, 1), c):  # old events are in order already
            if times[q] < times[q - 1]:
                order = np.argsort(times[:c], kind="mergesort")  # stable: ties keep arrival order
                cand[:c] = cand[:c][order]
                break
        first = max(0, c - max_events)
        for q in range(first, c):
            source[pos] = cand[q]
            if cand[q] >= n_old_all:
                added[u] += 1
            pos += 1
        evicted[u] = first
        ptr[u + 1] = pos
    return ptr, source[:pos], added, duplicates, evicted


@nb.njit(cache=True, nogil=True)
def _encode(ptr, wb, tb, hb, lb, id_pos, id_len, id_buf, fmt, byte_ptr, out):
    for u in range(ptr.shape[0] - 1):
        e0, n = ptr[u], ptr[u + 1] - ptr[u]
        at = byte_ptr[u]
        out[at] = fmt
        for b in range(4):
            out[at + 1 + b] = (n >> (8 * b)) & 0xFF
        at += _HEAD
        out[at:at + 4 * n] = wb[4 * e0:4 * (e0 + n)]
        at += 4 * n
        out[at:at + 8 * n] = tb[8 * e0:8 * (e0 + n)]
        at += 8 * n
        out[at:at + 8 * n] = hb[8 * e0:8 * (e0 + n)]
        at += 8 * n
        out[at:at + 4 * n] = lb[4 * e0:4 * (e0 + n)]
        at += 4 * n
        for e in range(e0, e0 + n):
            p, length = id_pos[e], id_len[e]
            out[at:at + length] = id_buf[p:p + length]
            at += length


def encode_histories(columns: HistoryColumns) -> list[bytes]:
    """One :func:`streamer.codec.encode_history` blob per user of ``columns``."""
    ptr = columns.ptr
    users = ptr.shape[0] - 1
    id_bytes = np.zeros(columns.id_len.shape[0] + 1, np.int64)
    np.cumsum(columns.id_len, out=id_bytes[1:])
    sizes = _HEAD + _BYTES_PER_EVENT * np.diff(ptr) + (id_bytes[ptr[1:]] - id_bytes[ptr[:-1]])
    byte_ptr = np.zeros(users + 1, np.int64)
    np.cumsum(sizes, out=byte_ptr[1:])
    out = np.empty(int(byte_ptr[-1]), np.uint8)
    as_bytes = lambda a, dtype: np.ascontiguousarray(a, dtype=dtype).view(np.uint8)  # noqa: E731
    _encode(ptr, as_bytes(columns.weights, "<f4"), as_bytes(columns.times, "<f8"),
            as_bytes(columns.hashes, "<u8"), as_bytes(columns.id_len, "<u4"),
            columns.id_pos, columns.id_len, columns.id_buf, HISTORY_FORMAT, byte_ptr, out)
    mem = out.tobytes()
    bounds = byte_ptr.tolist()
    return [mem[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
