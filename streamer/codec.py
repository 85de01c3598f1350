"""Binary encodings of what the state store keeps: user histories, vector records, offsets, outbox entries.

Every value starts with one format byte: the high nibble names the record type, the low
nibble its version (``0x11`` is a history, version 1). A reader therefore rejects both an old
or future version and bytes of the wrong type with :class:`StoreFormatError`, never with a
crash or a silently wrong value. Numbers are little-endian; strings are UTF-8.

Layouts (version 1)::

    history   B fmt | I n | f4[n] weights | f8[n] times | u8[n] event hashes | u4[n] id lengths | ids
    head      B fmt | I evicted | history
    vector    B fmt | I k | q n_interactions | d last_event_time | d processed_at | H len | model version | f4[k]
    offset    B fmt | q offset
    text      B fmt | utf-8
    outbox    B fmt | B kind (1 vector, 2 tombstone) | I len | user id | vector record (kind 1 only)
    outbox key    >Q offset | user id          (big-endian, so keys sort in offset order)
    users     B fmt | I n | u4[n] id lengths | user ids     (an outbox entry of one batch, version 2)
    users key     >Q offset | >Q write sequence number

A user's history is stored in two parts, so that a new event rewrites a few events, not
all of them: the *sealed* part (a history record) and an optional *head* (a head record).
The history is the sealed part without its ``evicted`` oldest events (the cap dropped them
after it was written), followed by the head's events; :func:`join_history` checks and joins
the two parts.

Item and user ids are arbitrary Unicode; they must be encodable as strict UTF-8
(lone surrogates are refused).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from numpy.typing import ArrayLike

from streamer.errors import ConfigError, InvalidRecordError, StoreFormatError

HISTORY_FORMAT = 0x11
VECTOR_FORMAT = 0x21
OFFSET_FORMAT = 0x31
TEXT_FORMAT = 0x41
OUTBOX_FORMAT = 0x51
OUTBOX_USERS_FORMAT = 0x52
HISTORY_HEAD_FORMAT = 0x61

OUTBOX_VECTOR = 1
OUTBOX_TOMBSTONE = 2

_HISTORY_HEAD = struct.Struct("<BI")
_HISTORY_BYTES_PER_EVENT = 4 + 8 + 8 + 4
_HEAD_RECORD = struct.Struct("<BI")
_VECTOR_HEAD = struct.Struct("<BIqddH")
_OFFSET = struct.Struct("<Bq")
_OUTBOX_HEAD = struct.Struct("<BBI")
_OUTBOX_KEY_OFFSET = struct.Struct(">Q")
_OUTBOX_USERS_KEY = struct.Struct(">QQ")
_OUTBOX_USERS_HEAD = struct.Struct("<BI")
_MAX_MODEL_VERSION_BYTES = 0xFFFF


def _utf8(text: str, what: str) -> bytes:
    if type(text) is str and text.isascii():
        return text.encode("ascii")
    if not isinstance(text, str):
        raise InvalidRecordError(f"{what} must be str, got {type(text).__name__}: {text!r}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRecordError(f"{what} must be valid Unicode (no lone surrogates), got {text!r}") from exc


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreFormatError(f"{what}: invalid UTF-8 at byte {exc.start}") from exc


def _check_format(buf: bytes, expected: int, what: str, min_len: int) -> None:
    if len(buf) == 0:
        raise StoreFormatError(f"{what}: empty value, expected format byte {expected:#04x}")
    if buf[0] != expected:
        raise StoreFormatError(f"{what}: format byte must be {expected:#04x}, got {buf[0]:#04x}")
    if len(buf) < min_len:
        raise StoreFormatError(f"{what}: truncated, need at least {min_len} bytes, got {len(buf)}")


def encode_user_id(user_id: str) -> bytes:
    """Key bytes of a user id (strict UTF-8)."""
    if type(user_id) is str and user_id.isascii():
        return user_id.encode("ascii")
    return _utf8(user_id, "user id")


def decode_user_id(key: bytes) -> str:
    """The user id of a key; :class:`StoreFormatError` if it is not UTF-8."""
    return _text(key, "user id")


def event_id_hash(event_id: str | bytes | None) -> int:
    """The uint64 used to dedupe an event; 0 means "no id" and is never deduped.

    Parameters
    ----------
    event_id : str, bytes or None
        The producer's event id. ``None`` and empty ids hash to 0.

    Returns
    -------
    int
        The first 8 bytes of BLAKE2b of the UTF-8 id, little-endian; 1 if that happens to be 0.
    """
    if event_id is None or len(event_id) == 0:
        return 0
    data = _utf8(event_id, "event id") if isinstance(event_id, str) else bytes(event_id)
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return value or 1


# --------------------------------------------------------------------------- histories


class HistoryUpdate(NamedTuple):
    """What :meth:`UserHistory.append` did."""

    history: "UserHistory"
    added: int  # new events now in the history
    duplicates: int  # new events dropped because their event-id hash was already present
    evicted: int  # events (old or new) dropped by the cap


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


_NO_IDS = _frozen(np.empty(0, np.int64))


class UserHistory:
    """One user's recent events, oldest first (sorted by event time, ties in arrival order).

    Build histories with ``UserHistory.empty().append(...)``; the constructor only checks
    that the four columns agree. Arrays are read-only, and so are the attributes.

    The item ids are held as their UTF-8 bytes, concatenated, with one length per event
    (the stored layout), and turned into ``str`` only when ``item_ids`` is read: decoding,
    appending to and encoding a history then cost a few NumPy calls whatever its length.

    Parameters
    ----------
    item_ids : tuple of str
    weights : float32 array
    times : float64 array, seconds since the Unix epoch, non-decreasing
    event_hashes : uint64 array, 0 where the event had no id
    """

    __slots__ = ("_ids", "_blob", "_lengths", "_weights", "_times", "_hashes")

    def __init__(self, item_ids, weights, times, event_hashes) -> None:
        ids = tuple(item_ids)
        n = len(ids)
        columns = []
        for name, value, dtype in (("weights", weights, np.float32), ("times", times, np.float64),
                                   ("event_hashes", event_hashes, np.uint64)):
            array = np.array(value, dtype=dtype).reshape(-1)
            if array.shape[0] != n:
                raise InvalidRecordError(f"history {name} must have {n} entries (one per item id), got {array.shape[0]}")
            columns.append(_frozen(array))
        if n > 1 and bool(np.any(np.diff(columns[1]) < 0)):
            raise InvalidRecordError("history times must be non-decreasing; build histories with append()")
        self._set(ids, None, None, *columns)

    def _set(self, ids, blob, lengths, weights, times, hashes) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_ids", ids)
        setattr_(self, "_blob", blob)
        setattr_(self, "_lengths", lengths)
        setattr_(self, "_weights", weights)
        setattr_(self, "_times", times)
        setattr_(self, "_hashes", hashes)

    @classmethod
    def _from_columns(cls, blob: bytes, lengths: np.ndarray, weights: np.ndarray,
                      times: np.ndarray, hashes: np.ndarray, ids: tuple | None = None) -> "UserHistory":
        """A history from checked, read-only columns (no copies, no checks)."""
        history = cls.__new__(cls)
        history._set(ids, blob, lengths, weights, times, hashes)
        return history

    def __setattr__(self, name, value) -> None:
        raise AttributeError(f"UserHistory is immutable, cannot set {name!r}")

    def __reduce__(self):
        return UserHistory._from_columns, (*self._id_bytes(), self._weights, self._times, self._hashes)

    @classmethod
    def empty(cls) -> "UserHistory":
        """A history with no events."""
        return cls._from_columns(b"", _NO_IDS, _frozen(np.empty(0, np.float32)),
                                 _frozen(np.empty(0, np.float64)), _frozen(np.empty(0, np.uint64)), ())

    @property
    def item_ids(self) -> tuple[str, ...]:
        if self._ids is None:
            object.__setattr__(self, "_ids", _split_ids(self._blob, self._lengths))
        return self._ids

    @property
    def weights(self) -> np.ndarray:
        return self._weights

    @property
    def times(self) -> np.ndarray:
        return self._times

    @property
    def event_hashes(self) -> np.ndarray:
        return self._hashes

    def _id_bytes(self) -> tuple[bytes, np.ndarray]:
        """The item ids as (concatenated UTF-8, int64 byte length of each)."""
        if self._blob is None:
            encoded = [_utf8(i, "item id") for i in self._ids]
            lengths = _frozen(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
            object.__setattr__(self, "_lengths", lengths)
            object.__setattr__(self, "_blob", b"".join(encoded))
        return self._blob, self._lengths

    def __len__(self) -> int:
        return self._weights.shape[0]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserHistory):
            return NotImplemented
        return (
            self.item_ids == other.item_ids
            and np.array_equal(self.weights, other.weights)
            and np.array_equal(self.times, other.times)
            and np.array_equal(self.event_hashes, other.event_hashes)
        )

    __hash__ = None

    def __repr__(self) -> str:
        return f"UserHistory(n={len(self)}, last_event_time={self.last_event_time})"

    @property
    def last_event_time(self) -> float:
        """Time of the newest event, NaN when empty."""
        return float(self._times[-1]) if len(self) else math.nan

    def append(
        self,
        item_ids: Sequence[str],
        weights: ArrayLike,
        times: ArrayLike,
        event_hashes: ArrayLike | None = None,
        *,
        max_events: int,
    ) -> HistoryUpdate:
        """Add events, dropping duplicates, and keep the ``max_events`` most recent.

        Pure: returns a new history and leaves ``self`` unchanged.

        Dedupe: an event whose non-zero hash is already among the kept events (or earlier
        in this call) is a duplicate. Events with hash 0 are never deduped. Hashes live
        only with their entries, so once an event falls out of the cap its id can no
        longer be deduped; a redelivered evicted event is usually evicted again at once
        (it is older than everything kept) but, if its time ties the oldest kept event,
        it can come back. Redelivery of already-applied Kafka records is handled by the
        applied offset, not here.

        Cap: entries are ordered by event time (stable, so ties keep arrival order) and
        the oldest are evicted, so a late event older than all kept ones is dropped when
        the history is full.

        Parameters
        ----------
        item_ids : sequence of str
        weights : array-like of float, finite
        times : array-like of float, finite seconds
        event_hashes : array-like of uint64, optional
            From :func:`event_id_hash`; all 0 (no dedupe) when omitted.
        max_events : int
            The cap, >= 1.

        Returns
        -------
        HistoryUpdate
        """
        if max_events < 1:
            raise ConfigError(f"max_events must be >= 1, got {max_events}")
        m = len(item_ids)
        try:
            new_w = np.asarray(weights, dtype=np.float32).reshape(-1)
            new_t = np.asarray(times, dtype=np.float64).reshape(-1)
            new_h = np.zeros(m, np.uint64) if event_hashes is None else np.asarray(event_hashes, dtype=np.uint64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRecordError(f"append needs numbers (event hashes in 0..2**64-1), got {exc}") from exc
        for name, array in (("weights", new_w), ("times", new_t), ("event_hashes", new_h)):
            if array.shape[0] != m:
                raise InvalidRecordError(f"append {name} must have {m} entries (one per item id), got {array.shape[0]}")
        for name, array in (("weight", new_w), ("time", new_t)):
            if not np.isfinite(array).all():
                bad = np.flatnonzero(~np.isfinite(array))
                raise InvalidRecordError(f"event {bad[0]}: {name} must be finite, got {array[bad[0]]}")
        new_ids = [_utf8(item, "item id") for item in item_ids]
        batch = append_histories([self], [np.zeros(len(self), np.int32)], np.zeros(m, np.int64), new_ids, new_w, new_t,
                                 new_h, np.zeros(m, np.int32), max_events=max_events)
        return HistoryUpdate(batch.histories[0], int(batch.added[0]), int(batch.duplicates[0]),
                             int(batch.evicted[0]))

    def aggregate(self) -> tuple[list[str], np.ndarray]:
        """Distinct items in first-seen order and their summed weights, for fold-in.

        Returns
        -------
        item_ids : list of str
        weights : float32 array, summed in float64 then rounded once
        """
        index: dict[str, int] = {}
        inverse = np.fromiter((index.setdefault(i, len(index)) for i in self.item_ids), dtype=np.intp, count=len(self))
        sums = np.bincount(inverse, weights=self.weights.astype(np.float64), minlength=len(index))
        return list(index), sums.astype(np.float32)


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(lengths.shape[0], dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _take_bytes(blob: bytes, lengths: np.ndarray, order: np.ndarray) -> bytes:
    """The byte strings ``order`` picks out of ``blob`` (split by ``lengths``), concatenated.

    ``order`` is mostly runs of consecutive strings (a user's kept history, then its new
    events): one slice per run, so the cost follows the runs, not the bytes.
    """
    if order.shape[0] == 0:
        return b""
    starts = _starts(lengths)
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    first = order[np.concatenate([[0], breaks])]
    last = order[np.concatenate([breaks - 1, [order.shape[0] - 1]])]
    begin = starts[first].tolist()
    end = (starts[last] + lengths[last]).tolist()
    if len(begin) == 1:
        return blob[begin[0]:end[0]]
    return b"".join([blob[a:b] for a, b in zip(begin, end)])


def _split_ids(blob: bytes, lengths: np.ndarray) -> tuple[str, ...]:
    """The ids in ``blob``, already checked to be UTF-8 (see :func:`decode_history`)."""
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    if blob.isascii():
        text = blob.decode("ascii")
        return tuple([text[a:b] for a, b in zip(starts, ends)])
    return tuple([blob[a:b].decode("utf-8") for a, b in zip(starts, ends)])


class HistoryBatch(NamedTuple):
    """What :func:`append_histories` did, per history (arrays are indexed like ``bases``)."""

    histories: list[UserHistory]
    extras: list[np.ndarray]  # the caller's column, following its events
    added: np.ndarray
    duplicates: np.ndarray
    evicted: np.ndarray


def append_histories(
    bases: Sequence[UserHistory],
    base_extras: Sequence[np.ndarray],
    segments: np.ndarray,
    item_ids: Sequence[bytes],
    weights: np.ndarray,
    times: np.ndarray,
    hashes: np.ndarray,
    extras: np.ndarray,
    *,
    max_events: int,
) -> HistoryBatch:
    """:meth:`UserHistory.append` for many histories at once, in one NumPy pass over all events.

    New event ``j`` extends ``bases[segments[j]]``; events are given in arrival order. Same
    dedupe, order and cap as :meth:`UserHistory.append` (which calls this with one history).
    ``extras`` is a column of the caller's (an int32 per event, e.g. the item's row in the
    model), ``base_extras[u]`` the same for the events of ``bases[u]``: it is carried along
    and returned for the events kept.

    Parameters
    ----------
    bases : sequence of UserHistory
    base_extras : sequence of int32 arrays, ``len(base_extras[u]) == len(bases[u])``
    segments : int array (m,), values in ``range(len(bases))``
    item_ids : sequence of bytes (m), UTF-8 already checked
    weights : float32 array (m,), finite
    times : float64 array (m,), finite
    hashes : uint64 array (m,)
    extras : int32 array (m,)
    max_events : int, >= 1
    """
    if max_events < 1:
        raise ConfigError(f"max_events must be >= 1, got {max_events}")
    u_count = len(bases)
    m = len(item_ids)
    n_old = np.fromiter(map(len, bases), dtype=np.int64, count=u_count)
    old_ids = [b._id_bytes() for b in bases]
    blob = b"".join([ids for ids, _ in old_ids] + list(item_ids))
    lengths = np.concatenate([lengths for _, lengths in old_ids]
                             + [np.fromiter(map(len, item_ids), dtype=np.int64, count=m)])
    seg = np.concatenate([np.repeat(np.arange(u_count, dtype=np.int64), n_old),
                          np.asarray(segments, dtype=np.int64)])
    w = np.concatenate([b.weights for b in bases] + [weights]).astype(np.float32, copy=False)
    t = np.concatenate([b.times for b in bases] + [times]).astype(np.float64, copy=False)
    h = np.concatenate([b.event_hashes for b in bases] + [hashes]).astype(np.uint64, copy=False)
    x = np.concatenate(list(base_extras) + [extras]).astype(np.int32, copy=False)
    if x.shape[0] != seg.shape[0]:
        raise InvalidRecordError(f"extras must have one entry per event ({seg.shape[0]}), got {x.shape[0]}")
    first_new = int(n_old.sum())  # old events come first, so position = arrival order per history

    # Dedupe: a new event whose non-zero hash occurs earlier in its history (old events,
    # then earlier new ones) is dropped. Old events are never dropped.
    duplicate = np.zeros(seg.shape[0], dtype=bool)
    if m and bool((h[first_new:] != 0).any()):
        ends = np.cumsum(n_old).tolist()
        starts = [0, *ends[:-1]]
        seen: set[tuple[int, int]] = set()
        for j, (s, hj) in enumerate(zip(seg[first_new:].tolist(), h[first_new:].tolist())):
            if hj == 0:
                continue
            if (s, hj) in seen or (starts[s] < ends[s] and hj in h[starts[s]:ends[s]]):
                duplicate[first_new + j] = True
            else:
                seen.add((s, hj))

    # Group by history: its old events (stored in time order, and laid out history by
    # history) first, then its new ones in arrival order; built by placing indices, not
    # by sorting the old events again. Only a history whose new events are not the
    # newest, in order, needs a sort.
    new_kept = first_new + np.flatnonzero(~duplicate[first_new:])
    new_kept = new_kept[np.argsort(seg[new_kept], kind="stable")]
    n_new = np.bincount(seg[new_kept], minlength=u_count)
    group_starts = _starts(n_old + n_new)
    order = np.empty(first_new + new_kept.shape[0], dtype=np.int64)
    old_seg = seg[:first_new]
    order[np.arange(first_new) + (group_starts - _starts(n_old))[old_seg]] = np.arange(first_new)
    new_rank = np.arange(new_kept.shape[0]) - _starts(n_new)[seg[new_kept]]
    order[(group_starts + n_old)[seg[new_kept]] + new_rank] = new_kept
    seg_sorted = seg[order]
    counts = n_old + n_new
    t_sorted = t[order]
    late = np.flatnonzero((seg_sorted[1:] == seg_sorted[:-1]) & (t_sorted[1:] < t_sorted[:-1]))
    for u in np.unique(seg_sorted[late + 1]).tolist():
        a, b = group_starts[u], group_starts[u] + counts[u]
        part = order[a:b]
        order[a:b] = part[np.argsort(t[part], kind="stable")]  # ties keep arrival order

    # Keep each history's newest max_events.
    rank = np.arange(order.shape[0]) - group_starts[seg_sorted]
    final = order[rank >= (counts - max_events)[seg_sorted]]

    final_seg = seg[final]
    kept_counts = np.bincount(final_seg, minlength=u_count)
    added = np.bincount(final_seg[final >= first_new], minlength=u_count)
    duplicates = np.bincount(seg[duplicate], minlength=u_count)
    out_lengths = lengths[final]
    out_blob = _take_bytes(blob, lengths, final)
    columns = [_frozen(a) for a in (out_lengths, w[final], t[final], h[final], x[final])]
    bounds = np.concatenate([[0], np.cumsum(kept_counts)]).tolist()
    byte_bounds = np.concatenate([[0], np.cumsum(out_lengths)])[bounds].tolist()
    histories, out_extras = [], []
    for u in range(u_count):
        a, b = bounds[u], bounds[u + 1]
        histories.append(UserHistory._from_columns(out_blob[byte_bounds[u]:byte_bounds[u + 1]],
                                                   *(c[a:b] for c in columns[:4])))
        out_extras.append(columns[4][a:b])
    return HistoryBatch(histories, out_extras, added, duplicates, counts - kept_counts)


def encode_history(history: UserHistory) -> bytes:
    """Bytes of a :class:`UserHistory` (layout in the module docstring)."""
    blob, lengths = history._id_bytes()
    return b"".join(
        [
            _HISTORY_HEAD.pack(HISTORY_FORMAT, len(history)),
            np.asarray(history.weights, dtype="<f4").tobytes(),
            np.asarray(history.times, dtype="<f8").tobytes(),
            np.asarray(history.event_hashes, dtype="<u8").tobytes(),
            lengths.astype("<u4").tobytes(),
            blob,
        ]
    )


def decode_history(buf: bytes) -> UserHistory:
    """The :class:`UserHistory` in ``buf``; :class:`StoreFormatError` if it is not one."""
    what = "user history"
    _check_format(buf, HISTORY_FORMAT, what, _HISTORY_HEAD.size)
    _, n = _HISTORY_HEAD.unpack_from(buf)
    fixed = _HISTORY_HEAD.size + n * _HISTORY_BYTES_PER_EVENT
    if len(buf) < fixed:
        raise StoreFormatError(f"{what}: {n} events need at least {fixed} bytes, got {len(buf)}")
    pos = _HISTORY_HEAD.size
    columns = []
    for dtype in ("<f4", "<f8", "<u8", "<u4"):
        # Views of ``buf`` (read-only, as bytes are), converted only on a big-endian host.
        columns.append(np.frombuffer(buf, dtype=dtype, count=n, offset=pos))
        pos += n * columns[-1].itemsize
    weights, times, hashes = (c.astype(native, copy=False) for c, native in
                              zip(columns, (np.float32, np.float64, np.uint64)))
    lengths = _frozen(columns[3].astype(np.int64))
    if int(lengths.sum()) != len(buf) - pos:
        raise StoreFormatError(f"{what}: item ids need {int(lengths.sum())} bytes, got {len(buf) - pos}")
    if not (np.isfinite(weights).all() and np.isfinite(times).all()):
        raise StoreFormatError(f"{what}: non-finite weight or time")
    if n > 1 and bool((times[1:] < times[:-1]).any()):
        raise StoreFormatError(f"{what}: times are not sorted")
    weights, times, hashes = (_frozen(c) for c in (weights, times, hashes))
    blob = bytes(buf[pos:])
    _check_ids(blob, lengths, what)
    return UserHistory._from_columns(blob, lengths, weights, times, hashes)


def encode_history_head(evicted: int, history: UserHistory) -> bytes:
    """Bytes of a head record: ``history`` (the newest events), after which the ``evicted``
    oldest events of the stored sealed part no longer belong to the user's history."""
    if not 0 <= evicted <= 0xFFFFFFFF:
        raise InvalidRecordError(f"evicted must be in 0..2**32-1, got {evicted}")
    return _HEAD_RECORD.pack(HISTORY_HEAD_FORMAT, evicted) + encode_history(history)


