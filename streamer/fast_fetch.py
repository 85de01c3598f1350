"""kafka-python's consumer with fetched records parsed by :mod:`streamer.record_batches`.

kafka-python turns each partition of a Fetch response into a ``Fetcher.PartitionRecords``,
which parses the records lazily, one at a time, as ``poll`` takes them. The fetcher builds
it through the attribute ``self.PartitionRecords``, so :func:`install` sets that attribute
on one consumer's fetcher to :class:`FastPartitionRecords`: a subclass that parses the
whole partition at once in a numba kernel when it can, and otherwise (compressed or legacy
batches, control batches, deserializers configured, ``read_committed`` isolation, anything
malformed or a CRC mismatch)
leaves everything to kafka-python's own code, unchanged, so errors surface exactly as
before. The records returned are kafka-python's ``ConsumerRecord`` tuples with the same
fields in either case.

This leans on kafka-python internals (the attribute, the constructor's arguments,
``MemoryRecords._buffer``), so :func:`install` only acts on the versions it was checked
against (:data:`CHECKED_VERSIONS`) and otherwise leaves the consumer as it is.
"""

from __future__ import annotations

import logging
from functools import partial
from itertools import repeat

import kafka
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.protocol.consumer import IsolationLevel
from kafka.record.util import calc_crc32c, decode_varint

from streamer.record_batches import CRC_FROM, OK, scan_record_batches

__all__ = ["CHECKED_VERSIONS", "FastPartitionRecords", "install", "parse_partition"]

log = logging.getLogger(__name__)

#: kafka-python versions whose fetcher internals this module was checked against.
CHECKED_VERSIONS = ("3.0.",)


def parse_partition(topic: str, partition: int, buf, fetch_offset: int, check_crcs: bool = True):
    """The records of one fetched partition at or after ``fetch_offset`` as ``ConsumerRecord``
    tuples, with the offset to fetch next and the leader epoch of the last batch; None when
    kafka-python must parse ``buf`` itself.

    Returns ``(records, next_offset, leader_epoch, bytes_read)``.
    """
    if type(buf) is not bytes:  # slices of it become the records' keys and values
        buf = bytes(buf)
    parsed = scan_record_batches(buf)
    if parsed.status != OK or not len(parsed.batch_start):
        return None
    if check_crcs:
        view = memoryview(buf)
        for start, end, crc in zip(parsed.batch_start.tolist(), parsed.batch_end.tolist(),
                                   parsed.batch_crc.tolist()):
            if calc_crc32c(view[start + CRC_FROM:end]) != crc:
                return None  # kafka-python raises CorruptRecordError for it
    first = int(parsed.offset.searchsorted(fetch_offset))  # offsets ascend within a partition
    offsets = parsed.offset[first:].tolist()
    key_pos, key_len = parsed.key_pos[first:].tolist(), parsed.key_len[first:].tolist()
    value_pos, value_len = parsed.value_pos[first:].tolist(), parsed.value_len[first:].tolist()
    keys = [buf[p:p + n] if n >= 0 else None for p, n in zip(key_pos, key_len)]
    values = [buf[p:p + n] if n >= 0 else None for p, n in zip(value_pos, value_len)]
    batch = parsed.batch[first:]
    epochs = parsed.batch_epoch[batch].tolist()
    ts_types = parsed.batch_log_append[batch].astype(int).tolist()
    header_count = parsed.header_count[first:]
    if header_count.any():
        try:
            headers, header_sizes = _headers(buf, parsed.header_pos[first:].tolist(),
                                             header_count.tolist())
        except UnicodeDecodeError:
            return None  # kafka-python raises CorruptRecordError for it
    else:
        headers = [[] for _ in offsets]
        header_sizes = repeat(-1)
    records = list(map(_new_record, zip(
        repeat(topic), repeat(partition), epochs, offsets, parsed.timestamp[first:].tolist(),
        ts_types, keys, values, headers, repeat(None), key_len, value_len, header_sizes)))
    return (records, int(parsed.batch_next_offset[-1]), int(parsed.batch_epoch[-1]),
            int(parsed.size.sum()))


# ConsumerRecord from a tuple of its fields in C: a third of the cost of calling the class.
_new_record = partial(tuple.__new__, ConsumerRecord)


def _headers(buf, positions: list[int], counts: list[int]) -> tuple[list, list]:
    """Each record's headers ``[(str key, bytes value or None)]`` and their serialized size
    (-1 for none), from positions the kernel checked."""
    headers, sizes = [], []
    for pos, count in zip(positions, counts):
        items, size = [], -1 if count == 0 else 0
        for _ in range(count):
            klen, pos = decode_varint(buf, pos)
            key = buf[pos:pos + klen].decode("utf-8")
            pos += klen
            vlen, pos = decode_varint(buf, pos)
            value = buf[pos:pos + vlen] if vlen >= 0 else None
            pos += max(vlen, 0)
            items.append((key, value))
            size += klen + max(vlen, 0)
        headers.append(items)
        sizes.append(size)
    return headers, sizes


class FastPartitionRecords(Fetcher.PartitionRecords):
    """``Fetcher.PartitionRecords`` that parses a partition's records at once (see module doc).

    Behaves as the parent to the fetcher: ``take(n)`` hands out records in order and moves
    ``next_fetch_offset`` past them; once all are taken, ``next_fetch_offset`` is the last
    batch's next offset and the records are drained (metrics recorded, next fetch allowed).
    """

    def __init__(self, fetch_offset, tp, records, key_deserializer=None, value_deserializer=None,
                 check_crcs=True, *args, **kwargs) -> None:
        super().__init__(fetch_offset, tp, records, key_deserializer, value_deserializer,
                         check_crcs, *args, **kwargs)
        self._parsed = None
        # read_committed filters aborted transactions batch by batch: kafka-python's.
        if (key_deserializer is None and value_deserializer is None
                and self.isolation_level == IsolationLevel.READ_UNCOMMITTED):
            try:
                self._parsed = parse_partition(tp.topic, tp.partition, records._buffer,
                                               fetch_offset, check_crcs)
            except Exception:  # noqa: BLE001 - kafka-python's parser decides what is wrong
                log.debug("fast record parsing declined %s at %d", tp, fetch_offset, exc_info=True)
                self._parsed = None
        self._taken = 0

    def take(self, n=None):
        if self._parsed is None:
            return super().take(n)
        if self.record_iterator is None:  # drained
            return []
        records, next_offset, epoch, size = self._parsed
        start = self._taken
        stop = len(records) if n is None else min(len(records), start + n)
        out = records[start:stop]
        self._taken = stop
        if out:
            self.next_fetch_offset = out[-1].offset + 1
            self.leader_epoch = out[-1].leader_epoch
        if stop == len(records):
            self.next_fetch_offset = next_offset
            self.leader_epoch = epoch
            self.records_read = len(records)
            self.bytes_read = size
            self._parsed = ([], next_offset, epoch, size)
            self.drain()
        return out


def install(consumer) -> bool:
    """Make ``consumer`` (a ``KafkaConsumer``) parse fetched records with
    :class:`FastPartitionRecords`; False (and the consumer unchanged) on a kafka-python
    version it was not checked against."""
    if not kafka.__version__.startswith(CHECKED_VERSIONS):
        log.warning("kafka-python %s: fetched records are parsed by kafka-python (fast "
                    "parsing was checked against %s)", kafka.__version__, CHECKED_VERSIONS)
        return False
    consumer._fetcher.PartitionRecords = FastPartitionRecords
    return True
