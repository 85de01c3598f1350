"""streamer.fetch_ahead against the real broker: records taken without waiting, the next
Fetch sent, and none of the reference cycles a zero-timeout poll leaves behind."""

from __future__ import annotations

import gc
import time

import kafka
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from streamer import fetch_ahead as fa


def produce(producer, topic: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        producer.send(topic, key=b"user-%d" % i, value=b"%d" % i, partition=0)
    producer.flush()


def timeout_errors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, KafkaTimeoutError))


def take_until(ahead: fa.FetchAhead, count: int, timeout_s: float = 30.0) -> tuple[list, int]:
    """Takes until ``count`` records came back; the records and the takes that found a
    Fetch still out."""
    records, while_out = [], 0
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        assert time.monotonic() < deadline, f"{len(records)} of {count} records in {timeout_s}s"
        if ahead.in_flight():
            while_out += 1
            assert ahead.take(count) == {}  # nothing buffered while the Fetch is out
            time.sleep(0.002)
            continue
        for recs in ahead.take(count - len(records)).values():
            records += recs
    return records, while_out


def test_takes_every_record_in_order_and_keeps_a_fetch_out(make_topic, make_kafka_consumer,
                                                            make_kafka_producer):
    topic = make_topic(partitions=1)
    producer = make_kafka_producer()
    consumer = make_kafka_consumer(fetch_max_wait_ms=50)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    ahead = fa.fetch_ahead(consumer)
    assert ahead is not None

    produce(producer, topic, 30)
    assert consumer.poll(timeout_ms=10_000)  # the first Fetch, as the service's poll makes it
    position = consumer.position(tp)
    produce(producer, topic, 70, start=30)
    records, while_out = take_until(ahead, 100 - position)

    assert [r.offset for r in records] == list(range(position, 100))
    assert [r.value for r in records] == [b"%d" % i for i in range(position, 100)]
    assert consumer.position(tp) == 100  # positions move as poll() moves them
    assert while_out > 0  # a take never waits: it found the Fetch out and returned
    assert ahead.in_flight()  # the last take sent the next Fetch


def test_takes_leave_no_timeout_cycles_where_zero_timeout_polls_do(make_topic, make_kafka_consumer):
    """kafka-python 3.0: a poll that waits out its timeout (here zero) with a Fetch out leaves
    its KafkaTimeoutError in a reference cycle. If an upgrade stops doing that, the second
    assertion fails, and FoldService._gather (which avoids such polls) can be simplified."""
    topic = make_topic(partitions=1)
    consumer = make_kafka_consumer(fetch_max_wait_ms=200)  # an empty topic: Fetches stay out
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    ahead = fa.fetch_ahead(consumer)
    consumer.poll(timeout_ms=0)
    gc.collect()
    gc.disable()
    try:
        before = timeout_errors()
        for _ in range(20):
            ahead.take(100)
            time.sleep(0.01)
        after_takes = timeout_errors()
        for _ in range(20):
            consumer.poll(timeout_ms=0)
            time.sleep(0.01)
        after_polls = timeout_errors()
    finally:
        gc.enable()
    assert after_takes == before
    assert after_polls > after_takes


def test_an_unchecked_kafka_python_gets_no_fetch_ahead(make_kafka_consumer, monkeypatch):
    consumer = make_kafka_consumer()
    assert isinstance(fa.fetch_ahead(consumer), fa.FetchAhead)
    monkeypatch.setattr(kafka, "__version__", "9.9.0")
    assert fa.fetch_ahead(consumer) is None


def test_a_consumer_without_the_fetcher_steps_gets_no_fetch_ahead():
    class Bare:
        _fetcher = object()
    assert fa.fetch_ahead(Bare()) is None