def decode_history_head(buf: bytes) -> tuple[int, UserHistory]:
    """``(evicted, head events)`` of a head record; :class:`StoreFormatError` if it is not one."""
    _check_format(buf, HISTORY_HEAD_FORMAT, "history head", _HEAD_RECORD.size)
    _, evicted = _HEAD_RECORD.unpack_from(buf)
    return evicted, decode_history(buf[_HEAD_RECORD.size:])


def join_history(sealed: bytes | None, head: bytes | None) -> UserHistory:
    """A user's history from its stored parts (either may be missing, not both).

    The sealed part without its ``evicted`` oldest events, then the head's events;
    :class:`StoreFormatError` if either part is not valid, a head has no sealed part, it
    evicts more events than the sealed part has, or its events are older than the sealed
    part's newest kept event (a history is in time order).
    """
    if sealed is None and head is None:
        raise StoreFormatError("user history: neither a sealed part nor a head")
    base = decode_history(sealed) if sealed is not None else None
    if head is None:
        return base
    if base is None:
        raise StoreFormatError("user history: a head without a sealed part")
    evicted, tail = decode_history_head(head)
    if evicted > len(base):
        raise StoreFormatError(f"user history: the head evicts {evicted} events of a sealed part of {len(base)}")
    if evicted < len(base) and len(tail) and tail.times[0] < base.times[-1]:
        raise StoreFormatError("user history: the head's events are older than the sealed part's")
    blob, lengths = base._id_bytes()
    tail_blob, tail_lengths = tail._id_bytes()
    skip = int(lengths[:evicted].sum())
    return UserHistory._from_columns(
        blob[skip:] + tail_blob,
        *(_frozen(np.concatenate([a[evicted:], b])) for a, b in (
            (lengths, tail_lengths), (base.weights, tail.weights), (base.times, tail.times),
            (base.event_hashes, tail.event_hashes))))


