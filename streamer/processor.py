"""One micro-batch of one partition: decoded events -> histories -> one fold-in -> one write.

Kafka-free: the consumer hands in raw records of a single partition and gets back what to
dead-letter and what to publish. Follow one event through :meth:`PartitionProcessor.process`:

1. skip records at or below the partition's applied offset (already in the store);
2. decode (:class:`streamer.events.EventDecoder`): interaction, forget, or rejection;
3. group interactions by user, in offset order; a forget resets the user's history;
4. load the touched users' histories, append (dedupe by event id, cap by config);
5. fold every changed user in with ONE batched exact solve against the active model;
6. commit histories, vectors, deletes, outbox and the applied offset in one WriteBatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence


from streamer.codec import OutboxEntry, UserHistory, VectorRecord
from streamer.config import ProcessingConfig
from streamer.events import EventDecoder, Forget, Interaction, Rejected
from streamer.model import LoadedModel
from streamer.store import PartitionStore


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The parts of a Kafka record the processor needs (kafka-python independent)."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class BatchOutcome:
    """What one micro-batch did; the consumer turns this into metrics and Kafka calls."""

    last_offset: int = -1
    consumed: int = 0
    applied: int = 0
    skipped_replayed: int = 0
    duplicates: int = 0
    evicted: int = 0
    forgotten: int = 0
    unknown_item_events: int = 0
    users_updated: int = 0
    rejected: list[tuple[RawRecord, Rejected]] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    record_times_ms: list[int] = field(default_factory=list)  # broker times of new records
    fold_seconds: float = 0.0
    write_seconds: float = 0.0
    vectors: dict[str, VectorRecord] = field(default_factory=dict)


@dataclass
class _Pending:
    reset: bool = False
    items: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)


class PartitionProcessor:
    """Applies micro-batches to one partition's store against the current model."""

    def __init__(self, config: ProcessingConfig) -> None:
        self.config = config
        self.decoder = EventDecoder(config)

    def decode(self, store: PartitionStore, records: Sequence[RawRecord]) -> tuple[list, BatchOutcome]:
        """Steps 1-2: the records still to apply, decoded, and the rejections among them."""
        outcome = BatchOutcome()
        applied = store.applied_offset()
        decoded = []
        now_ms = int(time.time() * 1000)
        for record in records:
            outcome.consumed += 1
            if record.offset <= applied:
                outcome.skipped_replayed += 1
                continue
            broker_ms = record.timestamp_ms if record.timestamp_ms is not None and \
                record.timestamp_ms >= 0 else now_ms
            outcome.record_times_ms.append(broker_ms)
            event = self.decoder.decode(record.key, record.value, record.offset, broker_ms)
            if isinstance(event, Rejected):
                outcome.rejected.append((record, event))
            decoded.append(event)
            outcome.last_offset = record.offset
        return decoded, outcome

    def apply(self, store: PartitionStore, decoded: list, outcome: BatchOutcome,
              model: LoadedModel) -> BatchOutcome:
        """Steps 3-6 for events returned by :meth:`decode` (rejections already dead-lettered)."""
        if outcome.last_offset < 0:
            return outcome
        pending: dict[str, _Pending] = {}
        for event in decoded:
            if isinstance(event, Interaction):
                p = pending.setdefault(event.user, _Pending())
                p.items.append(event.item)
                p.weights.append(event.weight)
                p.times.append(event.ts)
                p.hashes.append(event.event_id_hash)
            elif isinstance(event, Forget):
                pending[event.user] = _Pending(reset=True)
                outcome.forgotten += 1

        stored = store.get_histories([u for u, p in pending.items() if not p.reset])
        histories: dict[str, UserHistory] = {}
        deletes: list[str] = []
        for user, p in pending.items():
            if p.reset and not p.items:
                deletes.append(user)
                continue
            base = UserHistory.empty() if p.reset else stored.get(user, UserHistory.empty())
            update = base.append(p.items, p.weights, p.times, p.hashes,
                                 max_events=self.config.history_cap)
            outcome.duplicates += update.duplicates
            outcome.evicted += update.evicted
            outcome.applied += len(p.items) - update.duplicates
            if update.added or p.reset or update.evicted:
                histories[user] = update.history

        started = time.perf_counter()
        users = list(histories)
        vectors, unknown = model.fold(histories[u] for u in users)
        outcome.fold_seconds = time.perf_counter() - started
        outcome.unknown_item_events = int(unknown.sum())
        processed_at = time.time()
        records = {
            user: VectorRecord(
                vector=vectors[row],
                model_version=model.version,
                n_interactions=len(histories[user]),
                last_event_time=histories[user].last_event_time,
                processed_at=processed_at,
            )
            for row, user in enumerate(users)
        }
        outcome.users_updated = len(records)
        outcome.vectors = records

        started = time.perf_counter()
        outcome.outbox = store.commit_batch(histories, records, deletes, outcome.last_offset,
                                            model_version=model.version)
        outcome.write_seconds = time.perf_counter() - started
        return outcome
