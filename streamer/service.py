"""The consumer service: Kafka -> exact fold-in -> RocksDB -> published vectors.

One loop thread, and a turn thread beside it. Each turn of :meth:`FoldService.run_once`:

1. ``poll`` up to ``batch_max_records`` records or ``batch_max_ms``;
2. apply assignment changes recorded by the rebalance listener (which only records them,
   since kafka-python runs listeners on its network thread): close the stores of revoked
   partitions; open the stores of assigned ones (retrying RocksDB's LOCK while the previous
   owner closes it), re-send their pending outbox, and seek to ``applied offset + 1``;
   records this poll returned for a just-assigned partition are dropped (they are fetched
   again from the seek position);
3. decode every partition's new records; send and flush dead letters;
4. per partition, fold the batch in and write state + outbox + applied offset in ONE
   RocksDB WriteBatch (:class:`streamer.processor.PartitionProcessor`; the partitions side
   by side on ``processing.apply_threads`` threads, the turn waiting for all of them);
5. publish the outbox entries, flush, then delete them from the outbox;
6. commit the consumed offsets to Kafka explicitly (advisory: for lag monitoring only,
   the applied offset in RocksDB is what decides where processing resumes).

Steps 4-5 run on the turn thread while the loop thread polls the next turn's records
(``processing.poll_while_applying``, default on): the fetch, which waits on the broker,
overlaps the fold-in instead of adding to it, so a record waits for about one turn before
it is applied instead of two. At most one turn is in flight, and the loop waits for it
(:meth:`FoldService.settle`) right after its poll returns, before anything else touches
the stores, the publisher or the consumer: steps 2-3 and 6, dead letters, model switches
and closing see no turn in flight, so the two threads share only the poll's time.
The store's LOCK keeps the exactly-once argument as it is: a partition revoked during the
poll is closed only once its turn is written, and whoever takes it over opens the store
then and resumes after the applied offset.

A crash between any two steps loses nothing and applies nothing twice: before step 4's
write Kafka redelivers the records; after it, the applied offset skips them and the
outbox re-sends their vectors.

Model switches: every partition store records the model version its vectors were folded
against, and step 4 folds a partition's batch against that version. At most every
``model.check_interval_s`` the loop reads the registry's ACTIVE pointer; while some store is
on another version, each turn switches ONE of them (:mod:`streamer.switch`: re-fold every
history, one WriteBatch of vectors + version + outbox, then publish and ack the outbox like
step 5), so polling goes on between partitions. A partition assigned while on another
version is paused until its switch is done, so none of its batches is applied first.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from streamer.config import AppConfig
from streamer.fetch_wait import FetchWaitGuard
from streamer.kafka_io import make_consumer, make_vector_producer
from streamer.model import LoadedModel
from streamer.processor import BatchOutcome, PartitionProcessor
from streamer.publisher import Publisher
from streamer.registry import ModelRegistry
from streamer.store import PartitionStore
from streamer.switch import ModelCache, switch_partition
from streamer.warmup import compile_kernels_once

log = logging.getLogger(__name__)


# A micro-batch allocates some ten container objects per record, alive until the batch
# ends: with CPython's default 700-allocation threshold they survive into the old
# generations and trigger full collections that also walk every long-lived object
# (the history cache, kafka-python's buffers) many times per batch. Collections every
# ~100k allocations, after freezing what start-up built, cost a fraction of that.
GC_THRESHOLDS = (100_000, 20, 100)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()  # the model, item index and clients: never garbage, never scanned again
    if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
        gc.set_threshold(*GC_THRESHOLDS)


class _AssignmentLog(ConsumerRebalanceListener):
    """Records assignment changes for the main loop; does no work on the network thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assigned: set[TopicPartition] = set()
        self._revoked: set[TopicPartition] = set()
        self.rebalances = 0

    def on_partitions_revoked(self, revoked) -> None:
        with self._lock:
            self._revoked |= set(revoked)
            self._assigned -= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        with self._lock:
            self._assigned |= set(assigned)
            self.rebalances += 1

    def take(self) -> tuple[set[TopicPartition], set[TopicPartition]]:
        """(newly assigned, revoked) since the last call."""
        with self._lock:
            assigned, revoked = self._assigned, self._revoked
            self._assigned, self._revoked = set(), set()
        return assigned, revoked - assigned


LATENCY_SAMPLES = 2_000_000  # 16 MB of float64


