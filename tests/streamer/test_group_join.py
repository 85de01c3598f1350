"""A group join that finishes between two polls is kept (streamer.group_join): against a fake
coordinator for each case of the wrapper, and against the real broker with a poll loop that
spends most of its time outside ``poll``, as the consumer service does while it applies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import namedtuple

import kafka
import pytest

from streamer import group_join
from streamer.group_join import _KeptJoin

Generation = namedtuple("Generation", "generation_id member_id protocol")


class FakeCoordinator:
    """What the wrapper touches of kafka-python's coordinator: one JoinGroup -> SyncGroup
    round trip per call (a new generation each), and the join completion."""

    group_id = "group"

    def __init__(self) -> None:
        self._generation = Generation(-1, "", None)
        self.round_trips = 0
        self.completed: list[bytes] = []
        self.fail_next = False

    async def _do_join_and_sync_async(self) -> bytes:
        self.round_trips += 1
        if self.fail_next:
            self.fail_next = False
            raise kafka.errors.RebalanceInProgressError()
        self._generation = Generation(self.round_trips, "member", "range")
        return b"assignment-%d" % self.round_trips

    async def _on_join_complete_async(self, generation, member_id, protocol, assignment) -> None:
        self.completed.append(assignment)


def run(coro):
    return asyncio.run(coro)


def test_a_finished_round_trip_nobody_took_answers_the_next_attempt():
    coordinator = FakeCoordinator()
    kept = _KeptJoin(coordinator)
    assert run(kept.do_join_and_sync()) == b"assignment-1"  # finished, not taken by a poll
    assert run(kept.do_join_and_sync()) == b"assignment-1"  # the next attempt: no JoinGroup
    assert run(kept.do_join_and_sync()) == b"assignment-1"  # missed again: still kept
    assert coordinator.round_trips == 1
    run(kept.on_join_complete(1, "member", "range", b"assignment-1"))
    assert coordinator.completed == [b"assignment-1"]
    # Taken: a later rejoin (a rebalance of the same generation) asks the broker again.
    assert run(kept.do_join_and_sync()) == b"assignment-2"
    assert coordinator.round_trips == 2


def test_a_changed_generation_means_a_real_join():
    coordinator = FakeCoordinator()
    kept = _KeptJoin(coordinator)
    run(kept.do_join_and_sync())
    coordinator._generation = Generation(-1, "member", None)  # reset (e.g. unknown member)
    assert run(kept.do_join_and_sync()) == b"assignment-2"
    assert coordinator.round_trips == 2


def test_a_failed_round_trip_keeps_nothing():
    coordinator = FakeCoordinator()
    kept = _KeptJoin(coordinator)
    run(kept.do_join_and_sync())
    coordinator._generation = Generation(-1, "member", None)
    coordinator.fail_next = True
    with pytest.raises(kafka.errors.RebalanceInProgressError):
        run(kept.do_join_and_sync())
    assert kept.unclaimed is None
    assert run(kept.do_join_and_sync()) == b"assignment-3"


def test_install_leaves_unchecked_versions_and_groupless_consumers_alone(make_kafka_consumer,
                                                                         monkeypatch):
    groupless = make_kafka_consumer(None)
    assert not group_join.install(groupless)
    consumer = make_kafka_consumer("some-group")
    original = type(consumer._coordinator)._do_join_and_sync_async
    monkeypatch.setattr(kafka, "__version__", "2.2.0")
    fresh = make_kafka_consumer("other-group")
    assert not group_join.install(fresh)
    assert fresh._coordinator._do_join_and_sync_async.__func__ is original
    assert consumer._coordinator._do_join_and_sync_async.__func__ is not original  # installed


def test_short_polls_far_apart_join_the_group_once(make_kafka_consumer, make_topic, unique_name,
                                                   caplog):
    # 5-ms polls 100 ms apart: a join (about 1 s on Tansu) finishes outside poll ~95% of the
    # time. Without the kept join each such finish sent a new JoinGroup (measured: 27-261 s
    # and up to 413 joins before the partitions came).
    caplog.set_level(logging.INFO, logger="kafka.coordinator")
    topic = make_topic(partitions=2)
    consumer = make_kafka_consumer(unique_name("group"))
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=5)
        time.sleep(0.1)
    assert {tp.partition for tp in consumer.assignment()} == {0, 1}
    joined = [r for r in caplog.records if r.getMessage().startswith("Successfully joined group")]
    assert len(joined) == 1, [r.getMessage() for r in caplog.records]