def _check_ids(blob: bytes, lengths: np.ndarray, what: str) -> None:
    """Every id is strict UTF-8: so is the whole, and no id starts inside a character."""
    if blob.isascii():
        return
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreFormatError(f"{what}: invalid UTF-8 at byte {exc.start} of the item ids") from exc
    starts = _starts(lengths)[lengths > 0]
    inside = (np.frombuffer(blob, dtype=np.uint8)[starts] & 0xC0) == 0x80
    if inside.any():
        raise StoreFormatError(f"{what}: invalid UTF-8: item id {int(np.flatnonzero(lengths > 0)[inside.argmax()])} "
                               f"starts inside a character")


# --------------------------------------------------------------------------- vectors


@dataclass(frozen=True, eq=False)
class VectorRecord:
    """A user's latent vector and where it came from.

    Parameters
    ----------
    vector : float32 array of shape (k,), finite
    model_version : str
        Version of the item factors the vector was folded in against.
    n_interactions : int
        Events in the history it was computed from, >= 0.
    last_event_time : float
        Newest event time in that history (seconds; NaN allowed when there were none).
    processed_at : float
        Wall-clock seconds when it was computed.
    """

    vector: np.ndarray
    model_version: str
    n_interactions: int
    last_event_time: float
    processed_at: float

    def __post_init__(self) -> None:
        vector = np.array(self.vector, dtype=np.float32)
        if vector.ndim != 1:
            raise InvalidRecordError(f"vector must be 1-D, got shape {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise InvalidRecordError(f"vector must be finite, got {vector[~np.isfinite(vector)][0]} in it")
        object.__setattr__(self, "vector", _frozen(vector))
        if len(_utf8(self.model_version, "model_version")) > _MAX_MODEL_VERSION_BYTES:
            raise InvalidRecordError(f"model_version must be <= {_MAX_MODEL_VERSION_BYTES} UTF-8 bytes, got {len(self.model_version.encode())}")
        n = int(self.n_interactions)
        if not 0 <= n < 2**63:
            raise InvalidRecordError(f"n_interactions must be >= 0, got {self.n_interactions}")
        object.__setattr__(self, "n_interactions", n)
        object.__setattr__(self, "last_event_time", float(self.last_event_time))
        object.__setattr__(self, "processed_at", float(self.processed_at))

    @classmethod
    def many(cls, vectors: np.ndarray, model_version: str, n_interactions: Sequence[int],
             last_event_times: Sequence[float], processed_at: float) -> list["VectorRecord"]:
        """One record per row of ``vectors``, checked once for all rows (same checks)."""
        vectors = _frozen(np.array(vectors, dtype=np.float32))
        if vectors.ndim != 2:
            raise InvalidRecordError(f"vectors must be 2-D, got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise InvalidRecordError(f"vector must be finite, got {vectors[~np.isfinite(vectors)][0]} in it")
        if len(_utf8(model_version, "model_version")) > _MAX_MODEL_VERSION_BYTES:
            raise InvalidRecordError(f"model_version must be <= {_MAX_MODEL_VERSION_BYTES} UTF-8 bytes, got {len(model_version.encode())}")
        counts = [int(n) for n in n_interactions]
        if len(counts) != vectors.shape[0] or len(last_event_times) != vectors.shape[0]:
            raise InvalidRecordError(f"need one count and one time per vector ({vectors.shape[0]}), got "
                                     f"{len(counts)} and {len(last_event_times)}")
        if counts and not (0 <= min(counts) and max(counts) < 2**63):
            raise InvalidRecordError(f"n_interactions must be >= 0, got {min(counts)}")
        processed_at = float(processed_at)
        lasts = [float(t) for t in last_event_times]
        encoded = _encode_vector_records(vectors, model_version, counts, lasts, processed_at)
        records = []
        new, setattr_ = object.__new__, object.__setattr__
        for vector, n, last, blob in zip(vectors, counts, lasts, encoded):
            record = new(cls)
            setattr_(record, "vector", vector)
            setattr_(record, "model_version", model_version)
            setattr_(record, "n_interactions", n)
            setattr_(record, "last_event_time", last)
            setattr_(record, "processed_at", processed_at)
            setattr_(record, "_encoded", blob)  # what encode_vector_record would give
            records.append(record)
        return records

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VectorRecord):
            return NotImplemented
        same_time = self.last_event_time == other.last_event_time or (
            math.isnan(self.last_event_time) and math.isnan(other.last_event_time)
        )
        return (
            np.array_equal(self.vector, other.vector)
            and self.model_version == other.model_version
            and self.n_interactions == other.n_interactions
            and same_time
            and self.processed_at == other.processed_at
        )

    def __repr__(self) -> str:
        return (
            f"VectorRecord(k={self.vector.shape[0]}, model_version={self.model_version!r}, "
            f"n_interactions={self.n_interactions}, last_event_time={self.last_event_time}, "
            f"processed_at={self.processed_at})"
        )


def _encode_vector_records(vectors: np.ndarray, model_version: str, counts: list[int],
                           lasts: list[float], processed_at: float) -> list[bytes]:
    """:func:`encode_vector_record` of many records of one model version, in one pass:
    every record then has the same length, so all are rows of one byte matrix."""
    version = model_version.encode("utf-8")
    n, k = vectors.shape
    head = _VECTOR_HEAD.size
    size = head + len(version) + 4 * k
    rows = np.empty((n, size), np.uint8)
    rows[:, :5] = np.frombuffer(struct.pack("<BI", VECTOR_FORMAT, k), np.uint8)
    rows[:, 5:13] = np.asarray(counts, dtype="<i8").reshape(n, 1).view(np.uint8)
    rows[:, 13:21] = np.asarray(lasts, dtype="<f8").reshape(n, 1).view(np.uint8)
    rows[:, 21:head] = np.frombuffer(struct.pack("<dH", processed_at, len(version)), np.uint8)
    rows[:, head:head + len(version)] = np.frombuffer(version, np.uint8)
    rows[:, head + len(version):] = np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8)
    mem = rows.tobytes()
    return [mem[i:i + size] for i in range(0, n * size, size)]


