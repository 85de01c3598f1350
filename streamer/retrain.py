"""Full retraining from the live store, behind a quality gate.

:func:`retrain_once` is what ``foldstream retrain --now`` and the automatic scheduler run:

1. copy a consistent snapshot of every partition (a secondary instance's frozen view;
   the consumer keeps writing meanwhile) and read all user histories from it;
2. hold out the most recent ``holdout_fraction`` of events (global time cut);
3. train a candidate on the rest with the active model's hyperparameters;
4. score the candidate and the active model on the holdout, each folding users in from
   the pre-cut events (:mod:`factors.gate`); promote only if the candidate is not worse
   by more than ``tolerance``;
5. on promotion, train on ALL events and add + promote that model in the registry; the
   consumer notices the new ACTIVE pointer and switches;
6. append the outcome (time, duration, data size, metrics, decision, reason) to
   ``retrain-history.jsonl`` in the registry.

One retrain at a time across processes: :func:`retrain_lock` is a non-blocking
``flock`` on ``retrain.lock`` in the registry; a retrain that finds it taken returns a
"skipped" record and writes no history line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from factors.data import IdIndex, Interactions
from factors.evaluate import temporal_split
from factors.gate import decide, score_model
from factors.pipeline import TrainParams, train
from streamer.config import AppConfig
from streamer.reader import snapshot
from streamer.registry import ModelRegistry

log = logging.getLogger(__name__)

HISTORY_FILE = "retrain-history.jsonl"
LOCK_FILE = "retrain.lock"


@dataclass
class RetrainRecord:
    started: float
    seconds: float = 0.0
    outcome: str = "failed"  # promoted | rejected | failed | skipped
    reason: str = ""
    events: int = 0
    users: int = 0
    items: int = 0
    current_version: str | None = None
    new_version: str | None = None
    current_metrics: dict = field(default_factory=dict)
    candidate_metrics: dict = field(default_factory=dict)
    trigger: str = "manual"
    # Input records consumed when the retrain started: the sum over input partitions of
    # (applied offset + 1). The scheduler's event trigger counts from the latest one.
    input_records: int | None = None


def try_lock(registry_dir: str | os.PathLike) -> int | None:
    """Take the retrain lock without waiting: an fd holding it, or None when it is taken.

    The lock belongs to the open file: a child given the fd (``pass_fds``) keeps holding it
    after the parent closes its copy, and it is released when the last copy closes
    (also when the holder is killed).
    """
    root = Path(registry_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def retrain_lock(registry_dir: str | os.PathLike):
    """``with retrain_lock(dir) as held:`` ``held`` is False when another retrain has it."""
    fd = try_lock(registry_dir)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def load_histories(state_dir: Path, topic: str, applied: dict[int, int] | None = None) -> Interactions:
    """Every stored event of every user, from a snapshot taken beside the running consumer.

    ``applied``, when given, receives each partition's applied offset in that snapshot.
    """
    users, items = IdIndex(), IdIndex()
    u_parts, i_parts, w_parts, t_parts = [], [], [], []
    with snapshot(state_dir, topic) as stores:
        for partition, store in stores.items():
            if applied is not None:
                applied[partition] = store.applied_offset()
            for user, history in store.iter_users():
                n = len(history)
                if not n:
                    continue
                u_parts.append(np.full(n, users.add(user), dtype=np.int32))
                i_parts.append(np.fromiter((items.add(i) for i in history.item_ids),
                                           dtype=np.int32, count=n))
                w_parts.append(np.asarray(history.weights))
                t_parts.append(np.asarray(history.times))
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return Interactions(users=cat(u_parts, np.int32), items=cat(i_parts, np.int32),
                        weights=cat(w_parts, np.float32), timestamps=cat(t_parts, np.float64),
                        user_ids=users, item_ids=items)


def retrain_once(config: AppConfig, trigger: str = "manual", *, input_records: int | None = None,
                 lock: bool = True) -> RetrainRecord:
    """One retrain (steps in the module docstring); never raises for a failed attempt.

    ``input_records``: the input records consumed so far as the caller counts them (default:
    from the snapshot's applied offsets). ``lock=False``: the caller holds the retrain lock.
    """
    if lock:
        with retrain_lock(config.model.registry_dir) as held:
            if not held:
                return RetrainRecord(started=time.time(), outcome="skipped", trigger=trigger,
                                     reason="another retrain is running (retrain.lock is held)")
            return retrain_once(config, trigger, input_records=input_records, lock=False)
    record = RetrainRecord(started=time.time(), trigger=trigger, input_records=input_records)
    registry = ModelRegistry(config.model.registry_dir)
    clock = time.perf_counter()
    try:
        current = registry.load()
        record.current_version = current.version
        params = TrainParams.from_dict(current.artifact.params)
        applied: dict[int, int] = {}
        inter = load_histories(config.store.state_dir, config.kafka.input_topic, applied)
        if record.input_records is None:
            record.input_records = sum(offset + 1 for offset in applied.values())
        record.events, record.users, record.items = (len(inter), len(inter.user_ids),
                                                     len(inter.item_ids))
        if len(inter) < config.retrain.min_events:
            record.outcome = "skipped"
            record.reason = (f"{len(inter)} stored events, fewer than retrain.min_events="
                             f"{config.retrain.min_events}")
            return record
        history, holdout = temporal_split(inter, 1 - config.retrain.holdout_fraction)
        candidate = train(history, params).artifact(history)
        k = config.retrain.k
        record.candidate_metrics = score_model(candidate.item_factors, candidate.item_ids,
                                               params, history, holdout, k)
        record.current_metrics = score_model(current.artifact.item_factors,
                                             current.artifact.item_ids, params, history, holdout, k)
        decision = decide(record.current_metrics, record.candidate_metrics,
                          config.retrain.tolerance)
        record.reason = decision.reason
        if not decision.promote:
            record.outcome = "rejected"
            return record
        final = train(inter, params)
        final.metrics.update({f"gate_{key}": value for key, value in record.candidate_metrics.items()
                              if isinstance(value, (int, float))})
        version = registry.add(final.artifact(inter))
        registry.promote(version, reason=f"retrain ({trigger})")
        record.new_version = version
        record.outcome = "promoted"
        return record
    except Exception as exc:  # noqa: BLE001 - a failed attempt is recorded, not fatal
        log.exception("retrain failed")
        record.outcome = "failed"
        record.reason = f"{type(exc).__name__}: {exc}"
        return record
    finally:
        record.seconds = round(time.perf_counter() - clock, 3)
        append_history(Path(config.model.registry_dir), record)


def append_history(root: Path, record: RetrainRecord) -> None:
    """Add ``record`` as one JSON line to the registry's retrain history."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / HISTORY_FILE).open("a", encoding="utf-8") as fh:
        fh.write(record_json(record) + "\n")


def record_json(record: RetrainRecord) -> str:
    """``record`` as one line of JSON (the history's format)."""
    return json.dumps(asdict(record), default=_jsonable)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def retrain_history(registry_dir: Path) -> list[dict]:
    """Every recorded attempt, oldest first (a line still being appended is left out)."""
    path = Path(registry_dir) / HISTORY_FILE
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries
