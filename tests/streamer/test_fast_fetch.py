"""Fetched records parsed at once (streamer.fast_fetch / streamer.record_batches) against
kafka-python's own parser, the reference: same records, same fields, same next offset, and
the same errors (kafka-python's) for anything the kernel leaves to it."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
import kafka
import pytest
from hypothesis import HealthCheck, given, settings
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition

from streamer import fast_fetch
from streamer.fast_fetch import FastPartitionRecords
from streamer.kafka_io import make_consumer
from streamer.record_batches import FALLBACK, OK, scan_record_batches

TP = TopicPartition("interactions", 3)

_bytes = st.one_of(st.none(), st.binary(max_size=40))
_header = st.tuples(st.text(max_size=8), _bytes)
_record = st.fixed_dictionaries({
    "key": _bytes,
    "value": _bytes,
    "ts_delta": st.integers(-10**6, 10**9),
    "headers": st.lists(_header, max_size=3),
    "gap": st.integers(0, 3),  # offset gap after the record (as compaction leaves)
})


def batch(base_offset, records, *, first_ts=1_700_000_000_000, compression=0, leader_epoch=0,
          log_append=False, control=False):
    """One v2 batch by kafka-python's builder; ``records`` as the strategy above."""
    builder = DefaultRecordBatchBuilder(2, compression, False, -1, -1, -1, 10**8)
    delta = 0
    for r in records:
        builder.append(delta, first_ts + r["ts_delta"], r["key"], r["value"], r["headers"])
        delta += 1 + r["gap"]
    data = builder.build()
    struct.pack_into(">qii", data, 0, base_offset, len(data) - 12, leader_epoch)
    attributes = struct.unpack_from(">h", data, 21)[0] | (0x08 if log_append else 0) | (0x20 if control else 0)
    struct.pack_into(">h", data, 21, attributes)
    struct.pack_into(">I", data, 17, calc_crc32c(memoryview(data)[21:]))
    return bytes(data), base_offset + delta


def buffer_of(batches, base=0, **kwargs):
    out, offset = b"", base
    for records in batches:
        data, offset = batch(offset, records, **kwargs)
        out += data
    return out


def take_all(cls, buf, fetch_offset, step=None):
    """Records, then (next_fetch_offset, leader_epoch, records_read) once drained."""
    part = cls(fetch_offset, TP, MemoryRecords(buf))
    records = []
    while part:
        got = part.take(step)
        records += got
        if not got and part:
            got = part.take(step)  # kafka-python drains on the call after its last record
            assert not got
    return records, part.next_fetch_offset, part.leader_epoch


def assert_same(buf, fetch_offset=0, step=None):
    expected = take_all(Fetcher.PartitionRecords, buf, fetch_offset, step)
    got = take_all(FastPartitionRecords, buf, fetch_offset, step)
    assert got == expected
    return got[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_record, min_size=1, max_size=6), min_size=1, max_size=4),
       base=st.integers(0, 2**40), skip=st.integers(0, 30), step=st.sampled_from([None, 1, 3]),
       epoch=st.integers(-1, 7), log_append=st.booleans(), cut=st.integers(0, 80))
def test_same_records_as_kafka_python(batches, base, skip, step, epoch, log_append, cut):
    buf = buffer_of(batches, base, leader_epoch=epoch, log_append=log_append)
    assert scan_record_batches(buf).status == OK
    assert_same(buf, base + skip, step)
    # A fetch may end inside a batch: the partial batch is not returned.
    last = len(batch(0, batches[-1])[0])
    assert_same(buf[:len(buf) - min(cut, last - 1)], base + skip, step)


def test_typical_records_and_their_fields():
    rows = [{"key": b"u1", "value": b'{"user": "u1"}', "ts_delta": 5, "headers": [], "gap": 0},
            {"key": None, "value": None, "ts_delta": 0, "headers": [("h", None), ("\u00e9", b"v")],
             "gap": 0}]
    records = assert_same(buffer_of([rows, rows], 10))
    assert [r.offset for r in records] == [10, 11, 12, 13]
    first, second = records[:2]
    assert (first.key, first.value, first.timestamp, first.headers) == (
        b"u1", b'{"user": "u1"}', 1_700_000_000_005, [])
    assert (second.key, second.value, second.serialized_header_size) == (None, None, 4)
    assert second.headers == [("h", None), ("\u00e9", b"v")]


@pytest.mark.parametrize("kind", ["compressed", "control"])
def test_batches_left_to_kafka_python(kind):
    rows = [{"key": b"u", "value": b"v" * 50, "ts_delta": 0, "headers": [], "gap": 0}] * 3
    kwargs = {"compression": 1} if kind == "compressed" else {"control": True}
    if kind == "control":
        rows = [{"key": b"\x00\x00\x00\x00", "value": b"\x00\x00\x00\x00\x00\x00", "ts_delta": 0,
                 "headers": [], "gap": 0}]
    buf = buffer_of([rows], 5, **kwargs)
    assert scan_record_batches(buf).status == FALLBACK
    part = FastPartitionRecords(5, TP, MemoryRecords(buf))
    assert part._parsed is None
    assert_same(buf, 5)


def test_read_committed_and_deserializers_are_left_to_kafka_python():
    rows = [{"key": b"u", "value": b"v", "ts_delta": 0, "headers": [], "gap": 0}] * 2
    buf = buffer_of([rows])
    assert FastPartitionRecords(0, TP, MemoryRecords(buf))._parsed is not None
    committed = FastPartitionRecords(0, TP, MemoryRecords(buf),
                                     isolation_level=IsolationLevel.READ_COMMITTED)
    assert committed._parsed is None and len(committed.take()) == 2
    assert FastPartitionRecords(0, TP, MemoryRecords(buf), value_deserializer=bytes)._parsed is None


def test_corrupt_input_raises_kafka_pythons_errors():
    rows = [{"key": b"u", "value": b"value", "ts_delta": 0, "headers": [], "gap": 0}] * 2
    good = buffer_of([rows])
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF  # a value byte: the CRC no longer matches
    bad_size = bytearray(good)
    bad_size[61] += 2  # the first record's length: its fields no longer add up
    struct.pack_into(">I", bad_size, 17, calc_crc32c(memoryview(bad_size)[21:]))
    for buf in (bytes(bad_crc), bytes(bad_size)):
        with pytest.raises(CorruptRecordError):
            Fetcher.PartitionRecords(0, TP, MemoryRecords(buf)).take()
        part = FastPartitionRecords(0, TP, MemoryRecords(buf))
        assert part._parsed is None
        with pytest.raises(CorruptRecordError):
            part.take()


def test_install_on_checked_versions_only(monkeypatch):
    consumer = make_consumer("127.0.0.1:1", None, api_version=(2, 8))
    try:
        assert consumer._fetcher.PartitionRecords is FastPartitionRecords
        other = kafka.KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8))
        try:
            monkeypatch.setattr(kafka, "__version__", "9.9.9")
            assert fast_fetch.install(other) is False
            assert other._fetcher.PartitionRecords is Fetcher.PartitionRecords
        finally:
            other.close()
    finally:
        consumer.close()