def encode_vector_record(record: VectorRecord) -> bytes:
    """Bytes of a :class:`VectorRecord` (layout in the module docstring).

    Records are immutable, so the bytes are kept on the record: the store writes them
    twice per update (the vector, and inside its outbox entry).
    """
    encoded = record.__dict__.get("_encoded")
    if encoded is None:
        version = record.model_version.encode("utf-8")
        head = _VECTOR_HEAD.pack(
            VECTOR_FORMAT,
            record.vector.shape[0],
            record.n_interactions,
            record.last_event_time,
            record.processed_at,
            len(version),
        )
        encoded = head + version + np.asarray(record.vector, dtype="<f4").tobytes()
        object.__setattr__(record, "_encoded", encoded)
    return encoded


def decode_vector_record(buf: bytes) -> VectorRecord:
    """The :class:`VectorRecord` in ``buf``; :class:`StoreFormatError` if it is not one."""
    what = "vector record"
    _check_format(buf, VECTOR_FORMAT, what, _VECTOR_HEAD.size)
    _, k, n, last, processed, version_len = _VECTOR_HEAD.unpack_from(buf)
    expected = _VECTOR_HEAD.size + version_len + 4 * k
    if len(buf) != expected:
        raise StoreFormatError(f"{what}: k={k} and a {version_len}-byte model version need {expected} bytes, got {len(buf)}")
    if n < 0:
        raise StoreFormatError(f"{what}: n_interactions must be >= 0, got {n}")
    version = _text(buf[_VECTOR_HEAD.size : _VECTOR_HEAD.size + version_len], what)
    vector = np.frombuffer(buf, dtype="<f4", count=k, offset=_VECTOR_HEAD.size + version_len).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise StoreFormatError(f"{what}: non-finite factor")
    return VectorRecord(vector, version, n, last, processed)


