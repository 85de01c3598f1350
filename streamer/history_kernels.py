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
- :func:`encode_histories`: columns -> one encoded history (or head record) per user,
  byte for byte what :func:`streamer.codec.encode_history` (``encode_history_head``) gives;
- :func:`check_history_parts` and :func:`visible_events`: a history stored as a sealed part
  and a head (:mod:`streamer.codec`) read back, checked and joined;
- :func:`take_merged`: the merged histories' columns, picked from the old and new events;
- :func:`plan_history_writes`: for each merged history, whether a head record is enough
  (its sealed part is still a prefix of it) or the whole history must be written again.

NumPy references, which the tests hold these kernels to: :func:`streamer.codec.decode_history`
(check, parse), :func:`streamer.codec.append_histories` (merge), :func:`streamer.codec.encode_history`
(encode), :func:`streamer.codec.join_history` (parts), :func:`take_merged_reference` (take),
:func:`plan_history_writes_reference` (plan). The history layout is documented in
:mod:`streamer.codec`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numba as nb
import numpy as np

from streamer.codec import HISTORY_FORMAT, HISTORY_HEAD_FORMAT, decode_history, join_history

_HEAD = 5  # format byte, uint32 event count
_RECORD_HEAD = 5  # of a head record, before its history: format byte, uint32 evicted count
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
def _encode(starts, ends, evicted, wb, tb, hb, lb, id_pos, id_len, id_buf, fmt, head_fmt, byte_ptr, out):
    for u in range(starts.shape[0]):
        e0, n = starts[u], ends[u] - starts[u]
        at = byte_ptr[u]
        if evicted[u] >= 0:  # a head record around the history
            out[at] = head_fmt
            for b in range(4):
                out[at + 1 + b] = (evicted[u] >> (8 * b)) & 0xFF
            at += _RECORD_HEAD
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