@dataclass
class ServiceStats:
    """Running totals, for the CLI's progress line and the demo's summary."""

    consumed: int = 0
    applied: int = 0
    skipped_replayed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    forgotten: int = 0
    unknown_item_events: int = 0
    users_updated: int = 0
    published: int = 0
    users_refolded: int = 0  # re-folded and republished by model switches
    partitions_switched: int = 0
    batches: int = 0
    rebalances: int = 0
    history_cache_hits: int = 0  # a batch's users with a stored history found in memory
    history_cache_misses: int = 0  # ... read from RocksDB
    # Event-to-published latencies of the most recent events (at most LATENCY_SAMPLES),
    # one array per batch: a long-running consumer must not keep one per event forever.
    # Beside each, the part of it spent in this process: from poll() returning the batch
    # to the acknowledgement, the same for all of a batch's events.
    latencies_ms: list[np.ndarray] = field(default_factory=list)
    consumer_ms: list[tuple[float, int]] = field(default_factory=list)
    _latency_count: int = 0

    def add_latencies(self, values: np.ndarray, consumer_ms: float = math.nan) -> None:
        self.latencies_ms.append(values)
        self.consumer_ms.append((consumer_ms, values.shape[0]))
        self._latency_count += values.shape[0]
        while self._latency_count > LATENCY_SAMPLES and len(self.latencies_ms) > 1:
            self._latency_count -= self.latencies_ms.pop(0).shape[0]
            self.consumer_ms.pop(0)

    def clear_latencies(self) -> None:
        self.latencies_ms.clear()
        self.consumer_ms.clear()
        self._latency_count = 0

    def latency_percentiles(self, *qs: float) -> list[float]:
        """Event-to-published latency percentiles (ms) of the events kept."""
        if not self.latencies_ms:
            return [float("nan")] * len(qs)
        values = np.concatenate(self.latencies_ms)
        return [float(np.percentile(values, q)) for q in qs]

    def consumer_latency_percentiles(self, *qs: float) -> list[float]:
        """Percentiles (ms, per event) of the share of that latency spent in this process."""
        ms = np.array([v for v, _ in self.consumer_ms], dtype=np.float64)
        counts = np.array([n for _, n in self.consumer_ms], dtype=np.int64)
        values = np.repeat(ms, counts)
        values = values[~np.isnan(values)]
        if not values.size:
            return [float("nan")] * len(qs)
        return [float(np.percentile(values, q)) for q in qs]