def vector_of_version(buf: bytes, model_version: str) -> np.ndarray | None:
    """The factors of a vector record when it was computed against ``model_version``,
    else None: a light read for monitoring samples (the layout is checked, the values
    are not; :func:`decode_vector_record` checks everything)."""
    what = "vector record"
    _check_format(buf, VECTOR_FORMAT, what, _VECTOR_HEAD.size)
    k = int.from_bytes(buf[1:5], "little")
    version_len = int.from_bytes(buf[_VECTOR_HEAD.size - 2:_VECTOR_HEAD.size], "little")
    if len(buf) != _VECTOR_HEAD.size + version_len + 4 * k:
        raise StoreFormatError(f"{what}: k={k} and a {version_len}-byte model version need "
                               f"{_VECTOR_HEAD.size + version_len + 4 * k} bytes, got {len(buf)}")
    if buf[_VECTOR_HEAD.size:_VECTOR_HEAD.size + version_len] != model_version.encode("utf-8"):
        return None
    return np.frombuffer(buf, dtype="<f4", count=k, offset=_VECTOR_HEAD.size + version_len).astype(np.float32)


# --------------------------------------------------------------------------- offsets, text


def encode_offset(offset: int) -> bytes:
    """Bytes of an int64 offset."""
    if not -(2**63) <= offset < 2**63:
        raise InvalidRecordError(f"offset must fit int64, got {offset}")
    return _OFFSET.pack(OFFSET_FORMAT, offset)


