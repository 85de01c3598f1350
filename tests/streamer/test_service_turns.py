"""Overlapping turns (``processing.poll_while_applying``): a turn is applied and published
on the turn thread while the loop thread polls the next, against the real broker."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
from kafka import TopicPartition

from streamer.reader import StoreReader
from streamer.service import FoldService
from tests.streamer.conftest import offline_vectors
from tests.streamer.test_service import latest_by_key, read_topic, send_all, stream_events


def held_apply(service: FoldService, hold_s: float):
    """Make each turn's apply wait ``hold_s`` first; record the polls made meanwhile."""
    seen = {"applying": 0, "polls_while_applying": 0, "apply_threads": set()}
    apply_many, poll = service.processor.apply_many, service.consumer.poll

    def slow_apply(work):
        seen["applying"] += 1
        seen["apply_threads"].add(threading.current_thread().name)
        time.sleep(hold_s)
        try:
            return apply_many(work)
        finally:
            seen["applying"] -= 1

    def watched_poll(*args, **kwargs):
        if seen["applying"]:
            seen["polls_while_applying"] += 1
        return poll(*args, **kwargs)

    service.processor.apply_many = slow_apply
    service.consumer.poll = watched_poll
    return seen


def caught_up(service: FoldService) -> bool:
    """Every partition's position is at its log end (all records polled)."""
    consumer = service.consumer
    tps = [TopicPartition(service.config.kafka.input_topic, p)
           for p in range(service.config.kafka.input_partitions)]
    if set(consumer.assignment()) != set(tps):
        return False
    ends = consumer.end_offsets(tps)
    return all(consumer.position(tp) >= ends[tp] for tp in tps)


def turns(service: FoldService, done, timeout_s: float = 60.0) -> None:
    """run_once until ``done(service)`` (unlike ``run_until``, leaves the turn in flight)."""
    deadline = time.monotonic() + timeout_s
    while not done(service):
        assert time.monotonic() < deadline, f"did not get there in {timeout_s}s: {service.stats}"
        service.run_once()


def test_the_loop_polls_while_a_turn_is_applied_and_close_finishes_it(
        make_app_config, make_kafka_producer, synthetic_log, trained_registry, kafka_broker):
    config = make_app_config(partitions=2)
    events = stream_events(synthetic_log, 3000, 600)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)
    service = FoldService(config.replace(processing={"batch_max_records": 100}))
    service.start()
    try:
        seen = held_apply(service, hold_s=0.05)
        # Stop right after the turn that holds the last records was handed to the turn
        # thread: only close() can finish it.
        turns(service, lambda s: s.turn_in_flight and caught_up(s))
        assert service.stats.applied < len(events)
    finally:
        service.close()
    assert not service.turn_in_flight
    assert seen["apply_threads"] == {"foldstream-turn_0"}
    assert seen["polls_while_applying"] >= 3  # every turn but the first overlapped a poll

    assert service.stats.applied == len(events)
    expected = offline_vectors(trained_registry, events)
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        stored = reader.get_vectors(list(expected))
        assert sum(reader.applied_offsets().values()) + 2 == len(events)
    for user, vector in expected.items():
        np.testing.assert_allclose(stored[user].vector, vector, rtol=1e-5, atol=1e-6)
    published = latest_by_key(read_topic(kafka_broker.bootstrap, config.kafka.output_topic,
                                         expected=service.stats.published))
    assert set(published) == set(expected)
    for user in expected:
        assert np.array_equal(np.asarray(published[user]["vector"], dtype=np.float32),
                              stored[user].vector)


def test_without_overlap_a_turn_is_done_when_run_once_returns(make_app_config, make_kafka_producer,
                                                              synthetic_log):
    config = make_app_config(partitions=1, processing={"poll_while_applying": False})
    events = stream_events(synthetic_log, 3000, 50)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)
    service = FoldService(config)
    service.start()
    try:
        seen = held_apply(service, hold_s=0.0)
        applied = 0
        deadline = time.monotonic() + 60
        while applied < len(events) and time.monotonic() < deadline:
            applied += sum(outcome.applied for outcome in service.run_once())
            assert not service.turn_in_flight
            assert service.stats.applied == applied  # counted in the same call
    finally:
        service.close()
    assert applied == len(events)
    assert seen["apply_threads"] == {"MainThread"} and seen["polls_while_applying"] == 0


def test_a_finished_turn_is_freed_though_polls_time_out(make_app_config, make_kafka_producer,
                                                        synthetic_log):
    """kafka-python 3.0 leaves the KafkaTimeoutError of a poll that waited out its timeout in
    a reference cycle reaching run_once's frame (``frame.f_back``). Nothing of a turn may
    hang on that frame: it would live until a garbage collection (with the cycle collector
    off here, forever) and make each collection walk every turn since the last."""
    # Polls far shorter than the broker's fetch wait: nearly every poll times out.
    config = make_app_config(partitions=2, processing={"batch_max_ms": 5},
                             kafka={"fetch_max_wait_ms": 200})
    events = stream_events(synthetic_log, 3000, 300)
    producer = make_kafka_producer()
    service = FoldService(config)
    service.start()
    finished: list[weakref.ref] = []
    service.on_batch = lambda _service, outcomes: finished.extend(map(weakref.ref, outcomes))
    gc.collect()
    gc.disable()
    try:
        for burst in range(3):
            send_all(producer, config.kafka.input_topic, events[burst * 100:(burst + 1) * 100])
            turns(service, lambda s: s.stats.applied >= (burst + 1) * 100)
        service.settle()
        for _ in range(5):
            service.run_once()  # nothing left to poll: these time out
        last = {id(outcome) for _, outcome in service.last_applied}
        alive = [ref() for ref in finished if ref() is not None and id(ref()) not in last]
    finally:
        gc.enable()
        service.close()
    assert service.stats.applied == len(events) and len(finished) >= 3
    assert alive == []


def test_a_failed_turn_is_raised_by_the_next_turn_and_close_does_not_raise_it_again(
        make_app_config, make_kafka_producer, synthetic_log):
    config = make_app_config(partitions=1)
    send_all(make_kafka_producer(), config.kafka.input_topic, stream_events(synthetic_log, 3000, 20))
    service = FoldService(config)
    service.start()

    def failing_apply(work):
        raise OSError("No space left on device")

    service.processor.apply_many = failing_apply
    try:
        turns(service, lambda s: s.turn_in_flight)
        with pytest.raises(OSError, match="No space left"):
            service.run_once()
        assert not service.turn_in_flight
    finally:
        service.close()  # raises nothing: the error was reported once
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        assert set(reader.applied_offsets().values()) == {-1}  # nothing written: all redelivered


class _Interrupted(Future):
    """A future whose wait is interrupted (as by Ctrl-C) while its turn still runs."""

    def result(self, timeout=None):
        raise KeyboardInterrupt

    def done(self) -> bool:
        return False


def test_an_interrupted_wait_leaves_the_turn_for_close_to_finish(make_app_config):
    service = FoldService(make_app_config(partitions=1))
    turn = _Interrupted()
    service._pending = (turn, (1, "member"))
    with pytest.raises(KeyboardInterrupt):
        service.settle()
    assert service._pending == (turn, (1, "member"))  # close() waits for it