class FoldService:
    """Runs the consumer loop until :meth:`stop` (or a signal handler calling it)."""

    def __init__(
        self,
        config: AppConfig,
        *,
        consumer_overrides: dict | None = None,
        on_batch: Callable[["FoldService", list[BatchOutcome]], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = ModelRegistry(config.model.registry_dir)
        self.models = ModelCache(self.registry)
        self.model: LoadedModel = self.models.activate()  # the registry's ACTIVE version
        self.last_applied: list[tuple[PartitionStore, BatchOutcome]] = []
        self._next_model_check = time.monotonic() + config.model.check_interval_s
        self._switch_pending = False  # some store may be on another version than self.model
        self._held: set[TopicPartition] = set()  # paused until their switch
        self._fetch_wait: FetchWaitGuard | None = None  # set by start()
        self.processor = PartitionProcessor(config.processing)
        self.stats = ServiceStats()
        self.stores: dict[TopicPartition, PartitionStore] = {}
        self.on_batch = on_batch
        self._consumer_overrides = consumer_overrides or {}
        self._stop = threading.Event()
        self._assignments = _AssignmentLog()
        self.consumer = None
        self.publisher: Publisher | None = None
        # The turn in flight when turns overlap: (its apply-and-publish, the group
        # generation its records were polled under), and the thread that runs it.
        self._pending: tuple[Future, tuple[int, str]] | None = None
        self._turns: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the current batch and exit (safe from signal handlers)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def turn_in_flight(self) -> bool:
        """Whether a turn is being applied and published in the background (until the
        next :meth:`run_once` or :meth:`settle` finishes it)."""
        return self._pending is not None

    def start(self) -> None:
        seconds = compile_kernels_once(self.model, self.config.processing)
        if seconds is not None:  # before joining: compiling holds the GIL for up to a minute
            log.info("numba kernels compiled or loaded from cache in %.1f s", seconds)
        _tune_gc()
        k = self.config.kafka
        settings = dict(
            client_id=k.client_id,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            request_timeout_ms=k.request_timeout_ms,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            max_poll_records=self.config.processing.batch_max_records,
        )
        # consumer_overrides (tests, benchmarks) win over the configuration.
        settings.update(self._consumer_overrides)
        self.consumer = make_consumer(k.bootstrap_servers, k.group_id, **settings)
        self._fetch_wait = FetchWaitGuard(self.consumer, settings["fetch_max_wait_ms"])
        self.consumer.subscribe([k.input_topic], listener=self._assignments)
        producer = make_vector_producer(k.bootstrap_servers, client_id=f"{k.client_id}-publisher")
        self.publisher = Publisher(producer, k.output_topic, k.dead_letter_topic)

    def run(self, max_seconds: float | None = None) -> ServiceStats:
        """Start, loop until stopped (or ``max_seconds``), then close cleanly.

        When a turn raises (a failed RocksDB write: disk full), everything is still closed,
        and the turn's error is the one raised, not a follow-on error from closing.
        """
        self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.run_once()
        except BaseException:
            self.close(best_effort=True)
            raise
        self.close()
        return self.stats

    def close(self, best_effort: bool = False) -> None:
        """Commit what was applied, close the stores, then the clients.

        A store that fails to close (one whose write failed stays in RocksDB's background
        error state: "Writer has previous error") does not stop the others or the clients
        from closing; its error is raised at the end, or only logged with ``best_effort``.
        """
        failed: Exception | None = None
        try:
            self.settle()  # the turn in flight is written and published before anything closes
        except Exception as exc:  # noqa: BLE001 - close the rest, then report
            log.error("the last turn failed: %s", exc)
            failed = exc
        if self._turns is not None:
            self._turns.shutdown(wait=True)
            self._turns = None
        if self.consumer is not None:
            self._commit(sync=True)
        self.processor.close()  # its threads are idle between turns: nothing is left unwritten
        for tp in list(self.stores):
            try:
                self._close_store(tp)
            except Exception as exc:  # noqa: BLE001 - close the rest, then report
                log.error("closing the store of partition %d failed: %s", tp.partition, exc)
                failed = failed or exc
        if self.publisher is not None:
            try:
                self.publisher.close(timeout_s=5)
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing the producer failed")
            self.publisher = None
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001
                log.exception("closing the consumer failed")
            self.consumer = None
        if failed is not None and not best_effort:
            raise failed

    # -- one turn of the loop --------------------------------------------------------
    def run_once(self) -> list[BatchOutcome]:
        """One turn: poll, finish the turn before (if one is in flight), then decode this
        turn's records and apply them, in the background when ``poll_while_applying``.

        Returns the outcomes of the turn finished during this call: the previous one when
        turns overlap (empty while nothing was in flight), else this one.
        """
        # This frame holds nothing of the turn: a poll that waited out its timeout leaves
        # kafka-python 3.0's KafkaTimeoutError in a reference cycle whose frames reach the
        # callers' (frame.f_back), and a finished frame keeps its locals (kafka-python's
        # poll frame keeps the dict it returned: _turn empties it). Every turn's records,
        # vectors and outbox entries stayed alive until a garbage collection walked them
        # all: a 160-270 ms pause every 15-30 s at 10,000 events/s on a 2-core host.
        p = self.config.processing
        return self._turn(self.consumer.poll(timeout_ms=p.batch_max_ms,
                                             max_records=p.batch_max_records),
                          time.time() * 1000.0)

    def _turn(self, polled: dict, polled_at_ms: float) -> list[BatchOutcome]:
        """:meth:`run_once` after its poll; ``polled_at_ms``: when the poll returned."""
        p = self.config.processing
        # Everything below runs with no turn in flight: the stores, the publisher's error
        # state and the consumer are touched by one thread at a time.
        settled = self._pending is not None
        outcomes = self.settle()
        fresh = self._apply_assignment_changes()
        if self._fetch_wait is not None:
            self._fetch_wait.after_poll(sum(map(len, polled.values())), self._behind_log_end)
        generation = self._generation()
        work: list[tuple[TopicPartition, PartitionStore, list, BatchOutcome]] = []
        for tp, records in polled.items():
            store = self.stores.get(tp)
            if store is None or tp in fresh:
                continue  # not ours (any more), or fetched before our seek
            # kafka-python's records have RawRecord's attributes: no copy per record.
            decoded, outcome = self.processor.decode(store, records)
            outcome.polled_at_ms = polled_at_ms
            work.append((tp, store, decoded, outcome))
        # Decoded: drop the records now. kafka-python's own poll frame returned this dict,
        # and may outlive the turn as run_once's comment says.
        polled.clear()

        work = self._still_member(work, generation)
        # Dead letters are acknowledged before the offsets past them are written.
        rejected = 0
        for tp, _, _, outcome in work:
            rejected += self.publisher.send_dead_letters(tp.topic, tp.partition, outcome.rejected)
        if rejected:
            self.publisher.flush()

        # Each partition's batch against the model of its stored version.
        batches = [(store, decoded, outcome, self._model_for(store))
                   for _, store, decoded, outcome in self._still_member(work, generation)]
        if batches and p.poll_while_applying:
            if self._turns is None:
                self._turns = ThreadPoolExecutor(1, thread_name_prefix="foldstream-turn")
            self._pending = (self._turns.submit(self._apply_and_publish, batches), generation)
        elif batches or not settled:  # (a turn finished above already did the rest)
            outcomes = self._finish(self._apply_and_publish(batches), generation)
        return outcomes

    def settle(self) -> list[BatchOutcome]:
        """Wait for the turn in flight, if any, and finish it: switch a stale partition,
        commit offsets, count, call ``on_batch``. Its outcomes (empty when none was in
        flight); its error, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        future, generation = pending
        try:
            applied = future.result()
        except BaseException:
            if not future.done():  # interrupted (Ctrl-C): close() waits for it and finishes it
                self._pending = pending
            raise
        return self._finish(applied, generation)

    def _apply_and_publish(self, batches: list) -> list[tuple[PartitionStore, BatchOutcome]]:
        """Steps 4-5 of a turn (on the turn thread when turns overlap: it touches only the
        batches' stores, the processor and the publisher, while the loop thread polls)."""
        if not batches:
            return []
        outcomes = self.processor.apply_many(batches)
        applied = [(batch[0], outcome) for batch, outcome in zip(batches, outcomes)]
        self._publish(applied)
        return applied

    def _finish(self, applied: list[tuple[PartitionStore, BatchOutcome]],
                generation: tuple[int, str]) -> list[BatchOutcome]:
        self.last_applied = applied
        outcomes = [outcome for _, outcome in applied]
        if self._generation() == generation:
            self._switch_step()
        self._commit(sync=False)
        self._account(outcomes)
        if self.on_batch is not None:
            self.on_batch(self, outcomes)
        return outcomes

    def _publish(self, applied: list[tuple[PartitionStore, BatchOutcome]]) -> None:
        sent = sum(self.publisher.send_vectors(outcome.outbox) for _, outcome in applied)
        if sent:
            self.publisher.flush()
            for store, outcome in applied:
                if outcome.outbox:
                    store.ack_outbox([entry.key for entry in outcome.outbox])
            self.stats.published += sent
        acked_at_ms = time.time() * 1000.0
        for _, outcome in applied:
            if outcome.record_times_ms:
                self.stats.add_latencies(
                    acked_at_ms - np.asarray(outcome.record_times_ms, dtype=np.float64),
                    acked_at_ms - outcome.polled_at_ms)

    def _behind_log_end(self) -> dict[TopicPartition, int]:
        """Records between each fetchable partition's position and its log end (asked of
        the broker: one ListOffsets request)."""
        tps = [tp for tp in self.stores if tp not in self._held]
        if not tps:
            return {}
        try:
            ends = self.consumer.end_offsets(tps)
            return {tp: ends[tp] - self.consumer.position(tp) for tp in tps if ends.get(tp) is not None}
        except KafkaError as exc:
            log.debug("cannot compare positions with the log end: %s", exc)
            return {}

    # -- assignment ------------------------------------------------------------------
    def _generation(self) -> tuple[int, str]:
        """The group generation and member id this process holds its partitions under."""
        meta = self.consumer.group_metadata()
        return meta.generation_id, meta.member_id

    def _still_member(self, work: list, generation: tuple[int, str]) -> list:
        """``work``, or nothing once the group generation it was polled under has ended.

        A turn that outlives ``max_poll_interval_ms`` (a stall, a long pause) makes
        kafka-python's heartbeat thread leave the group, and the partitions go to another
        member; the rebalance listener hears of it only at the next ``poll()``. Writing the
        batch anyway would apply it under an assignment this process no longer holds: drop
        it, and whoever owns the partition next reads it again after the stored offset.
        """
        if not work or (generation[0] >= 0 and self._generation() == generation):
            return work
        log.warning("left the group (generation %d) with a batch in hand: dropping the records "
                    "polled for partitions %s", generation[0], sorted(tp.partition for tp, *_ in work))
        return []

    def _apply_assignment_changes(self) -> set[TopicPartition]:
        assigned, revoked = self._assignments.take()
        for tp in revoked:
            self._close_store(tp)
        fresh = set()
        for tp in sorted(assigned):
            store = self.stores.get(tp)
            if store is None:
                store = PartitionStore.open(
                    self.config.store.state_dir, tp.topic, tp.partition,
                    lock_timeout_s=self.config.store.lock_timeout_s, config=self.config.store,
                )
                self.stores[tp] = store
                self._resend_outbox(store)
            applied = store.applied_offset()
            if applied < 0:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, applied + 1)
            self._hold_if_stale(tp, store)
            fresh.add(tp)
        if assigned or revoked:
            self.stats.rebalances = self._assignments.rebalances
            log.info("assignment: +%s -%s", sorted(assigned), sorted(revoked))
        return fresh

    def _resend_outbox(self, store: PartitionStore) -> None:
        entries = list(store.iter_outbox())
        if not entries:
            return
        self.publisher.send_vectors(entries)
        self.publisher.flush()
        store.ack_outbox([e.key for e in entries])
        self.stats.published += len(entries)
        log.info("re-sent %d pending vectors of %s", len(entries), store.name)

    def _close_store(self, tp: TopicPartition) -> None:
        self._held.discard(tp)
        store = self.stores.pop(tp, None)
        if store is not None:
            self.processor.forget(store)
            store.close()

    # -- models ----------------------------------------------------------------------
    def _model_for(self, store: PartitionStore) -> LoadedModel:
        version = store.model_version()
        if version is None or version == self.model.version:
            return self.model  # a new store takes the active version
        return self.models.get(version)

    def _hold_if_stale(self, tp: TopicPartition, store: PartitionStore) -> None:
        """Pause a just-assigned partition on another version until it is switched."""
        version = store.model_version()
        if version is not None and version != self.model.version:
            self.consumer.pause(tp)
            self._held.add(tp)
            self._switch_pending = True

    def _check_active(self) -> None:
        """Follow the registry's ACTIVE pointer (one small file read)."""
        try:
            version = self.registry.active_version()
            if version is None or version == self.model.version:
                return
            model = self.models.activate(version)
        except Exception:  # noqa: BLE001 - keep folding against the current model, retry later
            log.exception("cannot load the new active model; staying on %s", self.model.version)
            return
        log.info("active model changed from %s to %s: switching partitions",
                 self.model.version, model.version)
        self.model = model
        self._switch_pending = True

    def _switch_step(self) -> None:
        """Between turns: re-read ACTIVE when due, then switch at most one stale partition."""
        now = time.monotonic()
        if now >= self._next_model_check:
            self._next_model_check = now + self.config.model.check_interval_s
            self._check_active()
        if not self._switch_pending:
            return
        current = (None, self.model.version)
        for tp in sorted(self._held):
            if self.stores[tp].model_version() in current:  # ACTIVE came back to its version
                self._release(tp)
        stale = [tp for tp in sorted(self._held) + sorted(set(self.stores) - self._held)
                 if self.stores[tp].model_version() not in current]
        if not stale:
            self._switch_pending = False
            return
        tp = stale[0]
        store = self.stores[tp]
        outcome = switch_partition(store, self.model)
        self.processor.forget(store)  # its cached item indices are the old model's rows
        if outcome.outbox:
            self.stats.published += self.publisher.send_vectors(outcome.outbox)
            self.publisher.flush()
            store.ack_outbox([entry.key for entry in outcome.outbox])
        self.stats.users_refolded += outcome.users
        self.stats.partitions_switched += 1
        self._release(tp)
        self._switch_pending = len(stale) > 1

    def _release(self, tp: TopicPartition) -> None:
        if tp in self._held:
            self._held.discard(tp)
            self.consumer.resume(tp)

    # -- offsets ---------------------------------------------------------------------
    def _commit(self, sync: bool) -> None:
        offsets = {
            tp: OffsetAndMetadata(store.applied_offset() + 1, "", -1)
            for tp, store in self.stores.items()
            if store.applied_offset() >= 0
        }
        if not offsets:
            return
        try:
            if sync:
                self.consumer.commit(offsets)
            else:
                self.consumer.commit_async(offsets)
        except Exception as exc:  # noqa: BLE001 - advisory: the store decides where we resume
            log.warning("committing offsets to Kafka failed (advisory only): %r", exc)

    def _account(self, outcomes: list[BatchOutcome]) -> None:
        s = self.stats
        for o in outcomes:
            s.consumed += o.consumed
            s.applied += o.applied
            s.skipped_replayed += o.skipped_replayed
            s.duplicates += o.duplicates
            s.dead_lettered += len(o.rejected)
            s.forgotten += o.forgotten
            s.unknown_item_events += o.unknown_item_events
            s.users_updated += o.users_updated
            s.history_cache_hits += o.history_cache_hits
            s.history_cache_misses += o.history_cache_misses
        if outcomes:
            s.batches += 1
