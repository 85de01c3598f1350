"""The producer contract: decode one Kafka record into an interaction, a forget, or a rejection.

A record on the interactions topic has key = user id (UTF-8) and value = UTF-8 JSON::

    {"user": "u1", "item": "i9", "ts": 1700000000.5, "weight": 2.0,
     "event": "click", "event_id": "c0ffee"}

``user`` and ``item`` are required; ``ts`` (seconds since the epoch, or an ISO-8601
string; default: the record's broker timestamp), ``weight`` (default: the weight of
``event`` from the config, else ``processing.default_weight``), ``event`` and
``event_id`` (drops re-sent duplicates) are optional. Unknown fields are ignored.
A null value (tombstone) for a user key means: forget that user.

Anything else becomes a :class:`Rejected` with a machine-readable ``reason`` that the
consumer sends to the dead-letter topic, together with the original bytes.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
import orjson

from streamer.codec import event_id_hash
from streamer.config import ProcessingConfig
from streamer.errors import InvalidRecordError
from streamer.event_kernels import event_id_hashes, scan_interactions

# Reasons a record is dead-lettered (the ``reason`` header, and a metric label).
REASONS = (
    "missing_key",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_id",
    "key_mismatch",
    "invalid_weight",
    "invalid_timestamp",
    "unknown_event",
)


# Named tuples, not dataclasses: one is built per record, and a tuple is built in C.
class Interaction(NamedTuple):
    user: str
    item: str
    weight: float
    ts: float
    event_id_hash: int  # 0 when the event carries no event_id
    offset: int


class Forget(NamedTuple):
    user: str
    offset: int


class Rejected(NamedTuple):
    reason: str
    detail: str
    offset: int


Decoded = Interaction | Forget | Rejected


class InteractionColumns(NamedTuple):
    """A batch whose every record is an interaction, as columns (what
    :meth:`EventDecoder.decode_batch` returns for the common case): record ``r`` is
    ``Interaction(keys[r].decode(), ids[item_pos[r]:item_pos[r] + item_len[r]].decode(),
    weights[r], times[r], hashes[r], offsets[r])``; ids are ASCII."""

    keys: list  # bytes: the user ids
    ids: bytes  # holds the item ids
    item_pos: np.ndarray  # int64
    item_len: np.ndarray  # int64
    weights: np.ndarray  # float64
    times: np.ndarray  # float64
    hashes: np.ndarray  # uint64
    offsets: list  # int

    def items(self) -> list[str]:
        """The item ids, as str."""
        ids = self.ids
        return [ids[p:p + n].decode("ascii")
                for p, n in zip(self.item_pos.tolist(), self.item_len.tolist())]

    def interactions(self) -> list[Interaction]:
        """The records as :class:`Interaction` tuples."""
        return list(map(Interaction, [k.decode("ascii") for k in self.keys], self.items(),
                        self.weights.tolist(), self.times.tolist(), self.hashes.tolist(),
                        self.offsets))


def parse_timestamp(value: object) -> float:
    """Seconds since the epoch from a number or an ISO-8601 string (naive means UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"ts must be a number or an ISO-8601 string, got {value!r}")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        ts = parsed.timestamp()
    else:
        raise ValueError(f"ts must be a number or an ISO-8601 string, got {value!r}")
    if not math.isfinite(ts):
        raise ValueError(f"ts must be finite, got {value!r}")
    return ts


