"""foldstream verify: the audit the fault tests use as their oracle must itself catch faults."""

from __future__ import annotations

import json

import numpy as np

from streamer.cli import main
from streamer.codec import VectorRecord
from streamer.store import PartitionStore
from streamer.verify import CsvSource, verify
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


# ------------------------------------------------------------------ CSV mode


def _csv_run(config, synthetic_log, tmp_path, *, event_ids: bool):
    """Write rows 3000:3400 of the log as a CSV, ``foldstream produce`` it, run the service."""
    from factors.data import write_interactions

    log = synthetic_log.subset(np.arange(3000, 3400))
    csv_path = tmp_path / "log.csv"
    write_interactions(csv_path, log)
    path = write_config(config, tmp_path / "fs.toml")
    argv = ["produce", "--config", str(path), "--interactions", str(csv_path)]
    assert main(argv + ([] if event_ids else ["--no-event-ids"])) == 0
    run_service(config, lambda s: s.stats.consumed >= len(log))
    return log, csv_path, path


def _with_row(csv_path, tmp_path, name: str, row: str):
    """A copy of the CSV with one more row at the end."""
    out = tmp_path / name
    out.write_bytes(csv_path.read_bytes() + row.encode() + b"\r\n")
    return out


def test_verify_csv_mode_passes_and_catches_a_tampered_store(make_app_config, synthetic_log,
                                                             tmp_path, capsys):
    config = make_app_config(partitions=3)
    log, csv_path, path = _csv_run(config, synthetic_log, tmp_path, event_ids=True)
    users = {log.user_ids.id_of(u) for u in np.unique(log.users)}

    report = verify(config, source=CsvSource(csv_path))
    assert report.ok, report.lines()
    assert report.users_checked == len(users)
    assert report.records_read == len(log) and report.records_pending == 0
    assert main(["verify", "--config", str(path), "--interactions", str(csv_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True

    # Produced with event ids: auditing as if sent without them sees every history differ.
    assert not verify(config, check_output=False,
                      source=CsvSource(csv_path, event_ids=False)).ok

    # A row without a timestamp cannot be audited from the CSV (the broker time stamped it).
    undated = _with_row(csv_path, tmp_path, "undated.csv", "u-new,i-new,,1.0")
    assert main(["verify", "--config", str(path), "--interactions", str(undated)]) == 2
    assert "no timestamp" in capsys.readouterr().err

    # Tamper: one stored vector nudged.
    victim = sorted(users)[0]
    for p in range(3):
        with PartitionStore.open(config.store.state_dir, config.kafka.input_topic, p) as store:
            old = dict(store.iter_vectors()).get(victim)
            if old is not None:
                bumped = VectorRecord(old.vector + np.float32(0.01), old.model_version,
                                      old.n_interactions, old.last_event_time, old.processed_at)
                store.commit_batch({}, {victim: bumped}, [], store.applied_offset() + 1)
                store.ack_outbox([e.key for e in store.iter_outbox()])
    report = verify(config, check_output=False, source=CsvSource(csv_path))
    assert not report.ok
    assert len(report.mismatches) == 1 and victim in report.mismatches[0]
    assert "vector differs" in report.mismatches[0]
    assert not report.missing and not report.extra
    assert main(["verify", "--config", str(path), "--interactions", str(csv_path),
                 "--no-output"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_verify_csv_mode_catches_an_event_the_store_never_saw(make_app_config, synthetic_log,
                                                             tmp_path, capsys):
    config = make_app_config(partitions=2)
    log, csv_path, path = _csv_run(config, synthetic_log, tmp_path, event_ids=False)
    assert verify(config, source=CsvSource(csv_path, event_ids=False)).ok
    late = float(np.nanmax(log.timestamps)) + 1.0
    user, item = log.user_ids.id_of(int(log.users[0])), log.item_ids.id_of(int(log.items[0]))

    # One more event for a known user: exactly that user's history differs.
    extra = _with_row(csv_path, tmp_path, "extra.csv", f"{user},{item},{late!r},2.0")
    report = verify(config, source=CsvSource(extra, event_ids=False))
    assert not report.ok and not report.missing and not report.extra
    assert len(report.mismatches) == 1 and user in report.mismatches[0]
    assert "history differs" in report.mismatches[0]

    # One event of a user the store never saw: reported missing.
    stranger = _with_row(csv_path, tmp_path, "stranger.csv", f"stranger,{item},{late!r},1.0")
    report = verify(config, source=CsvSource(stranger, event_ids=False))
    assert not report.ok and not report.mismatches and not report.extra
    assert len(report.missing) == 1 and "stranger" in report.missing[0]
    assert main(["verify", "--config", str(path), "--interactions", str(stranger),
                 "--no-event-ids"]) == 1
    assert "1 missing" in capsys.readouterr().out
