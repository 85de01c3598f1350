"""Rebalance storm: 1 -> 3 -> 1 consumer processes, twice, with kill -9s, while events arrive."""

from __future__ import annotations

from tests.faults.conftest import BackgroundProducer, assert_verified, wait_running
from tests.streamer.conftest import write_config
from tests.streamer.test_service import stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, last_assignment

PARTITIONS = {0, 1, 2, 3}


def test_one_three_one_with_kills_applies_every_event_once(make_app_config, synthetic_log, tmp_path):
    # No event ids: an event applied twice (by two owners, or replayed) shows as a wrong history.
    config = make_app_config(partitions=4, processing={"batch_max_records": 50, "batch_max_ms": 10})
    path = write_config(config, tmp_path / "fs.toml")
    events = stream_events(synthetic_log, 3000, 2400, with_ids=False)
    producer = BackgroundProducer(config.kafka.bootstrap_servers, config.kafka.input_topic,
                                  events, rate=120).start()
    started = 0

    def consumer() -> ConsumerProcess:
        nonlocal started
        started += 1
        return ConsumerProcess(path, tmp_path / f"consumer-{started}.log")

    def assigned(proc: ConsumerProcess) -> bool:
        return "streamer.service: assignment: +[T" in proc.text()

    survivor = consumer()
    everyone = [survivor]
    try:
        wait_running(lambda: assigned(survivor), 30, "the first consumer's assignment", survivor)
        for cycle in range(2):
            joined = [consumer(), consumer()]
            everyone += joined
            group = [survivor, *joined]
            wait_running(lambda: all(assigned(p) for p in joined), 45,
                         f"cycle {cycle}: three members owning partitions", *group)
            # Down to one again: one member crashes, another stops cleanly. In the second
            # cycle the long-lived survivor is the one that crashes.
            crashed, stopped, survivor = ((joined[0], joined[1], survivor) if cycle == 0
                                          else (survivor, joined[0], joined[1]))
            crashed.kill()
            assert stopped.terminate() == 0, stopped.text()
            wait_running(lambda: last_assignment(survivor.text()) == PARTITIONS, 45,
                         f"cycle {cycle}: the survivor owning every partition", survivor)
        producer.join()
        wait_running(lambda: applied_events(config) >= len(events), 60, "every event applied", survivor)
        assert survivor.terminate() == 0, survivor.text()
    finally:
        for proc in everyone:
            if proc.proc.poll() is None:
                proc.kill()
    assert applied_events(config) == len(events)
    assert_verified(config, events)
