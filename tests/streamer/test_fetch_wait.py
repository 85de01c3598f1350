"""FetchWaitGuard: a broker that answers empty when slow must not starve the consumer."""

from __future__ import annotations

import logging

from streamer.fetch_wait import FetchWaitGuard
from streamer.service import FoldService
from tests.streamer.test_service import run_service, send_all, stream_events


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    def __init__(self, wait_ms: int) -> None:
        self.config = {"fetch_max_wait_ms": wait_ms}


class Consumer:
    def __init__(self, wait_ms: int) -> None:
        self._fetcher = Fetcher(wait_ms)


def guard(wait_ms=20, **kw):
    clock = Clock()
    consumer = Consumer(wait_ms)
    return FetchWaitGuard(consumer, wait_ms, clock=clock, **kw), consumer._fetcher.config, clock


def empty_polls(g, clock, seconds, behind, every=0.1):
    asked = []

    def lag():
        asked.append(clock.now)
        return behind

    for _ in range(int(round(seconds / every))):
        clock.now += every
        g.after_poll(0, lag)
    return asked


def test_empty_polls_behind_the_log_end_double_the_wait_up_to_the_cap():
    g, config, clock = guard(20)
    asked = empty_polls(g, clock, 0.9, {"p0": 500})
    assert config["fetch_max_wait_ms"] == 20 and asked == []  # under a second: not yet
    empty_polls(g, clock, 0.3, {"p0": 500})
    assert config["fetch_max_wait_ms"] == 40 and g.raised == 1
    empty_polls(g, clock, 10, {"p0": 500, "p1": 0})
    assert config["fetch_max_wait_ms"] == 500 and g.current_ms == 500  # 80, 160, 320, 500
    asked = empty_polls(g, clock, 5, {"p0": 500})
    assert asked == [] and config["fetch_max_wait_ms"] == 500  # at the cap: no more asking


def test_a_wait_of_zero_starts_at_the_floor():
    g, config, clock = guard(0)
    empty_polls(g, clock, 1.5, {"p0": 1})
    assert config["fetch_max_wait_ms"] == 10


def test_an_idle_topic_changes_nothing_and_is_asked_about_once_a_second():
    g, config, clock = guard(20)
    asked = empty_polls(g, clock, 10, {"p0": 0})
    assert config["fetch_max_wait_ms"] == 20 and g.raised == 0
    assert 8 <= len(asked) <= 10


def test_records_flowing_for_a_while_bring_the_wait_back_down():
    g, config, clock = guard(20, relax_after_s=60)
    empty_polls(g, clock, 3.5, {"p0": 9})
    assert config["fetch_max_wait_ms"] == 160
    for _ in range(59):
        clock.now += 1
        g.after_poll(100, lambda: {})
    assert config["fetch_max_wait_ms"] == 160  # not yet a minute
    for _ in range(2):
        clock.now += 1
        g.after_poll(100, lambda: {})
    assert config["fetch_max_wait_ms"] == 80
    for _ in range(200):
        clock.now += 1
        g.after_poll(100, lambda: {})
    assert config["fetch_max_wait_ms"] == 20  # never below the configured wait


def test_without_a_fetcher_config_it_only_logs_once(caplog):
    clock = Clock()
    g = FetchWaitGuard(object(), 20, clock=clock)
    with caplog.at_level(logging.WARNING, logger="streamer.fetch_wait"):
        empty_polls(g, clock, 5, {"p0": 3})
    assert g.current_ms == 20 and g.raised >= 3
    assert len([r for r in caplog.records if "no fetcher config" in r.message]) == 1


def test_a_consumer_on_a_broker_that_never_answers_in_time_still_applies_everything(
        make_app_config, make_kafka_producer, synthetic_log, caplog):
    # At fetch_max_wait_ms = 0 the embedded Tansu answers every fetch with no records: the
    # starvation the soak saw under load, made certain. The guard must lift the wait.
    config = make_app_config(partitions=2, kafka={"fetch_max_wait_ms": 0})
    events = stream_events(synthetic_log, 3000, 300)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)
    with caplog.at_level(logging.WARNING, logger="streamer.fetch_wait"):
        service = run_service(config, lambda s: s.stats.applied >= len(events), timeout_s=60)
    assert isinstance(service, FoldService) and service.stats.applied == len(events)
    assert service._fetch_wait.raised >= 1 and service._fetch_wait.current_ms >= 10
    assert any("fetch wait 0 -> 10 ms" in r.message for r in caplog.records)
