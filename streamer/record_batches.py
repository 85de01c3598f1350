"""Kafka v2 record batches (the wire format of a Fetch response) parsed in one kernel call.

kafka-python parses a fetched partition record by record in Python: a varint at a time,
an object per record and per batch, a generator step per record; at ~5 us a record that
was a fifth of the consumer's time per event. :func:`scan_record_batches` walks the
whole buffer once and returns where each record's parts lie, so the consumer only slices
out the key and value bytes.

It handles the format every current producer writes by default: message format v2
(magic 2), uncompressed, not control batches (transaction markers). Anything else, and
anything malformed (a varint that runs off its record, sizes that do not add up, bytes
left over after a batch's records), makes it answer :data:`FALLBACK`, and the caller
parses the buffer with kafka-python instead, which raises its usual errors. So this
kernel never decides an error; it only takes the common case.

The reference the tests hold it to is kafka-python's own parser
(``kafka.record.MemoryRecords``), field by field, on generated batches.

Layout of a v2 batch (big-endian; offsets from the batch's start)::

    0 base offset int64 | 8 length int32 (bytes after this field) | 12 leader epoch int32
    16 magic int8 | 17 crc uint32 (CRC-32C of bytes 21..end) | 21 attributes int16
    23 last offset delta int32 | 27 first timestamp int64 | 35 max timestamp int64
    43 producer id int64 | 51 producer epoch int16 | 53 base sequence int32
    57 record count int32 | 61 records

and of a record (zigzag varints): length, attributes (int8), timestamp delta, offset delta,
key length (-1: null), key, value length (-1: null), value, header count, headers
(key length, key, value length (-1: null), value).
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

__all__ = ["FALLBACK", "BATCH_HEADER_BYTES", "CRC_FROM", "ParsedBatches", "scan_record_batches"]

BATCH_HEADER_BYTES = 61
CRC_FROM = 21  # a batch's CRC-32C covers its bytes from here (the attributes) to its end
_LOG_OVERHEAD = 12  # base offset, length
_CODEC_MASK = 0x07
_TIMESTAMP_TYPE_MASK = 0x08
_CONTROL_MASK = 0x20

OK = 0
FALLBACK = 1


class ParsedBatches(NamedTuple):
    """Where the records of a buffer lie; per batch and per record columns.

    Per batch: ``batch_start``, ``batch_end`` (byte range, for the CRC), ``batch_crc``,
    ``batch_epoch`` (leader epoch), ``batch_next_offset`` (base offset + last offset
    delta + 1), ``batch_log_append`` (timestamps are the broker's log append time).
    Per record: ``offset``, ``timestamp`` (ms), ``batch`` (its batch's index),
    ``key_pos``/``key_len`` and ``value_pos``/``value_len`` (length -1: null),
    ``header_pos``/``header_count`` (where its headers start; 0: none), ``size``
    (its length field, as kafka-python's ``size_in_bytes``).
    """

    status: int
    batch_start: np.ndarray
    batch_end: np.ndarray
    batch_crc: np.ndarray
    batch_epoch: np.ndarray
    batch_next_offset: np.ndarray
    batch_log_append: np.ndarray
    offset: np.ndarray
    timestamp: np.ndarray
    batch: np.ndarray
    key_pos: np.ndarray
    key_len: np.ndarray
    value_pos: np.ndarray
    value_len: np.ndarray
    header_pos: np.ndarray
    header_count: np.ndarray
    size: np.ndarray


@nb.njit(cache=True, nogil=True)
def _be(buf, pos, nbytes):
    """Signed big-endian integer of ``nbytes`` bytes at ``pos``."""
    v = np.int64(0)
    for i in range(nbytes):
        v = (v << 8) | np.int64(buf[pos + i])
    shift = 64 - 8 * nbytes
    if shift:
        v = (v << shift) >> shift  # sign-extend
    return v


@nb.njit(cache=True, nogil=True)
def _varint(buf, pos, end):
    """Zigzag varint at ``pos`` -> (value, next position); next position -1 when it runs
    past ``end`` or over 10 bytes."""
    raw = np.uint64(0)
    shift = 0
    while True:
        if pos >= end or shift > 63:
            return np.int64(0), -1
        b = buf[pos]
        pos += 1
        raw |= np.uint64(b & 0x7F) << np.uint64(shift)
        if b < 0x80:
            break
        shift += 7
    value = np.int64(raw >> np.uint64(1)) ^ -np.int64(raw & np.uint64(1))
    return value, pos


@nb.njit(cache=True, nogil=True)
def _nullable_bytes(buf, q, end):
    """Length-prefixed bytes at ``q`` (length -1: null) -> (length, their position, next
    position); next position -1 when the length or the bytes run past ``end``."""
    n, q = _varint(buf, q, end)
    if q < 0 or n < -1 or q + max(n, 0) > end:
        return 0, 0, -1
    return n, q, q + max(n, 0)


@nb.njit(cache=True, nogil=True)
def _count_batches(buf):
    """(status, batches, records) over the complete batches of ``buf``."""
    n = buf.shape[0]
    pos = 0
    batches = 0
    records = 0
    while n - pos >= _LOG_OVERHEAD:
        length = _be(buf, pos + 8, 4)
        end = pos + _LOG_OVERHEAD + length
        if end > n:
            break  # a partial batch at the end of a fetch: not returned (as kafka-python)
        if length < BATCH_HEADER_BYTES - _LOG_OVERHEAD or buf[pos + 16] != 2:
            return FALLBACK, 0, 0
        attributes = _be(buf, pos + 21, 2)
        if attributes & (_CODEC_MASK | _CONTROL_MASK):
            return FALLBACK, 0, 0
        count = _be(buf, pos + 57, 4)
        if count < 0:
            return FALLBACK, 0, 0
        batches += 1
        records += count
        pos = end
    return OK, batches, records


@nb.njit(cache=True, nogil=True)
def _scan(buf, b_start, b_end, b_crc, b_epoch, b_next, b_append, offset, timestamp, batch,
          key_pos, key_len, value_pos, value_len, header_pos, header_count, size):
    pos = 0
    r = 0
    previous = np.int64(-(2**62))
    for b in range(b_start.shape[0]):
        length = _be(buf, pos + 8, 4)
        end = pos + _LOG_OVERHEAD + length
        base_offset = _be(buf, pos, 8)
        b_start[b] = pos
        b_end[b] = end
        b_epoch[b] = _be(buf, pos + 12, 4)
        b_crc[b] = _be(buf, pos + 17, 4) & 0xFFFFFFFF
        attributes = _be(buf, pos + 21, 2)
        b_next[b] = base_offset + _be(buf, pos + 23, 4) + 1
        log_append = (attributes & _TIMESTAMP_TYPE_MASK) != 0
        b_append[b] = log_append
        first_ts = _be(buf, pos + 27, 8)
        max_ts = _be(buf, pos + 35, 8)
        count = _be(buf, pos + 57, 4)
        p = pos + BATCH_HEADER_BYTES
        for _ in range(count):
            rec_len, q = _varint(buf, p, end)
            if q < 0 or rec_len < 0:
                return FALLBACK
            rec_end = q + rec_len
            if rec_end > end:
                return FALLBACK
            _, q = _varint(buf, q, rec_end)  # attributes: unused in v2
            if q < 0:
                return FALLBACK
            ts_delta, q = _varint(buf, q, rec_end)
            if q < 0:
                return FALLBACK
            off_delta, q = _varint(buf, q, rec_end)
            if q < 0:
                return FALLBACK
            key_len[r], key_pos[r], q = _nullable_bytes(buf, q, rec_end)
            if q < 0:
                return FALLBACK
            value_len[r], value_pos[r], q = _nullable_bytes(buf, q, rec_end)
            if q < 0:
                return FALLBACK
            hcount, q = _varint(buf, q, rec_end)
            if q < 0 or hcount < 0:
                return FALLBACK
            header_pos[r] = q
            header_count[r] = hcount
            for _ in range(hcount):
                hklen, _, q = _nullable_bytes(buf, q, rec_end)
                if q < 0 or hklen < 0:  # a header key is never null
                    return FALLBACK
                _, _, q = _nullable_bytes(buf, q, rec_end)
                if q < 0:
                    return FALLBACK
            if q != rec_end:
                return FALLBACK
            # Offsets ascend and stay within the batch's range (the caller relies on both).
            if base_offset + off_delta <= previous or base_offset + off_delta >= b_next[b]:
                return FALLBACK
            previous = base_offset + off_delta
            offset[r] = previous
            timestamp[r] = max_ts if log_append else first_ts + ts_delta
            batch[r] = b
            size[r] = rec_len
            p = rec_end
            r += 1
        if p != end:
            return FALLBACK
        pos = end
    return OK


def scan_record_batches(buf) -> ParsedBatches:
    """Parse every complete batch of ``buf`` (bytes-like) -> :class:`ParsedBatches`.

    ``status`` is :data:`FALLBACK` (and the columns empty) when the buffer holds a batch
    this kernel leaves to kafka-python (not magic 2, compressed, a control batch) or
    anything malformed. CRCs are not checked here (the caller does, with the C CRC-32C).
    """
    data = np.frombuffer(buf, dtype=np.uint8)
    status, n_batches, n_records = _count_batches(data)
    i8 = np.int64
    cols = [np.empty(n_batches, i8) for _ in range(5)] + [np.empty(n_batches, np.bool_)]
    cols += [np.empty(n_records, i8) for _ in range(10)]
    if status == OK:
        status = _scan(data, *cols)
    if status != OK:
        cols = [c[:0] for c in cols]
    return ParsedBatches(int(status), *cols)
