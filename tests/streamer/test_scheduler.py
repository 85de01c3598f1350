"""The automatic retrain scheduler: triggers, the lock, the child process and its outcomes."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from streamer.config import AppConfig, RetrainConfig
from streamer.metrics import Metrics
from streamer.monitor import ServiceMonitor
from streamer.observer import ServiceObserver
from streamer.retrain import (HISTORY_FILE, RetrainRecord, append_history, retrain_history,
                              retrain_lock, retrain_once)
from streamer.scheduler import Baseline, RetrainScheduler, baseline, due
from streamer.service import FoldService
from tests.streamer.conftest import run_until
from tests.streamer.test_service import send_all, stream_events

T0 = 1_700_000_000.0
NO_DRIFT = SimpleNamespace(events=10_000, psi=0.01, js=0.001, unknown_item_ratio=0.0)


# -- child targets (the scheduler's child imports this module and calls one) ----------------

def crashing_retrain(config, trigger, *, input_records=None, lock=True):
    raise RuntimeError("the retrain blew up")


def failed_retrain(config, trigger, *, input_records=None, lock=True):
    record = RetrainRecord(started=time.time(), seconds=0.1, outcome="failed", reason="bad data",
                           trigger=trigger, input_records=input_records)
    append_history(config.model.registry_dir, record)  # as retrain_once does
    return record


def slow_rejected_retrain(config, trigger, *, input_records=None, lock=True):
    started = time.time()
    time.sleep(1.5)
    record = RetrainRecord(started=started, seconds=1.5, outcome="rejected", reason="worse",
                           trigger=trigger, input_records=input_records)
    append_history(config.model.registry_dir, record)
    return record


# -- when to retrain --------------------------------------------------------------------------

def test_new_options_are_validated():
    from streamer.config import load_config
    from streamer.errors import ConfigError

    assert RetrainConfig().cooldown_s == 600.0 and AppConfig().model.check_interval_s == 5.0
    with pytest.raises(ConfigError, match="retrain.cooldown_s must be >= 0, got -1"):
        RetrainConfig(cooldown_s=-1)
    with pytest.raises(ConfigError, match="model.check_interval_s must be > 0, got 0"):
        load_config(env={"FOLDSTREAM_MODEL__CHECK_INTERVAL_S": "0"})


def snapshot(**values) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(NO_DRIFT), **values})


def test_no_trigger_fires_when_all_are_off():
    config = RetrainConfig(cooldown_s=0)
    assert not config.automatic
    wild = snapshot(psi=9.0, js=1.0, unknown_item_ratio=1.0)
    assert due(config, T0 + 10**9, Baseline(since=T0), 10**12, wild) is None


@pytest.mark.parametrize("trigger, config, now, records, drift", [
    ("interval", {"interval_s": 3600}, T0 + 3600, None, None),
    ("events", {"every_events": 1000}, T0 + 1, 5000, None),
    ("psi", {"max_psi": 0.25}, T0 + 1, None, snapshot(psi=0.3)),
    ("js", {"max_js": 0.1}, T0 + 1, None, snapshot(js=0.2)),
    ("unknown_items", {"max_unknown_item_ratio": 0.2}, T0 + 1, None, snapshot(unknown_item_ratio=0.5)),
])
def test_each_trigger_fires_on_its_own(trigger, config, now, records, drift):
    base = Baseline(since=T0, last_attempt_end=T0, input_records=4000)
    r = RetrainConfig(**config, cooldown_s=0, min_events=1000)
    assert due(r, now, base, records, drift) == trigger
    # Just below its threshold, nothing fires.
    below = {"interval": (now - 1, records, drift), "events": (now, 4999, drift),
             "psi": (now, records, snapshot(psi=0.25)), "js": (now, records, snapshot(js=0.1)),
             "unknown_items": (now, records, snapshot(unknown_item_ratio=0.2))}[trigger]
    assert due(r, below[0], base, below[1], below[2]) is None


def test_drift_needs_min_events_and_a_number_and_the_cooldown_holds_everything():
    r = RetrainConfig(max_psi=0.25, every_events=1000, interval_s=60, cooldown_s=600, min_events=1000)
    fresh = Baseline(since=T0 - 10**6, last_attempt_end=None, input_records=0)
    assert due(r, T0, fresh, None, snapshot(psi=0.3)) == "interval"
    quiet = RetrainConfig(max_psi=0.25, cooldown_s=0, min_events=1000)
    assert due(quiet, T0, fresh, None, snapshot(psi=0.3, events=999)) is None
    assert due(quiet, T0, fresh, None, snapshot(psi=math.nan)) is None
    assert due(quiet, T0, fresh, None, None) is None
    recent = Baseline(since=T0 - 10**6, last_attempt_end=T0 - 599, input_records=0)
    assert due(r, T0, recent, 10**9, snapshot(psi=9.0)) is None
    assert due(r, T0 + 1, recent, 10**9, snapshot(psi=9.0)) == "interval"


def test_baseline_reads_the_history_and_the_active_pointer():
    history = [
        {"started": T0, "seconds": 10, "outcome": "promoted", "input_records": 500},
        {"started": T0 + 100, "seconds": 5, "outcome": "failed", "input_records": None},
        {"started": T0 + 200, "seconds": 20, "outcome": "rejected", "input_records": 900},
        {"started": T0 + 300, "seconds": 1, "outcome": "failed"},
    ]
    base = baseline(history, {"version": "v000002", "changed": T0 + 10}, default_since=T0 - 1)
    assert base == Baseline(since=T0 + 301, last_attempt_end=T0 + 301, input_records=900,
                            last_success_end=T0 + 220)
    promoted_later = baseline(history, {"changed": T0 + 400}, default_since=T0 - 1)
    assert promoted_later.since == T0 + 400
    assert baseline([], None, default_since=T0) == Baseline(since=T0)


def make_config(tmp_path, trained_registry, **retrain) -> AppConfig:
    registry = Path(shutil.copytree(trained_registry, tmp_path / "models"))
    return AppConfig().replace(store={"state_dir": tmp_path / "state"},
                               model={"registry_dir": registry},
                               retrain={"check_interval_s": 10, "cooldown_s": 0, **retrain})


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scheduler_checks_at_its_interval_and_counts_from_the_last_attempt(tmp_path, trained_registry):
    config = make_config(tmp_path, trained_registry, every_events=1000, interval_s=3600)
    clock = FakeClock(time.time())  # the registry's pointer changed just now
    scheduler = RetrainScheduler(config, clock=clock)
    started = []
    scheduler.start = lambda trigger, records=None: started.append((trigger, records)) or True
    records = {"n": 999}
    scheduler._offsets.total = lambda: records["n"]

    assert scheduler.tick() is None  # first check: 999 events, 0 s
    records["n"] = 1000
    clock.now += 9
    assert scheduler.tick() is None  # not checked again before check_interval_s
    clock.now += 1
    assert scheduler.tick() == "events" and started == [("events", 1000)]

    # A recorded attempt moves both baselines.
    with (config.model.registry_dir / HISTORY_FILE).open("a") as fh:
        fh.write(json.dumps({"started": clock.now, "seconds": 5.0, "outcome": "rejected",
                             "input_records": 1000}) + "\n")
    clock.now += 10
    assert scheduler.tick() is None
    records["n"] = 2000
    clock.now += 10
    assert scheduler.tick() == "events"
    clock.now += 3600
    assert scheduler.tick() == "interval"


# -- one retrain at a time ----------------------------------------------------------------------

def test_the_lock_allows_one_retrain_at_a_time(tmp_path, trained_registry):
    config = make_config(tmp_path, trained_registry)
    with retrain_lock(config.model.registry_dir) as held:
        assert held
        with retrain_lock(config.model.registry_dir) as again:
            assert not again
        record = retrain_once(config, trigger="manual")
        assert record.outcome == "skipped" and "another retrain" in record.reason
        assert not RetrainScheduler(config).start("events")
    assert retrain_history(config.model.registry_dir) == []  # a refused attempt is no attempt

    target = "tests.streamer.test_scheduler:slow_rejected_retrain"
    first, second = (RetrainScheduler(config, target=target) for _ in range(2))
    assert first.start("events", 10)
    try:
        assert not second.start("psi")  # the child holds the lock, not the process that started it
        with retrain_lock(config.model.registry_dir) as held:
            assert not held
    finally:
        record = first.wait(30)
    assert record["outcome"] == "rejected" and record["input_records"] == 10
    assert second.start("psi")
    assert second.wait(30)["outcome"] == "rejected"


def test_child_outcomes_are_counted_and_a_crash_is_recorded(tmp_path, trained_registry):
    config = make_config(tmp_path, trained_registry)
    metrics = Metrics(CollectorRegistry())
    get = metrics.registry.get_sample_value
    scheduler = RetrainScheduler(config, ServiceObserver(metrics),
                                 target="tests.streamer.test_scheduler:crashing_retrain")
    assert scheduler.start("interval", 7)
    assert get("foldstream_retrain_running") == 1
    record = scheduler.wait(30)
    assert record["outcome"] == "failed" and "exited with status 1" in record["reason"]
    (entry,) = retrain_history(config.model.registry_dir)
    assert (entry["outcome"], entry["trigger"], entry["input_records"]) == ("failed", "interval", 7)
    assert get("foldstream_retrains_total", {"outcome": "failed"}) == 1
    assert get("foldstream_retrain_running") == 0
    assert get("foldstream_retrain_last_success_timestamp_seconds") == 0

    scheduler.target = "tests.streamer.test_scheduler:slow_rejected_retrain"
    assert scheduler.start("events")
    finished = scheduler.wait(30)
    assert get("foldstream_retrains_total", {"outcome": "rejected"}) == 1
    assert get("foldstream_retrain_last_success_timestamp_seconds") == pytest.approx(
        finished["started"] + finished["seconds"])


def test_a_failing_retrain_does_not_stop_the_consumer(make_app_config, make_kafka_producer,
                                                      synthetic_log, trained_registry, tmp_path):
    registry = Path(shutil.copytree(trained_registry, tmp_path / "models"))
    config = make_app_config(partitions=2, model={"registry_dir": registry},
                             retrain={"every_events": 100, "min_events": 0, "check_interval_s": 0.2,
                                      "cooldown_s": 3600.0})
    metrics = Metrics(CollectorRegistry())
    observer = ServiceObserver(metrics)
    monitor = ServiceMonitor(observer)
    scheduler = RetrainScheduler(config, observer, target="tests.streamer.test_scheduler:failed_retrain")
    launched = []

    def on_batch(service, outcomes):
        monitor.after_batch(service, outcomes)
        launched.extend(filter(None, [scheduler.tick()]))

    producer = make_kafka_producer()
    first, later = stream_events(synthetic_log, 3000, 300), stream_events(synthetic_log, 3300, 200)
    send_all(producer, config.kafka.input_topic, first)
    service = FoldService(config, on_batch=on_batch)
    monitor.model_loaded(service)
    service.start()
    try:
        run_until(service, lambda s: s.stats.applied >= len(first) and scheduler.last_record is not None)
        assert launched == ["events"] and scheduler.last_record["outcome"] == "failed"
        send_all(producer, config.kafka.input_topic, later)
        run_until(service, lambda s: s.stats.applied >= len(first) + len(later))
    finally:
        service.close()
        scheduler.close()
    assert launched == ["events"]  # the cooldown holds the next attempt back
    (entry,) = retrain_history(registry)
    assert entry["outcome"] == "failed" and entry["reason"] == "bad data"
    assert entry["input_records"] >= 100
    assert metrics.registry.get_sample_value("foldstream_retrains_total", {"outcome": "failed"}) == 1
