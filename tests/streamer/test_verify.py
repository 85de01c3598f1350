"""foldstream verify: the audit the fault tests use as their oracle must itself catch faults."""

from __future__ import annotations

import json

import numpy as np

from streamer.cli import main
from streamer.codec import VectorRecord
from streamer.store import PartitionStore
from streamer.verify import verify
from tests.streamer.conftest import write_config
from tests.streamer.test_service import run_service, send_all, stream_events


def test_verify_passes_on_a_clean_run_and_catches_tampering(make_app_config, make_kafka_producer,
                                                            synthetic_log, tmp_path, capsys):
    config = make_app_config(partitions=2)
    events = stream_events(synthetic_log, 3000, 400)
    producer = make_kafka_producer()
    send_all(producer, config.kafka.input_topic, events + events[:50])  # 50 re-sent ids
    victim = events[0]["user"]
    producer.send(config.kafka.input_topic, key=victim.encode(), value=None)
    producer.send(config.kafka.input_topic, key=b"x", value=b"garbage")
    producer.flush()
    run_service(config, lambda s: s.stats.consumed >= len(events) + 52)

    report = verify(config)
    assert report.ok, report.lines()
    assert report.users_checked == len({e["user"] for e in events} - {victim})
    assert report.records_read == len(events) + 52 and report.records_pending == 0
    path = write_config(config, tmp_path / "fs.toml")
    assert main(["verify", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True

    # Tamper: one vector nudged, one user's state deleted, one stranger added.
    some_user = next(e["user"] for e in events if e["user"] != victim)
    for p in range(2):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p) as store:
            vectors = dict(store.iter_vectors())
            histories = dict(store.iter_users())
            if some_user in vectors:
                old = vectors[some_user]
                bumped = VectorRecord(old.vector + np.float32(0.01), old.model_version,
                                      old.n_interactions, old.last_event_time, old.processed_at)
                store.commit_batch({}, {some_user: bumped}, [], store.applied_offset() + 1)
                store.ack_outbox([e.key for e in store.iter_outbox()])
            else:
                other = next(u for u in histories if u != some_user)
                store.commit_batch({"stranger": histories[other]}, {}, [other],
                                   store.applied_offset() + 1)
                store.ack_outbox([e.key for e in store.iter_outbox()])
    report = verify(config, check_output=False)
    assert not report.ok
    assert any(some_user in m and "vector differs" in m for m in report.mismatches)
    assert any("stranger" in e for e in report.extra)
    assert len(report.missing) == 1
    assert main(["verify", "--config", str(path), "--no-output"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
