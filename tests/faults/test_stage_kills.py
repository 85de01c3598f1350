"""kill -9 at each stage of the commit protocol; afterwards `verify` finds nothing wrong."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamer.verify import verify
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, wait_for


@pytest.mark.parametrize("stage", ["before_write", "after_write", "after_publish"])
def test_kill_at_stage_then_restart_verifies_clean(stage, make_app_config, make_kafka_producer,
                                                   synthetic_log, tmp_path):
    # No event ids: an event applied twice would show up as a wrong history.
    config = make_app_config(partitions=2, processing={"batch_max_records": 30, "batch_max_ms": 10})
    path = write_config(config, tmp_path / "fs.toml")
    events = stream_events(synthetic_log, 3000, 900, with_ids=False)
    send_all(make_kafka_producer(), config.kafka.input_topic, events)

    for n in (3, 9):  # two crashes at the same stage, at different batches
        crashed = subprocess.run(
            [sys.executable, "-m", "tests.faults.crashing_consumer", str(path), stage, str(n)],
            capture_output=True, text=True, timeout=120)
        assert crashed.returncode == -9, crashed.stdout + crashed.stderr

    survivor = ConsumerProcess(path, tmp_path / "consumer.log")
    try:
        wait_for(lambda: applied_events(config) >= len(events), 90, "all events applied")
        wait_for(lambda: verify(config).ok, 30, "verify to pass", every_s=1.0)
    finally:
        assert survivor.terminate() == 0, survivor.text()
    report = verify(config)
    assert report.ok, report.lines()
    assert report.records_pending == 0 and report.outbox_pending == 0
    assert report.users_checked == len({e["user"] for e in events})
