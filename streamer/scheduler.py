"""Automatic retraining: when to retrain, and running it beside the consumer.

``foldstream run`` calls :meth:`RetrainScheduler.tick` after every turn of the loop. At most
every ``retrain.check_interval_s`` it:

1. reads the retrain history (``retrain-history.jsonl``, shared by every consumer through
   the registry dir) and the ACTIVE pointer: when the last attempt ended, the input records
   counted at it, and when the active model last changed (:func:`baseline`);
2. counts the input records the consumer group has consumed, globally: the sum over the
   input topic's partitions of the group's committed offsets (:class:`GroupOffsets`, only
   when ``every_events`` is set). The consumer commits
   ``applied offset + 1`` after every batch, so this is the sum of every partition store's
   applied offset + 1, whichever process owns it, and the same quantity a retrain records
   from its snapshot (dead letters and re-sent duplicates count: they are input records);
3. evaluates the triggers (:func:`due`) against that and the drift monitor's latest snapshot;
4. when one fires and no retrain is running anywhere, takes the retrain lock (a
   non-blocking ``flock`` in the registry dir) and starts ``python -m streamer.scheduler
   WORKDIR`` holding it: the child runs :func:`streamer.retrain.retrain_once` (quality gate,
   history line, promotion) and writes its record to ``WORKDIR/result.json``;
5. while the child runs, only polls it; when it has exited, reports the outcome to the
   observer (a child that died without a record is recorded in the history as failed).

The retrain never runs on the polling thread, so it cannot make the consumer miss
``max_poll_interval_ms``; a promotion reaches every consumer through the ACTIVE pointer
(:mod:`streamer.switch`). A child outlives a consumer that stops (it holds the lock until
it is done), so a restart does not waste a retrain.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from streamer.config import AppConfig, KafkaConfig, RetrainConfig

log = logging.getLogger(__name__)

TRIGGERS = ("interval", "events", "psi", "js", "unknown_items")
# The child's scheduling priority relative to the consumer: training competes for the same
# cores, and the consumer's latency matters more than the retrain's duration.
CHILD_NICENESS = 10
COMMITTED_TIMEOUT_MS = 2_000
SUCCESS = ("promoted", "rejected", "skipped")


@dataclass(frozen=True)
class Baseline:
    """What the triggers count from.

    since : float
        Wall-clock seconds of the later of the last attempt's end and the last change of
        the active model (the interval trigger counts from it).
    last_attempt_end : float or None
        End of the last attempt (the cooldown counts from it); None when never.
    input_records : int
        Input records consumed when the last attempt that counted them started; 0 when none.
    last_success_end : float or None
        End of the last attempt that did not fail.
    """

    since: float
    last_attempt_end: float | None = None
    input_records: int = 0
    last_success_end: float | None = None


def baseline(history: list[dict], pointer: dict | None, default_since: float) -> Baseline:
    """The :class:`Baseline` from retrain-history entries and the registry's ACTIVE pointer."""
    ends = [float(e["started"]) + float(e.get("seconds") or 0.0) for e in history if "started" in e]
    successes = [float(e["started"]) + float(e.get("seconds") or 0.0) for e in history
                 if "started" in e and e.get("outcome") in SUCCESS]
    counted = [e["input_records"] for e in history if e.get("input_records") is not None]
    last_end = max(ends) if ends else None
    changed = (pointer or {}).get("changed")
    marks = [t for t in (last_end, changed) if t is not None]
    return Baseline(since=max(marks) if marks else default_since, last_attempt_end=last_end,
                    input_records=int(counted[-1]) if counted else 0,
                    last_success_end=max(successes) if successes else None)


def due(config: RetrainConfig, now: float, base: Baseline, input_records: int | None,
        drift) -> str | None:
    """The first trigger that fires (one of TRIGGERS), or None.

    Parameters
    ----------
    config : RetrainConfig
        A trigger set to 0 is off; all off, nothing fires.
    now : float, wall-clock seconds
    base : Baseline
    input_records : int or None
        Input records consumed by the group now (None: unknown, the event trigger waits).
    drift : streamer.drift.DriftSnapshot or None
        The drift triggers need a window of at least ``config.min_events`` interactions;
        NaN values never fire.
    """
    if not config.automatic:
        return None
    if base.last_attempt_end is not None and now - base.last_attempt_end < config.cooldown_s:
        return None
    if config.interval_s and now - base.since >= config.interval_s:
        return "interval"
    if (config.every_events and input_records is not None
            and input_records - base.input_records >= config.every_events):
        return "events"
    if drift is not None and drift.events >= max(config.min_events, 1):
        for trigger, limit, value in (("psi", config.max_psi, drift.psi),
                                      ("js", config.max_js, drift.js),
                                      ("unknown_items", config.max_unknown_item_ratio,
                                       drift.unknown_item_ratio)):
            if limit and not math.isnan(value) and value > limit:
                return trigger
    return None


class GroupOffsets:
    """The group's committed offsets over every input partition, read with a client of its own.

    The client never subscribes, so it never joins the group: asking the consumer itself
    would send OffsetFetch requests into its group joins (kafka-python then never finishes
    a join while they keep coming).
    """

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self._client = None

    def total(self) -> int | None:
        """Sum of the committed offsets (None when they cannot be read now)."""
        from kafka import TopicPartition

        from streamer.kafka_io import make_consumer

        k = self.kafka
        try:
            if self._client is None:
                self._client = make_consumer(k.bootstrap_servers, k.group_id,
                                             client_id=f"{k.client_id}-offsets")
            partitions = self._client.partitions_for_topic(k.input_topic) or ()
            return sum(self._client.committed(TopicPartition(k.input_topic, p),
                                              timeout_ms=COMMITTED_TIMEOUT_MS) or 0
                       for p in sorted(partitions))
        except Exception as exc:  # noqa: BLE001 - the event trigger waits for the next check
            log.warning("reading the group's committed offsets failed: %r", exc)
            return None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing the offsets client failed")
            self._client = None


class RetrainScheduler:
    """Starts retrains in a child process when a trigger fires; see the module docstring.

    Parameters
    ----------
    config : AppConfig
    observer : streamer.observer.ServiceObserver, optional
        Gets the retrain metrics, and its drift monitor feeds the drift triggers.
    clock : callable, wall-clock seconds (tests pass a fake one)
    target : str
        ``"module:function"`` the child calls as ``f(config, trigger, input_records=...,
        lock=False)``, returning a :class:`streamer.retrain.RetrainRecord`.
    """

    def __init__(self, config: AppConfig, observer=None, *, clock: Callable[[], float] = time.time,
                 target: str = "streamer.retrain:retrain_once") -> None:
        self.config = config
        self.observer = observer
        self.clock = clock
        self.target = target
        self.started_at = clock()
        self._next_check = self.started_at  # first check on the first tick
        self._child: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._launch: dict = {}
        self.last_record: dict | None = None
        self._offsets = GroupOffsets(config.kafka)

    @property
    def running(self) -> bool:
        """A retrain started by this scheduler has not been reported yet."""
        return self._child is not None

    # -- the loop's entry point --------------------------------------------------------
    def tick(self) -> str | None:
        """Call after every turn of the consumer loop; returns the trigger when it started one."""
        now = self.clock()
        if now < self._next_check:
            return None
        self._next_check = now + self.config.retrain.check_interval_s
        drift = getattr(self.observer, "drift", None)
        return self.check(self._offsets.total, drift.snapshot if drift is not None else lambda: None)

    def check(self, input_records: Callable[[], int | None],
              drift: Callable[[], object | None] = lambda: None) -> str | None:
        """Steps 1-5 once: report a finished child, or start one if a trigger fires."""
        self.poll()
        r = self.config.retrain
        registry_dir = Path(self.config.model.registry_dir)
        base = self._baseline(registry_dir)
        if self.observer is not None and base.last_success_end is not None:
            self.observer.retrain_seen(base.last_success_end)
        if self.running or not r.automatic:
            return None
        count = input_records() if r.every_events else None
        snapshot = drift() if (r.max_psi or r.max_js or r.max_unknown_item_ratio) else None
        trigger = due(r, self.clock(), base, count, snapshot)
        if trigger is None:
            return None
        if count is None:
            count = input_records()
        return trigger if self.start(trigger, count) else None

    def _baseline(self, registry_dir: Path) -> Baseline:
        from streamer.registry import ModelRegistry
        from streamer.retrain import retrain_history

        try:
            pointer = ModelRegistry(registry_dir).pointer()
        except Exception:  # noqa: BLE001 - an unreadable pointer: count from start-up
            pointer = None
        return baseline(retrain_history(registry_dir), pointer, self.started_at)

    # -- the child ---------------------------------------------------------------------
    def start(self, trigger: str, input_records: int | None = None) -> bool:
        """Start a retrain child now; False when one runs already (here or elsewhere)."""
        from streamer.retrain import try_lock

        if self.running:
            return False
        fd = try_lock(self.config.model.registry_dir)
        if fd is None:
            log.info("retrain trigger %r fired but another retrain holds the lock", trigger)
            return False
        try:
            workdir = Path(tempfile.mkdtemp(prefix="foldstream-retrain-"))
            (workdir / "request.pickle").write_bytes(pickle.dumps({
                "config": self.config, "trigger": trigger, "input_records": input_records,
                "target": self.target}))
            self._child = subprocess.Popen([sys.executable, "-m", "streamer.scheduler", str(workdir)],
                                           pass_fds=(fd,))
        finally:
            os.close(fd)  # the child's copy keeps the lock
        self._workdir = workdir
        self._launch = {"started": self.clock(), "trigger": trigger, "input_records": input_records}
        log.info("retrain triggered by %s (input records %s): pid %d", trigger, input_records,
                 self._child.pid)
        if self.observer is not None:
            self.observer.retrain_started()
        return True

    def poll(self) -> dict | None:
        """Report the child's outcome once it has exited; the record, else None."""
        if self._child is None or self._child.poll() is None:
            return None
        return self._finish(self._child.returncode)

    def wait(self, timeout_s: float | None = None) -> dict | None:
        """Wait for a running child and report it (for tests and shutdown)."""
        if self._child is None:
            return None
        return self._finish(self._child.wait(timeout_s))

    def _finish(self, code: int) -> dict:
        from streamer.retrain import RetrainRecord, append_history

        result = self._workdir / "result.json"
        try:
            record = json.loads(result.read_text("utf-8"))
        except (OSError, ValueError):
            failed = RetrainRecord(started=self._launch["started"],
                                   seconds=round(self.clock() - self._launch["started"], 3),
                                   reason=f"retrain process exited with status {code} "
                                          "without a result",
                                   trigger=self._launch["trigger"],
                                   input_records=self._launch["input_records"])
            append_history(Path(self.config.model.registry_dir), failed)
            record = dataclasses.asdict(failed)
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._child = self._workdir = None
        self.last_record = record
        level = logging.WARNING if record["outcome"] == "failed" else logging.INFO
        log.log(level, "retrain %s (%s): %s", record["outcome"], record.get("trigger"),
                record.get("reason"))
        if self.observer is not None:
            self.observer.retrain(record["outcome"], float(record.get("seconds") or 0.0),
                                  float(record["started"]) + float(record.get("seconds") or 0.0))
        return record

    def close(self) -> None:
        """Report a finished child; a running one goes on alone (its record goes to the history)."""
        self._offsets.close()
        self.poll()
        if self._child is not None:
            log.info("retrain pid %d goes on after the consumer stops", self._child.pid)


def _child_main(workdir: Path) -> int:
    """``python -m streamer.scheduler WORKDIR``: one retrain, holding the inherited lock fd."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[retrain]: %(message)s")
    from streamer.retrain import record_json

    request = pickle.loads((workdir / "request.pickle").read_bytes())
    try:
        os.nice(CHILD_NICENESS)
    except OSError:
        pass
    module, _, name = request["target"].partition(":")
    target = getattr(importlib.import_module(module), name)
    record = target(request["config"], request["trigger"],
                    input_records=request["input_records"], lock=False)
    partial = workdir / "result.json.partial"
    partial.write_text(record_json(record), "utf-8")
    os.replace(partial, workdir / "result.json")
    return 0 if record.outcome in SUCCESS else 1


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))
