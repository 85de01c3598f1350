"""``foldstream verify``: audit the store and the output topic against the input.

The oracle is recomputed from scratch, sharing nothing with the consumer but the decoder
and the history rules:

1. read every record of the input topic (up to each partition's applied offset, as stored)
   or every row of a CSV log (:class:`CsvSource`: partitions as the producer assigns them,
   every row taken as applied) and decode it; rebuild each user's expected history in
   offset order (dedupe by event id, the history cap, forgets);
2. fold each expected history in against the model version the store says it is on;
3. compare with the store (history events exactly, vector within a float32 tolerance,
   model version) and with the newest message per key on the output topic (bit-exact
   vector, version);
4. report users checked, mismatches, missing (expected but not stored), extra (stored but
   not expected), and the records not applied yet; any mismatch, missing or extra user
   makes the exit status non-zero.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from kafka import TopicPartition
from kafka.partitioner.default import murmur2

from factors.data import read_interactions
from factors.errors import DataError
from streamer.codec import UserHistory
from streamer.config import AppConfig
from streamer.events import EventDecoder, Forget, Interaction
from streamer.kafka_io import make_consumer
from streamer.model import LoadedModel
from streamer.registry import ModelRegistry
from streamer.reader import snapshot
from streamer.replay import event_messages, log_fingerprint

VECTOR_RTOL = 1e-5
VECTOR_ATOL = 1e-6


@dataclass
class VerifyReport:
    users_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    records_read: int = 0
    records_pending: int = 0  # beyond the applied offset: not processed yet
    outbox_pending: int = 0
    partitions: dict[int, int] = field(default_factory=dict)  # partition -> applied offset

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.missing or self.extra)

    def summary(self) -> dict:
        return {
            "ok": self.ok,
            "users_checked": self.users_checked,
            "mismatches": len(self.mismatches),
            "missing": len(self.missing),
            "extra": len(self.extra),
            "records_read": self.records_read,
            "records_pending": self.records_pending,
            "outbox_pending": self.outbox_pending,
            "examples": (self.mismatches + self.missing + self.extra)[:10],
        }

    def lines(self) -> list[str]:
        verdict = "ALL-RECORDS-VERIFIED" if self.ok else "MISMATCH"
        out = [f"{verdict}: {self.users_checked} users checked, {len(self.mismatches)} mismatched, "
               f"{len(self.missing)} missing, {len(self.extra)} extra; {self.records_read} records "
               f"read, {self.records_pending} not applied yet, {self.outbox_pending} vectors "
               f"waiting in outboxes"]
        out += [f"  {problem}" for problem in (self.mismatches + self.missing + self.extra)[:20]]
        return out


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> dict[int, list]:
    """Every record of ``topic`` by partition, read to its high watermark.

    The high watermark comes from fetch responses (``consumer.highwater``), not from
    ListOffsets, which the development broker answers wrongly (docs/tansu-notes.md).
    """
    consumer = make_consumer(bootstrap, None, enable_auto_commit=False)
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        records: dict[int, list] = {p: [] for p in partitions}
        deadline = time.monotonic() + timeout_s
        done: set[int] = set()
        while len(done) < len(tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach the end within {timeout_s}s")
            for tp, batch in consumer.poll(timeout_ms=200).items():
                records[tp.partition].extend(batch)
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None and consumer.position(tp) >= high:
                    done.add(tp.partition)
        return records
    finally:
        consumer.close()


class CsvRecord(NamedTuple):
    """A CSV row as the Kafka record ``foldstream produce`` made of it (what replay needs)."""

    offset: int
    key: bytes
    value: bytes
    timestamp: int | None


@dataclass(frozen=True)
class CsvSource:
    """The input as the CSV log given to ``foldstream produce --interactions``, not the topic.

    A CSV has no partitions and no offsets; they are derived the way ``produce`` sends it:

    1. the rows become producer-contract messages with :func:`streamer.replay.event_messages`,
       in its order (time order, stable, rows without a timestamp last) and with its event
       ids, ``f"{log_fingerprint(csv)}-{row}"`` (``row``: 0-based data row in file order),
       or none when ``event_ids`` is False (``produce --no-event-ids``);
    2. each message goes to partition ``murmur2(key) & 0x7fffffff % kafka.input_partitions``,
       kafka-python's default partitioner, the one the producer uses; per partition the
       rows keep the order of step 1, as the broker appended them;
    3. every row counts as applied whatever offset the store has reached (rows carry
       offset -1): the CSV stands for everything the store should reflect, so
       ``records_pending`` stays 0 and a consumer that is behind, or a topic that holds
       events the CSV lacks, shows as mismatches. Sending the same CSV twice changes
       nothing (event ids dedupe), unless it was sent without ids.

    A row without a timestamp raises :class:`~factors.errors.DataError`: the consumer
    stamped it with the broker's append time, which only the topic records.
    """

    path: Path
    event_ids: bool = True

    def records(self, partitions: int) -> dict[int, list[CsvRecord]]:
        """The rows as records, by partition (every partition 0..partitions-1 present)."""
        inter, _ = read_interactions(self.path)
        undated = np.flatnonzero(~np.isfinite(inter.timestamps))
        if len(undated):
            raise DataError(
                f"{self.path}: {len(undated)} rows have no timestamp (first: data row "
                f"{undated[0] + 1}); the consumer gave them the broker's append time, which "
                "only the input topic records: verify against the topic instead")
        prefix = log_fingerprint(inter) if self.event_ids else None
        out: dict[int, list[CsvRecord]] = {p: [] for p in range(partitions)}
        for key, value in event_messages(inter, prefix):
            partition = (murmur2(key) & 0x7FFFFFFF) % partitions
            out[partition].append(CsvRecord(-1, key, value, None))
        return out


def expected_histories(config: AppConfig, records: Iterable, applied: int,
                       report: VerifyReport) -> dict[str, UserHistory | None]:
    """Replay one partition's records up to ``applied``: user -> history (None = forgotten)."""
    decoder = EventDecoder(config.processing)
    histories: dict[str, UserHistory | None] = {}
    for record in records:
        report.records_read += 1
        if record.offset > applied:
            report.records_pending += 1
            continue
        event = decoder.decode(record.key, record.value, record.offset,
                               record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None)
        if isinstance(event, Forget):
            histories[event.user] = None
        elif isinstance(event, Interaction):
            base = histories.get(event.user) or UserHistory.empty()
            histories[event.user] = base.append(
                [event.item], [event.weight], [event.ts], [event.event_id_hash],
                max_events=config.processing.history_cap).history
    return histories


def verify(config: AppConfig, check_output: bool = True, timeout_s: float = 60.0,
           source: CsvSource | None = None) -> VerifyReport:
    """Audit the store (and the output topic) against the input topic, or ``source``."""
    report = VerifyReport()
    k = config.kafka
    if source is None:
        inputs = read_topic(k.bootstrap_servers, k.input_topic, timeout_s)
    else:
        inputs = source.records(k.input_partitions)
    published = {}
    if check_output:
        for batch in read_topic(k.bootstrap_servers, k.output_topic, timeout_s).values():
            for record in sorted(batch, key=lambda r: r.offset):
                published[record.key.decode("utf-8")] = record.value
    registry = ModelRegistry(config.model.registry_dir)
    models: dict[str, LoadedModel] = {}

    with snapshot(config.store.state_dir, k.input_topic) as stores:
        for partition, records in sorted(inputs.items()):
            _verify_partition(config, report, partition, records, stores.get(partition),
                              published if check_output else None, registry, models)
    return report


def _verify_partition(config: AppConfig, report: VerifyReport, partition: int, records: list,
                      store, published: dict | None, registry: ModelRegistry,
                      models: dict[str, LoadedModel]) -> None:
    if store is None:
        applied, stored_h, stored_v, version, outbox = -1, {}, {}, None, []
    else:
        applied = store.applied_offset()
        stored_h = dict(store.iter_users())
        stored_v = dict(store.iter_vectors())
        version = store.model_version()
        outbox = list(store.iter_outbox())
    report.partitions[partition] = applied
    report.outbox_pending += len(outbox)
    unpublished = {e.user_id for e in outbox}
    expected = expected_histories(config, records, applied, report)
    live = {u: h for u, h in expected.items() if h is not None}
    report.extra += [f"p{partition} {u}: stored but never applied (or forgotten)"
                     for u in sorted(set(stored_h) - set(live))]
    report.missing += [f"p{partition} {u}: expected a stored history, none found"
                       for u in sorted(set(live) - set(stored_h))]
    users = sorted(set(live) & set(stored_h))
    report.users_checked += len(users)
    if users:
        if version not in models:
            models[version] = LoadedModel(registry.load(version))
        vectors, _ = models[version].fold([live[u] for u in users])
        for row, user in enumerate(users):
            output = published if published is not None and user not in unpublished else None
            problem = _compare(user, live[user], stored_h[user], stored_v.get(user),
                               vectors[row], version, output)
            if problem:
                report.mismatches.append(f"p{partition} {user}: {problem}")
    if published is not None:
        for user in sorted(set(expected) - set(live)):
            if published.get(user) is not None and user not in unpublished:
                report.mismatches.append(f"p{partition} {user}: forgotten but the output "
                                         "topic still has a vector")


def _compare(user, expected: UserHistory, stored: UserHistory, record, vector, version,
             published: dict | None) -> str | None:
    """Why ``user``'s stored state is wrong, or None. ``published``: newest output values."""
    if expected != stored:
        return (f"history differs: expected {len(expected)} events, stored {len(stored)}")
    if record is None:
        return "history stored but no vector"
    if record.model_version != version:
        return f"vector on model {record.model_version}, partition on {version}"
    if not np.allclose(record.vector, vector, rtol=VECTOR_RTOL, atol=VECTOR_ATOL):
        worst = float(np.max(np.abs(record.vector - vector)))
        return f"vector differs from the offline fold-in by up to {worst:.3g}"
    if record.n_interactions != len(expected):
        return f"vector counts {record.n_interactions} events, history has {len(expected)}"
    if published is not None:
        value = published.get(user)
        if value is None:
            return "no vector on the output topic"
        doc = json.loads(value)
        if doc.get("processed_at", 0) > record.processed_at:
            return None  # published after the snapshot was taken: newer than what we check
        if doc.get("model_version") != record.model_version:
            return f"output topic has model {doc.get('model_version')}, store {record.model_version}"
        if not np.array_equal(np.asarray(doc["vector"], np.float32), record.vector):
            return "output topic vector differs from the stored one"
    return None