def decode_offset(buf: bytes) -> int:
    """The offset in ``buf``; :class:`StoreFormatError` if it is not one."""
    _check_format(buf, OFFSET_FORMAT, "offset", _OFFSET.size)
    if len(buf) != _OFFSET.size:
        raise StoreFormatError(f"offset: must be {_OFFSET.size} bytes, got {len(buf)}")
    return _OFFSET.unpack(buf)[1]


def encode_text(text: str) -> bytes:
    """Bytes of a short string (the model version in meta)."""
    return bytes([TEXT_FORMAT]) + _utf8(text, "text")


def decode_text(buf: bytes) -> str:
    """The string in ``buf``; :class:`StoreFormatError` if it is not one."""
    _check_format(buf, TEXT_FORMAT, "text", 1)
    return _text(buf[1:], "text")


# --------------------------------------------------------------------------- outbox


class OutboxEntry(NamedTuple):
    """A vector (or a deletion) waiting to be published; ``record is None`` is a tombstone."""

    key: bytes
    offset: int
    user_id: str
    record: VectorRecord | None


def encode_outbox_key(offset: int, user_id: str) -> bytes:
    """Outbox key: big-endian offset then the user id, so keys sort in commit order."""
    if not 0 <= offset < 2**63:
        raise InvalidRecordError(f"outbox offset must be >= 0, got {offset}")
    return _OUTBOX_KEY_OFFSET.pack(offset) + _utf8(user_id, "user id")