def encode_histories(columns: HistoryColumns, starts: np.ndarray | None = None,
                     ends: np.ndarray | None = None, evicted: np.ndarray | None = None) -> list[bytes]:
    """One :func:`streamer.codec.encode_history` blob per user of ``columns``.

    With ``starts`` / ``ends``, one blob of rows ``starts[j]:ends[j]`` each instead; where
    ``evicted[j] >= 0``, that blob is the head record
    ``codec.encode_history_head(evicted[j], ...)`` of those rows.
    """
    if starts is None:
        starts, ends = columns.ptr[:-1], columns.ptr[1:]
    users = starts.shape[0]
    if evicted is None:
        evicted = np.full(users, -1, np.int64)
    id_bytes = np.zeros(columns.id_len.shape[0] + 1, np.int64)
    np.cumsum(columns.id_len, out=id_bytes[1:])
    sizes = (_HEAD + _BYTES_PER_EVENT * (ends - starts) + (id_bytes[ends] - id_bytes[starts])
             + np.where(evicted >= 0, _RECORD_HEAD, 0))
    byte_ptr = np.zeros(users + 1, np.int64)
    np.cumsum(sizes, out=byte_ptr[1:])
    out = np.empty(int(byte_ptr[-1]), np.uint8)
    as_bytes = lambda a, dtype: np.ascontiguousarray(a, dtype=dtype).view(np.uint8)  # noqa: E731
    _encode(np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(evicted, np.int64),
            as_bytes(columns.weights, "<f4"), as_bytes(columns.times, "<f8"),
            as_bytes(columns.hashes, "<u8"), as_bytes(columns.id_len, "<u4"),
            columns.id_pos, columns.id_len, columns.id_buf, HISTORY_FORMAT, HISTORY_HEAD_FORMAT,
            byte_ptr, out)
    mem = out.tobytes()
    bounds = byte_ptr.tolist()
    return [mem[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- sealed part + head

# A head grows by each user's new events until it holds more than
# max(HEAD_MIN_EVENTS, sqrt(2 n)) events (n: the sealed events it follows), or the cap has
# evicted that many sealed events; then the whole history is written again as the new
# sealed part. Writing h head events per update and n events every sqrt(2 n) updates
# costs about sqrt(2 n) events per update, the least any such bound gives, where writing
# the whole history each time costs n: at the default cap of 1,000, 45 instead of 1,000.
HEAD_MIN_EVENTS = 16


def count_events(history: bytes) -> int:
    """Events in an encoded history (checked, or this process's own)."""
    return int.from_bytes(history[1:_HEAD], "little")


def split_head_record(record: bytes) -> tuple[int, bytes]:
    """``(evicted, encoded history)`` of a head record (checked by
    :func:`check_history_parts`, or this process's own :func:`encode_histories` output)."""
    return int.from_bytes(record[1:_RECORD_HEAD], "little"), record[_RECORD_HEAD:]


def check_history_parts(parts: Sequence[tuple[bytes | None, bytes | None]]) -> None:
    """Raise :class:`streamer.errors.StoreFormatError` unless every ``(sealed part, head
    record)`` read from the store is a valid history: what :func:`streamer.codec.join_history`
    (the reference) accepts, in two kernel calls (both parts, then where they join); a
    failing user goes to that function itself, for its message.
    """
    blobs, pairs = [], []
    for sealed, head in parts:
        if head is None:
            if sealed is not None:
                blobs.append(sealed)
        elif sealed is None or len(head) < _RECORD_HEAD or head[0] != HISTORY_HEAD_FORMAT:
            join_history(sealed, head)  # raises
        else:
            pairs.append((sealed, head))
    for sealed, head in pairs:
        blobs += [sealed, head[_RECORD_HEAD:]]
    check_histories(blobs)
    if not pairs:
        return
    joined = [part for sealed, head in pairs for part in (sealed, head)]
    lengths = np.fromiter(map(len, joined), dtype=np.int64, count=len(joined))
    starts = np.zeros(len(joined), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ok = np.zeros(len(pairs), np.bool_)
    _check_joins(np.frombuffer(b"".join(joined), dtype=np.uint8), starts, ok)
    for u in np.flatnonzero(~ok).tolist():
        join_history(*pairs[u])  # raises


@nb.njit(cache=True, nogil=True)
def _check_joins(buf, starts, ok):
    """Per (sealed part, head record) pair, both valid: the head evicts at most the sealed
    part's events and starts no earlier than its newest kept one."""
    t8 = np.empty(8, np.uint8)
    tv = t8.view(np.float64)
    for u in range(ok.shape[0]):
        s, h = starts[2 * u], starts[2 * u + 1]
        n = _read_u32(buf, s + 1)
        evicted = _read_u32(buf, h + 1)
        m = _read_u32(buf, h + _RECORD_HEAD + 1)
        if evicted > n:
            continue
        if evicted < n and m > 0:
            at = s + _HEAD + 4 * n + 8 * (n - 1)
            t8[:] = buf[at:at + 8]
            last = tv[0]
            at = h + _RECORD_HEAD + _HEAD + 4 * m
            t8[:] = buf[at:at + 8]
            if tv[0] < last:
                continue
        ok[u] = True


@nb.njit(cache=True, nogil=True)
def _visible(ptr2, evicted, ptr, idx):
    at = 0
    for u in range(evicted.shape[0]):
        for e in range(ptr2[2 * u] + evicted[u], ptr2[2 * u + 2]):
            idx[at] = e
            at += 1
        ptr[u + 1] = at


def visible_events(ptr2: np.ndarray, evicted: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The histories of parsed parts: ``ptr2`` has two rows per user (sealed part, head);
    a history is its sealed part without the ``evicted[u]`` oldest events, then its head.

    Returns ``(ptr, idx)``: the histories' indptr, and the parsed rows they hold (None when
    nothing is evicted: then the rows are all of them, in order).
    """
    if not evicted.any():
        return np.ascontiguousarray(ptr2[::2]), None
    users = evicted.shape[0]
    ptr = np.zeros(users + 1, np.int64)
    idx = np.empty(int(ptr2[-1] - evicted.sum()), np.int64)
    _visible(ptr2, evicted, ptr, idx)
    return ptr, idx


@nb.njit(cache=True, nogil=True)
def _take_merged(source, n_old, index, old_w, old_t, old_h, old_pos, old_len, new_w, new_t, new_h,
                 new_pos, new_len, rows_in, w, t, h, pos, length, rows):
    with_index = index.shape[0] > 0
    for j in range(source.shape[0]):
        s = source[j]
        rows[j] = rows_in[s]
        if s < n_old:
            e = index[s] if with_index else s
            w[j], t[j], h[j], pos[j], length[j] = old_w[e], old_t[e], old_h[e], old_pos[e], old_len[e]
        else:
            e = s - n_old
            w[j], t[j], h[j], pos[j], length[j] = new_w[e], new_t[e], new_h[e], new_pos[e], new_len[e]


def take_merged(source: np.ndarray, old: HistoryColumns, index: np.ndarray | None, new: HistoryColumns,
                rows: np.ndarray) -> tuple[HistoryColumns, np.ndarray]:
    """The merged histories' columns and item rows, in one pass over them.

    ``source`` (from :func:`merge_new_events`) picks each merged event from the old events
    (``s < n_old``, where ``n_old = len(index)``, or all of ``old``'s rows without an
    index) or the new ones (``s - n_old``); ``index`` maps old event ``s`` to its row of
    ``old``'s columns (:func:`visible_events`), so the evicted rows are never copied.
    ``rows`` holds the item row of every old event, then of every new one; ``new.ptr`` is
    not read, and the result takes ``old.id_buf`` (the new events' ids lie in it).
    Concatenating and indexing each column in NumPy took 4-5 passes over every old event
    of the batch per column: :func:`take_merged_reference`.
    """
    n_old = old.weights.shape[0] if index is None else index.shape[0]
    n = source.shape[0]
    out = (np.empty(n, np.float32), np.empty(n, np.float64), np.empty(n, np.uint64),
           np.empty(n, np.int64), np.empty(n, np.int64))
    rows_out = np.empty(n, rows.dtype)
    _take_merged(source, n_old, _NO_INDEX if index is None else index, *old[1:6], *new[1:6], rows,
                 *out, rows_out)
    return HistoryColumns(None, *out, old.id_buf), rows_out


def take_merged_reference(source, old, index, new, rows):
    """NumPy reference of :func:`take_merged`."""
    picked = [c if index is None else c[index] for c in old[1:6]]
    columns = [np.concatenate([a, b])[source] for a, b in zip(picked, new[1:6])]
    return HistoryColumns(None, *columns, old.id_buf), np.asarray(rows)[source]


_NO_INDEX = np.zeros(0, np.int64)


@nb.njit(cache=True, nogil=True)
def plan_history_writes(ptr, source, old_ptr, sealed_kept, evicted, whole, min_head):
    """Which merged histories need only a new head, and what it holds.

    Parameters
    ----------
    ptr, source : from :func:`merge_new_events` (merged rows; old row ``i`` is ``source == i``)
    old_ptr : int64 (users + 1,)
        The old histories' rows: each user's first ``sealed_kept[u]`` are its sealed part's
        events still in it, the rest its head's.
    sealed_kept : int64 (users,)
    evicted : int64 (users,)
        Sealed events the stored head already evicts.
    whole : bool (users,)
        Users whose whole history must be written (no sealed part stored, or forgotten).
    min_head : int
        :data:`HEAD_MIN_EVENTS`.

    Returns
    -------
    head_from : int64 (users,)
        -1: write the whole history; else the merged row where the new head starts (the
        rows before it are the sealed part's events ``evicted_total - evicted`` onwards).
    evicted_total : int64 (users,)
        The new head's ``evicted`` count (where ``head_from >= 0``).
    """
    users = ptr.shape[0] - 1
    head_from = np.full(users, -1, np.int64)
    evicted_total = np.zeros(users, np.int64)
    for u in range(users):
        if whole[u]:
            continue
        r0, r1 = ptr[u], ptr[u + 1]
        base, kept = old_ptr[u], sealed_kept[u]
        # The merged history must start with the sealed events the cap left, in order.
        first = kept
        if r1 > r0 and base <= source[r0] < base + kept:
            first = source[r0] - base
        keep = kept - first
        if keep > r1 - r0:
            continue
        prefix = True
        for i in range(keep):
            if source[r0 + i] != base + first + i:
                prefix = False
                break
        for r in range(r0 + keep, r1):  # and none of them further on
            if base <= source[r] < base + kept:
                prefix = False
                break
        if not prefix:
            continue
        total = evicted[u] + first
        bound = max(min_head, int(np.sqrt(2.0 * keep)))
        if r1 - r0 - keep > bound or total > bound:
            continue
        head_from[u] = r0 + keep
        evicted_total[u] = total
    return head_from, evicted_total


def plan_history_writes_reference(ptr, source, old_ptr, sealed_kept, evicted, whole, min_head):
    """NumPy reference of :func:`plan_history_writes` (a user at a time)."""
    users = len(ptr) - 1
    head_from = np.full(users, -1, np.int64)
    evicted_total = np.zeros(users, np.int64)
    for u in range(users):
        if whole[u]:
            continue
        rows = np.asarray(source[ptr[u]:ptr[u + 1]])
        sealed = np.arange(old_ptr[u], old_ptr[u] + sealed_kept[u])
        in_sealed = np.isin(rows, sealed)
        keep = int(in_sealed.sum())
        # The sealed events still in the history are its first rows, consecutive and
        # ending with the sealed part's newest; none of them further on.
        if not (in_sealed[:keep].all() and np.array_equal(rows[:keep], sealed[len(sealed) - keep:])):
            continue
        first = len(sealed) - keep
        total = evicted[u] + first
        bound = max(min_head, int(np.sqrt(2.0 * keep)))
        if len(rows) - keep > bound or total > bound:
            continue
        head_from[u] = ptr[u] + keep
        evicted_total[u] = total
    return head_from, evicted_total
