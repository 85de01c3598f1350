"""The broker frozen (SIGSTOP) past the session timeout, then resumed, under a consumer and a producer."""

from __future__ import annotations

import time

from streamer.broker import EmbeddedBroker
from tests.conftest import FAST_GROUP_CONFIG
from tests.faults.conftest import BackgroundProducer, assert_verified, wait_running
from tests.streamer.conftest import write_config
from tests.streamer.test_service import stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events

# Frozen for three session timeouts: on resume the group coordinator has long given up
# on the member's heartbeats (it notices a silent member after ~1.5 sessions).
FREEZE_S = 3 * FAST_GROUP_CONFIG["session_timeout_ms"] / 1000


def test_broker_frozen_past_session_timeout_then_resumed(make_app_config, synthetic_log, tmp_path):
    # Its own broker: freezing the session broker would stall every other test's clients.
    with EmbeddedBroker(tmp_path / "broker") as broker:
        # Requests time out during the freeze too (3 s < FREEZE_S): clients reconnect and retry.
        config = make_app_config(partitions=2, kafka={"bootstrap_servers": broker.bootstrap,
                                                      "request_timeout_ms": 3_000},
                                 processing={"batch_max_records": 50, "batch_max_ms": 10})
        events = stream_events(synthetic_log, 3000, 1500, with_ids=False)
        # Held after 600 events until the broker is frozen: the rest is sent into the freeze
        # and after it, whatever the host's speed (a slow CI host once saw all 1500 sent first).
        producer = BackgroundProducer(broker.bootstrap, config.kafka.input_topic, events, rate=150,
                                      hold_at=600)
        consumer = ConsumerProcess(write_config(config, tmp_path / "fs.toml"), tmp_path / "consumer.log")
        try:
            wait_running(lambda: "streamer.service: assignment" in consumer.text(), 30,
                         "the consumer's assignment", consumer)
            producer.start()
            wait_running(lambda: applied_events(config) >= 300, 30, "300 events applied", consumer)
            broker.pause()
            try:
                producer.release()
                time.sleep(FREEZE_S)
                frozen_at = applied_events(config)
            finally:
                broker.resume()
            producer.join()
            wait_running(lambda: applied_events(config) >= len(events), 60, "every event applied", consumer)
            assert consumer.terminate() == 0, consumer.text()
        finally:
            producer.release()  # a failure before the freeze must not leave it waiting
            if consumer.proc.poll() is None:
                consumer.kill()
        assert frozen_at < len(events)
        assert applied_events(config) == len(events)
        assert_verified(config, events)