def decode_outbox_key(key: bytes) -> tuple[int, str]:
    """``(offset, user_id)`` of an outbox key."""
    if len(key) < _OUTBOX_KEY_OFFSET.size:
        raise StoreFormatError(f"outbox key: need at least {_OUTBOX_KEY_OFFSET.size} bytes, got {len(key)}")
    return _OUTBOX_KEY_OFFSET.unpack_from(key)[0], _text(key[_OUTBOX_KEY_OFFSET.size :], "outbox key")


def encode_outbox_value(user_id: str, record: VectorRecord | None) -> bytes:
    """Outbox value: the user id and its new vector record, or a tombstone when ``record`` is None."""
    uid = _utf8(user_id, "user id")
    kind = OUTBOX_TOMBSTONE if record is None else OUTBOX_VECTOR
    body = b"" if record is None else encode_vector_record(record)
    return _OUTBOX_HEAD.pack(OUTBOX_FORMAT, kind, len(uid)) + uid + body


def encode_outbox_users_key(offset: int, sequence: int) -> bytes:
    """Key of a batch's outbox entry: its offset, then the database write that holds it
    (both big-endian: keys sort in commit order, and two writes at one offset differ)."""
    if not (0 <= offset < 2**63 and 0 <= sequence < 2**64):
        raise InvalidRecordError(f"outbox key: offset and sequence must be >= 0, got {offset}, {sequence}")
    return _OUTBOX_USERS_KEY.pack(offset, sequence)