class EventDecoder:
    """Validates records against the producer contract. Pure: no I/O, never raises on input."""

    def __init__(self, config: ProcessingConfig) -> None:
        self.config = config
        self._event_weights = dict(config.event_weights)
        self._max_id = config.max_id_bytes
        self._default_weight = float(config.default_weight)

    def decode(self, key: bytes | None, value: bytes | None, offset: int,
               broker_ts_ms: int | None = None) -> Decoded:
        if key is None:
            return Rejected("missing_key", "record has no key; the key must be the user id", offset)
        try:
            key_text = key.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected("invalid_utf8", f"key is not UTF-8: {exc}", offset)
        if value is None:
            problem = self._id_problem(key_text, "key")
            if problem:
                return Rejected("invalid_id", problem, offset)
            return Forget(key_text, offset)
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            # orjson refuses more than the stdlib does (numbers that overflow a double,
            # lone surrogate escapes): the stdlib decides, so that the reason is the same
            # as it always was; only bad records take this path.
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return Rejected("invalid_utf8", f"value is not UTF-8: {exc}", offset)
            try:
                doc = _STDLIB_JSON.decode(text)
            except (ValueError, RecursionError) as exc:
                return Rejected("invalid_json", f"value is not JSON: {exc}", offset)
        if not isinstance(doc, dict):
            return Rejected("not_an_object", f"value must be a JSON object, got "
                            f"{type(doc).__name__}", offset)
        # The common shape, accepted in a few checks: ASCII ids, a float time, a number or
        # no weight without an event name, an ASCII event id or none. Anything else (and
        # every rejection) takes _from_object, which decides exactly as it always did.
        user, item = doc.get("user"), doc.get("item")
        if (type(user) is str and type(item) is str and user == key_text and user.isascii()
                and item.isascii() and 0 < len(user) <= self._max_id and 0 < len(item) <= self._max_id
                and "event" not in doc):
            weight, ts, event_id = doc.get("weight"), doc.get("ts"), doc.get("event_id")
            if weight is None:
                weight = self._default_weight
            elif type(weight) is float or (type(weight) is int and -(2**63) <= weight < 2**63):
                weight = float(weight)
            else:
                weight = math.nan
            if (type(ts) is float and math.isfinite(ts) and math.isfinite(weight) and weight >= 0
                    and (event_id is None or (type(event_id) is str and event_id and event_id.isascii()))):
                return Interaction(user, item, weight, ts, event_id_hash(event_id), offset)
        return self._from_object(doc, key_text, offset, broker_ts_ms)

    def decode_batch(self, keys: list, values: list, offsets: list[int],
                     broker_ts_ms: list[int]) -> InteractionColumns | list[Decoded]:
        """:meth:`decode` of every record of a batch, the same results: as
        :class:`InteractionColumns` when every record is an interaction of the common shape
        (:func:`streamer.event_kernels.scan_interactions`, one kernel call for the batch, no
        JSON parse or object per record), else as a list, one result per record (records of
        the common shape built from the kernel's columns, the others by :meth:`decode`).
        """
        status, ints, floats, joined = scan_interactions(keys, values, self._max_id,
                                                         self._default_weight)
        times, weights = floats[:, 0], floats[:, 1]
        ok = status.astype(bool)
        # Numbers the kernel left as text: JSON numbers, which float() reads exactly.
        for col, at in ((times, 6), (weights, 8)):
            rows = np.flatnonzero(ok & (ints[:, at + 1] > 0))
            if len(rows):
                col[rows] = [float(joined[p:p + n]) for p, n in ints[rows, at:at + 2].tolist()]
        ok &= np.isfinite(times) & np.isfinite(weights) & (weights >= 0)
        hashes = np.zeros(len(offsets), np.uint64)
        with_id = np.flatnonzero(ok & (ints[:, 5] > 0))
        hashes[with_id] = event_id_hashes(joined, ints[with_id, 4], ints[with_id, 5])
        if ok.all():
            return InteractionColumns(keys, joined, ints[:, 2], ints[:, 3], weights, times, hashes,
                                      offsets)
        good = ok.tolist()
        fast = iter(InteractionColumns(
            [k for k, g in zip(keys, good) if g], joined, ints[ok, 2], ints[ok, 3], weights[ok],
            times[ok], hashes[ok], [o for o, g in zip(offsets, good) if g]).interactions())
        decode = self.decode
        return [next(fast) if g else decode(keys[r], values[r], offsets[r], broker_ts_ms[r])
                for r, g in enumerate(good)]

    def _from_object(self, doc: dict, key: str, offset: int, broker_ts_ms: int | None) -> Decoded:
        user, item = doc.get("user"), doc.get("item")
        if type(user) is not str or type(item) is not str:
            for name in ("user", "item"):
                if name not in doc:
                    return Rejected("missing_field", f"field {name!r} is required", offset)
                if not isinstance(doc[name], str):
                    return Rejected("wrong_type", f"field {name!r} must be a string, got "
                                    f"{type(doc[name]).__name__}", offset)
        for name, id_ in (("user", user), ("item", item)):
            problem = self._id_problem(id_, name)
            if problem:
                return Rejected("invalid_id", problem, offset)
        if user != key:
            return Rejected("key_mismatch", f"key {key!r} differs from user {user!r}", offset)

        event = doc.get("event")
        if event is not None and not isinstance(event, str):
            return Rejected("wrong_type", f"field 'event' must be a string, got "
                            f"{type(event).__name__}", offset)
        weight = doc.get("weight")
        if weight is None:
            if event is None:
                weight = self.config.default_weight
            elif event in self._event_weights:
                weight = self._event_weights[event]
            else:
                return Rejected("unknown_event", f"event {event!r} has no configured weight; "
                                f"known: {sorted(self._event_weights)}", offset)
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return Rejected("wrong_type", f"field 'weight' must be a number, got "
                            f"{type(weight).__name__}", offset)
        try:
            weight = float(weight)
        except OverflowError:  # an integer beyond any float (the stdlib JSON parser reads it)
            return Rejected("invalid_weight", f"weight must be a finite number >= 0, got an "
                            f"integer of {weight.bit_length()} bits", offset)
        if not (math.isfinite(weight) and weight >= 0):
            return Rejected("invalid_weight", f"weight must be a finite number >= 0, got "
                            f"{weight!r}", offset)

        ts = doc.get("ts")
        if type(ts) is float and math.isfinite(ts):  # the common case, as parse_timestamp does it
            pass
        elif ts is not None:
            try:
                ts = parse_timestamp(ts)
            except (ValueError, OverflowError, OSError) as exc:
                return Rejected("invalid_timestamp", str(exc), offset)
        elif broker_ts_ms is not None and broker_ts_ms >= 0:
            ts = broker_ts_ms / 1000.0
        else:
            ts = math.nan

        event_id = doc.get("event_id")
        if event_id is None:
            id_hash = 0
        elif isinstance(event_id, str) and event_id:
            try:
                id_hash = event_id_hash(event_id)
            except InvalidRecordError as exc:
                return Rejected("invalid_id", f"event_id is not valid Unicode text: {exc}", offset)
        else:
            return Rejected("wrong_type", f"field 'event_id' must be a non-empty string, got "
                            f"{event_id!r}", offset)
        return Interaction(user, item, weight, ts, id_hash, offset)

    def _id_problem(self, id_: str, name: str) -> str | None:
        if id_.isascii():  # the common case: one byte per character, no surrogates
            if 0 < len(id_) <= self.config.max_id_bytes:
                return None
        if not id_:
            return f"{name} must not be empty"
        size = len(id_.encode("utf-8", "surrogatepass"))
        if size > self.config.max_id_bytes:
            return f"{name} is {size} bytes, more than max_id_bytes={self.config.max_id_bytes}"
        try:
            id_.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} is not valid Unicode text"
        return None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_STDLIB_JSON = json.JSONDecoder(parse_constant=_reject_constant)
