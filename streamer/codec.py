"""Binary encodings of what the state store keeps: user histories, vector records, offsets, outbox entries.

Every value starts with one format byte: the high nibble names the record type, the low
nibble its version (``0x11`` is a history, version 1). A reader therefore rejects both an old
or future version and bytes of the wrong type with :class:`StoreFormatError`, never with a
crash or a silently wrong value. Numbers are little-endian; strings are UTF-8.

Layouts (version 1)::

    history   B fmt | I n | f4[n] weights | f8[n] times | u8[n] event hashes | u4[n] id lengths | ids
    vector    B fmt | I k | q n_interactions | d last_event_time | d processed_at | H len | model version | f4[k]
    offset    B fmt | q offset
    text      B fmt | utf-8
    outbox    B fmt | B kind (1 vector, 2 tombstone) | I len | user id | vector record (kind 1 only)
    outbox key    >Q offset | user id          (big-endian, so keys sort in offset order)

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

OUTBOX_VECTOR = 1
OUTBOX_TOMBSTONE = 2

_HISTORY_HEAD = struct.Struct("<BI")
_HISTORY_BYTES_PER_EVENT = 4 + 8 + 8 + 4
_VECTOR_HEAD = struct.Struct("<BIqddH")
_OFFSET = struct.Struct("<Bq")
_OUTBOX_HEAD = struct.Struct("<BBI")
_OUTBOX_KEY_OFFSET = struct.Struct(">Q")
_MAX_MODEL_VERSION_BYTES = 0xFFFF


def _utf8(text: str, what: str) -> bytes:
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


@dataclass(frozen=True, eq=False)
class UserHistory:
    """One user's recent events, oldest first (sorted by event time, ties in arrival order).

    Build histories with ``UserHistory.empty().append(...)``; the constructor only checks
    that the four columns agree. Arrays are read-only.

    Parameters
    ----------
    item_ids : tuple of str
    weights : float32 array
    times : float64 array, seconds since the Unix epoch, non-decreasing
    event_hashes : uint64 array, 0 where the event had no id
    """

    item_ids: tuple[str, ...]
    weights: np.ndarray
    times: np.ndarray
    event_hashes: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        object.__setattr__(self, "item_ids", tuple(self.item_ids))
        for name, dtype in (("weights", np.float32), ("times", np.float64), ("event_hashes", np.uint64)):
            array = np.array(getattr(self, name), dtype=dtype).reshape(-1)
            if array.shape[0] != n:
                raise InvalidRecordError(f"history {name} must have {n} entries (one per item id), got {array.shape[0]}")
            object.__setattr__(self, name, _frozen(array))
        if n > 1 and bool(np.any(np.diff(self.times) < 0)):
            raise InvalidRecordError("history times must be non-decreasing; build histories with append()")

    @classmethod
    def empty(cls) -> "UserHistory":
        """A history with no events."""
        return cls((), np.empty(0, np.float32), np.empty(0, np.float64), np.empty(0, np.uint64))

    def __len__(self) -> int:
        return len(self.item_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserHistory):
            return NotImplemented
        return (
            self.item_ids == other.item_ids
            and np.array_equal(self.weights, other.weights)
            and np.array_equal(self.times, other.times)
            and np.array_equal(self.event_hashes, other.event_hashes)
        )

    def __repr__(self) -> str:
        return f"UserHistory(n={len(self)}, last_event_time={self.last_event_time})"

    @property
    def last_event_time(self) -> float:
        """Time of the newest event, NaN when empty."""
        return float(self.times[-1]) if len(self) else math.nan

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
        new_ids = list(item_ids)
        m = len(new_ids)
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
            bad = np.flatnonzero(~np.isfinite(array))
            if bad.size:
                raise InvalidRecordError(f"event {bad[0]}: {name} must be finite, got {array[bad[0]]}")
        for item in new_ids:
            _utf8(item, "item id")

        seen = set(self.event_hashes[self.event_hashes != 0].tolist())
        keep = np.ones(m, dtype=bool)
        for j, h in enumerate(new_h.tolist()):
            if h == 0:
                continue
            if h in seen:
                keep[j] = False
            else:
                seen.add(h)
        duplicates = int(m - keep.sum())

        n_old = len(self)
        ids = self.item_ids + tuple(i for i, k in zip(new_ids, keep) if k)
        w = np.concatenate([self.weights, new_w[keep]])
        t = np.concatenate([self.times, new_t[keep]])
        h = np.concatenate([self.event_hashes, new_h[keep]])
        order = np.argsort(t, kind="stable")
        evicted = max(0, order.shape[0] - max_events)
        order = order[evicted:]
        added = int(np.count_nonzero(order >= n_old))
        history = UserHistory(tuple(ids[i] for i in order.tolist()), w[order], t[order], h[order])
        return HistoryUpdate(history, added, duplicates, evicted)

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


def encode_history(history: UserHistory) -> bytes:
    """Bytes of a :class:`UserHistory` (layout in the module docstring)."""
    ids = [_utf8(i, "item id") for i in history.item_ids]
    lengths = np.fromiter((len(b) for b in ids), dtype="<u4", count=len(ids))
    return b"".join(
        [
            _HISTORY_HEAD.pack(HISTORY_FORMAT, len(ids)),
            history.weights.astype("<f4").tobytes(),
            history.times.astype("<f8").tobytes(),
            history.event_hashes.astype("<u8").tobytes(),
            lengths.tobytes(),
            *ids,
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
    for dtype, native in (("<f4", np.float32), ("<f8", np.float64), ("<u8", np.uint64), ("<u4", np.int64)):
        columns.append(np.frombuffer(buf, dtype=dtype, count=n, offset=pos).astype(native))
        pos += n * np.dtype(dtype).itemsize
    weights, times, hashes, lengths = columns
    if int(lengths.sum()) != len(buf) - pos:
        raise StoreFormatError(f"{what}: item ids need {int(lengths.sum())} bytes, got {len(buf) - pos}")
    if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(times))):
        raise StoreFormatError(f"{what}: non-finite weight or time")
    if n > 1 and bool(np.any(np.diff(times) < 0)):
        raise StoreFormatError(f"{what}: times are not sorted")
    ends = (pos + np.cumsum(lengths)).tolist()
    starts = [pos, *ends[:-1]]
    ids = tuple(_text(buf[a:b], what) for a, b in zip(starts, ends))
    return UserHistory(ids, weights, times, hashes)


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


def encode_vector_record(record: VectorRecord) -> bytes:
    """Bytes of a :class:`VectorRecord` (layout in the module docstring)."""
    version = record.model_version.encode("utf-8")
    head = _VECTOR_HEAD.pack(
        VECTOR_FORMAT,
        record.vector.shape[0],
        record.n_interactions,
        record.last_event_time,
        record.processed_at,
        len(version),
    )
    return head + version + record.vector.astype("<f4").tobytes()


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