def decode_outbox_users_key(key: bytes) -> tuple[int, int]:
    """``(offset, sequence)`` of a batch's outbox key."""
    if len(key) != _OUTBOX_USERS_KEY.size:
        raise StoreFormatError(f"outbox users key: must be {_OUTBOX_USERS_KEY.size} bytes, got {len(key)}")
    return _OUTBOX_USERS_KEY.unpack(key)


def encode_outbox_users(user_ids: Sequence[str]) -> bytes:
    """A batch's outbox entry: the users whose state (stored vector, or none: a tombstone)
    is to be published."""
    ids = [_utf8(u, "user id") for u in user_ids]
    return b"".join([_OUTBOX_USERS_HEAD.pack(OUTBOX_USERS_FORMAT, len(ids)),
                     np.fromiter(map(len, ids), dtype="<u4", count=len(ids)).tobytes(), *ids])


def decode_outbox_users(buf: bytes) -> list[str]:
    """The user ids of a batch's outbox entry; :class:`StoreFormatError` if it is not one."""
    what = "outbox users"
    _check_format(buf, OUTBOX_USERS_FORMAT, what, _OUTBOX_USERS_HEAD.size)
    _, n = _OUTBOX_USERS_HEAD.unpack_from(buf)
    start = _OUTBOX_USERS_HEAD.size + 4 * n
    if len(buf) < start:
        raise StoreFormatError(f"{what}: {n} users need at least {start} bytes, got {len(buf)}")
    lengths = np.frombuffer(buf, dtype="<u4", count=n, offset=_OUTBOX_USERS_HEAD.size).astype(np.int64)
    if int(lengths.sum()) != len(buf) - start:
        raise StoreFormatError(f"{what}: user ids need {int(lengths.sum())} bytes, got {len(buf) - start}")
    bounds = (start + np.concatenate([[0], np.cumsum(lengths)])).tolist()
    return [_text(buf[a:b], what) for a, b in zip(bounds[:-1], bounds[1:])]


def decode_outbox_value(buf: bytes) -> tuple[str, VectorRecord | None]:
    """``(user_id, record)`` of an outbox value; ``record`` is None for a tombstone."""
    what = "outbox entry"
    _check_format(buf, OUTBOX_FORMAT, what, _OUTBOX_HEAD.size)
    _, kind, uid_len = _OUTBOX_HEAD.unpack_from(buf)
    end = _OUTBOX_HEAD.size + uid_len
    if len(buf) < end:
        raise StoreFormatError(f"{what}: a {uid_len}-byte user id needs {end} bytes, got {len(buf)}")
    user_id = _text(buf[_OUTBOX_HEAD.size : end], what)
    if kind == OUTBOX_TOMBSTONE:
        if len(buf) != end:
            raise StoreFormatError(f"{what}: tombstone must be {end} bytes, got {len(buf)}")
        return user_id, None
    if kind == OUTBOX_VECTOR:
        return user_id, decode_vector_record(buf[end:])
    raise StoreFormatError(f"{what}: kind must be {OUTBOX_VECTOR} or {OUTBOX_TOMBSTONE}, got {kind}")
