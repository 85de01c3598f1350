"""One micro-batch of one partition: decoded events -> histories -> one fold-in -> one write.

Kafka-free: the consumer hands in raw records of a single partition and gets back what to
dead-letter and what to publish. Follow one event through :meth:`PartitionProcessor.decode`
and :meth:`PartitionProcessor.apply`:

1. skip records at or below the partition's applied offset (already in the store);
2. decode (:class:`streamer.events.EventDecoder`): interaction, forget, or rejection; a
   batch of nothing but interactions of the common shape stays in columns
   (:class:`streamer.events.InteractionColumns`, one kernel call for the batch);
3. group interactions by user, in offset order; a forget resets the user's history;
4. load the touched users' histories (from :class:`HistoryCache`, the recently updated
   users kept in memory, else from the store) as columns and append the new events to all
   of them in one kernel call (:mod:`streamer.history_kernels`: dedupe by event id, order
   by time, cap by config);
5. fold every changed user in with ONE batched exact solve against the active model
   (users with long histories from their cached normal equations, :mod:`factors.gram_cache`);
6. commit histories, vectors, deletes, outbox and the applied offset in one WriteBatch; a
   user's new events usually go into its history's head only, not the whole history
   (:func:`streamer.history_kernels.plan_history_writes`).
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from factors.gram_cache import GramCache
from factors.rows import row_entries
from streamer.codec import OutboxEntry, UserHistory, VectorRecord, encode_history
from streamer.config import ProcessingConfig
from streamer.events import EventDecoder, Forget, InteractionColumns, Rejected
from streamer.history_kernels import (
    HEAD_MIN_EVENTS,
    HistoryColumns,
    check_history_parts,
    count_events,
    encode_histories,
    merge_new_events,
    parse_histories,
    plan_history_writes,
    split_head_record,
    take_merged,
    visible_events,
)
from streamer.model import LoadedModel
from streamer.store import PartitionStore


class RawRecord(NamedTuple):
    """The parts of a Kafka record the processor needs (kafka-python independent).

    Its fields are named as kafka-python's ``ConsumerRecord`` attributes, so the consumer
    hands those in as they are (no copy per record).
    """

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None  # broker timestamp, ms since the epoch
    headers: Sequence[tuple[str, bytes]] = ()


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
    unknown_item_events: int = 0  # new events kept in histories, on items the model does not know
    users_updated: int = 0
    # Users with a stored history, found in the history cache (hits) or read from RocksDB
    # (misses); long-history solves from a cached Cholesky factor (hits) or rebuilt (misses).
    history_cache_hits: int = 0
    history_cache_misses: int = 0
    gram_cache_hits: int = 0
    gram_cache_misses: int = 0
    heads_written: int = 0  # users whose new events went into their history's head only
    rejected: list[tuple[RawRecord, Rejected]] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    record_times_ms: list[int] = field(default_factory=list)  # broker times of new records
    polled_at_ms: float = math.nan  # wall-clock time poll() returned the batch's records
    fold_seconds: float = 0.0
    write_seconds: float = 0.0
    vectors: dict[str, VectorRecord] = field(default_factory=dict)
    # For drift monitoring: items of the batch's interactions (re-sent duplicates
    # included), users without any stored history before the batch and their events,
    # and the updated users' previous vectors on the same model.
    applied_items: list[str] = field(default_factory=list)
    new_users: int = 0
    new_user_events: int = 0
    previous_vectors: dict[str, np.ndarray] = field(default_factory=dict)


# Updated users whose previous vector is read for drift (cosine shift), at most once per
# DRIFT_SAMPLE_INTERVAL_S per partition: a few hundred users a second fill the histogram,
# where reading every updated user's vector cost as much as the fold-in, and a sample of
# every micro-batch of a live stream (tens a second per partition, each a RocksDB
# multi-get) cost 1.5 us per event at 10,000 events/s and more as batches shrink.
DRIFT_SAMPLE_USERS = 32
DRIFT_SAMPLE_INTERVAL_S = 0.25

# What one cached user costs beyond its events, in events (an event is about 30 bytes in
# the cache; ``processing.history_cache_events`` bounds the cache per process).
ENTRY_OVERHEAD_EVENTS = 16


class PartitionProcessor:
    """Applies micro-batches to partition stores against the current model."""

    def __init__(self, config: ProcessingConfig, cache_events: int | None = None) -> None:
        self.config = config
        self.decoder = EventDecoder(config)
        self.cache_events = config.history_cache_events if cache_events is None else cache_events
        # What is kept per store (a partition's batch runs on one thread at a time), made
        # by _prepare on the calling thread.
        self._partitions: weakref.WeakKeyDictionary[PartitionStore, _Partition] = weakref.WeakKeyDictionary()
        self._pool: ThreadPoolExecutor | None = None

    def decode(self, store: PartitionStore, records: Sequence[RawRecord]) -> tuple[list, BatchOutcome]:
        """Steps 1-2: the records still to apply, decoded, and the rejections among them.

        ``records``: :class:`RawRecord` or anything with its attributes (kafka-python's
        ``ConsumerRecord``), in offset order.
        """
        outcome = BatchOutcome()
        applied = store.applied_offset()
        fresh = [record for record in records if record.offset > applied]
        outcome.skipped_replayed = len(records) - len(fresh)
        outcome.consumed = len(records)
        if not fresh:
            return [], outcome
        now_ms = int(time.time() * 1000)
        times = outcome.record_times_ms
        times += [now_ms if t is None or t < 0 else t for t in (record.timestamp for record in fresh)]
        offsets = [record.offset for record in fresh]
        decoded = self.decoder.decode_batch([record.key for record in fresh],
                                            [record.value for record in fresh], offsets, times)
        if type(decoded) is not InteractionColumns:
            outcome.rejected = [(record, event) for record, event in zip(fresh, decoded)
                                if type(event) is Rejected]
        outcome.last_offset = offsets[-1]
        return decoded, outcome

    def apply_many(self, work: Sequence[tuple[PartitionStore, list, BatchOutcome, LoadedModel]]
                   ) -> list[BatchOutcome]:
        """:meth:`apply` for the batches of several partitions (distinct stores), on up to
        ``apply_threads`` threads; the outcomes in the order of ``work``.

        The partitions share nothing but the read-only model: each has its own store,
        history cache and normal-equation cache, and each batch is its own WriteBatch, so
        they run side by side wherever their kernels and RocksDB calls release the GIL
        (most of the fold, parse, merge and write). Their solves then stay on their own
        thread (no nested numba thread pool). Returns when every batch is done; the first
        error, in the order of ``work``, is raised then (the other batches are written or
        not, each whole, as after a crash).
        """
        for store, _, _, model in work:  # every store counted before a cache is sized
            self._prepare(store, model)
        if len(work) < 2 or self.config.apply_threads < 2:
            return [self.apply(*item) for item in work]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.apply_threads, thread_name_prefix="foldstream-apply")
        futures = [self._pool.submit(self.apply, *item, serial=True) for item in work]
        try:
            wait(futures)
        except BaseException:  # (a KeyboardInterrupt) no batch may outlive the turn: the
            wait(futures)      # caller closes the stores next
            raise
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the worker threads of :meth:`apply_many` (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def apply(self, store: PartitionStore, decoded: list, outcome: BatchOutcome,
              model: LoadedModel, *, serial: bool | None = None) -> BatchOutcome:
        """Steps 3-6 for events returned by :meth:`decode` (rejections already dead-lettered).

        ``serial``: solve on the calling thread (True), or let a large batch use numba's
        thread pool (None, see :meth:`factors.gram_cache.GramCache.solve`).
        """
        if outcome.last_offset < 0:
            return outcome
        # Step 3: the batch's interactions in columns, each tagged with its user's index
        # (its "segment"); a forget drops the user's earlier events and stored history.
        # Item ids: ``new_len[e]`` bytes at ``new_pos[e]`` of ``tail``.
        if type(decoded) is InteractionColumns:  # the common case: columns from the decoder
            segment: dict = {}
            seg = [segment.setdefault(key, len(segment)) for key in decoded.keys]
            users = [key.decode("ascii") for key in segment]
            forget_at = [-1] * len(users)
            weights, times, hashes = decoded.weights, decoded.times, decoded.hashes
            tail, new_pos, new_len = decoded.ids, decoded.item_pos.copy(), decoded.item_len
            items = None  # as str only for drift monitoring, at the end
        else:
            users, forget_at, seg, items, weights, times, hashes = self._columns(decoded, outcome)
            new_ids = [item.encode("utf-8") for item in items]
            new_len = np.fromiter(map(len, new_ids), dtype=np.int64, count=len(new_ids))
            new_pos = np.zeros(len(new_ids), np.int64)
            np.cumsum(new_len[:-1], out=new_pos[1:])
            tail = b"".join(new_ids)
            weights = np.array(weights, dtype=np.float64)
            times = np.array(times, dtype=np.float64)
            hashes = np.array(hashes, dtype=np.uint64)
        seg_a = np.array(seg, dtype=np.int64)
        reset = np.array(forget_at, dtype=np.int64) >= 0
        if reset.any():  # (only decoded lists hold forgets)
            live = np.arange(len(seg)) >= np.array(forget_at, dtype=np.int64)[seg_a]
            if not live.all():
                seg_a, weights, times, hashes = seg_a[live], weights[live], times[live], hashes[live]
                new_pos, new_len = new_pos[live], new_len[live]
                items = [items[j] for j in np.flatnonzero(live).tolist()]

        # Step 4: base histories from the cache or the store, as columns: two parts per
        # user, its sealed part and its head (the cache holds the bytes the store holds);
        # then the new events, grouped by user in arrival order, merged in by one kernel
        # call. A user missing from the cache is read from the store (checked:
        # parse_histories trusts its input) and its items looked up once the batch's
        # columns are parsed.
        partition = self._prepare(store, model)
        cache = partition.history
        reset_l = reset.tolist()
        cached = cache.lookup(users)
        uncached = [u for u, r, c in zip(users, reset_l, cached) if not r and c is None]
        stored = store.get_raw_histories(uncached)
        check_history_parts(list(stored.values()))
        outcome.history_cache_hits = len(users) - int(reset.sum()) - len(uncached)
        outcome.history_cache_misses = len(stored)
        parts, base_rows, missed, evicted_l = [], [], [], []
        for u, (user, r, entry) in enumerate(zip(users, reset_l, cached)):
            if r:
                entry = None
            if entry is None:
                found = None if r else stored.get(user)
                if found is None:
                    entry = _NEW_USER
                else:  # rows filled in below
                    sealed, head = found
                    evicted, head = (-1, _EMPTY_BLOB) if head is None else split_head_record(head)
                    n = count_events(sealed) - max(evicted, 0) + count_events(head)
                    entry = sealed, head, evicted, bytes(4 * n)
                    missed.append(u)
            parts += entry[:2]
            evicted_l.append(entry[2])
            base_rows.append(entry[3])
        n_users = len(users)
        by_user = np.argsort(seg_a, kind="stable")
        counts = np.bincount(seg_a, minlength=n_users)
        new_ptr = np.zeros(n_users + 1, np.int64)
        np.cumsum(counts, out=new_ptr[1:])
        old = parse_histories(parts, tail)
        new_pos += old.id_buf.shape[0] - len(tail)
        stored_head = np.array(evicted_l, dtype=np.int64) >= 0  # -1: no head record stored
        evicted_old = np.maximum(np.array(evicted_l, dtype=np.int64), 0)
        sealed_count = old.ptr[1::2] - old.ptr[:-1:2]
        # The histories without their evicted events: ``visible`` picks their rows of the
        # parsed columns (None: all of them), gathered here only for the merge's keys.
        old_ptr, visible = visible_events(old.ptr, evicted_old)
        old = old._replace(ptr=old_ptr)
        old_t, old_h = (old.times, old.hashes) if visible is None else (old.times[visible], old.hashes[visible])
        new_t = times[by_user]
        new_h = hashes[by_user]
        ptr, source, added, duplicates, evicted = merge_new_events(
            old_ptr, old_t, old_h, new_ptr, new_t, new_h, self.config.history_cap)
        outcome.duplicates = int(duplicates.sum())
        outcome.evicted = int(evicted.sum())
        outcome.applied = len(seg_a) - outcome.duplicates
        fresh = ~reset & (old.counts == 0)
        deleted = reset & (counts == 0)
        changed = ((added > 0) | reset | (evicted > 0)) & ~deleted
        deletes = [users[u] for u in np.flatnonzero(deleted).tolist()]
        # Where a head is enough: the history still starts with what its sealed part keeps.
        head_from, head_evicted = plan_history_writes(
            ptr, source, old.ptr, sealed_count - evicted_old, evicted_old,
            reset | (sealed_count == 0), HEAD_MIN_EVENTS)
        head_skip = np.where(head_from >= 0, head_from - ptr[:-1], -1)
        # The changed users' merged histories: every column picked by ``source`` at once.
        if not changed.all():
            merged_counts = np.diff(ptr)
            source = source[np.repeat(changed, merged_counts)]
            ptr = np.zeros(int(changed.sum()) + 1, np.int64)
            np.cumsum(merged_counts[changed], out=ptr[1:])
        changed_idx = np.flatnonzero(changed)
        changed_users = [users[u] for u in changed_idx.tolist()]
        table = model.item_table
        new_pos, new_len = new_pos[by_user], new_len[by_user]
        base_rows.append(table.rows(old.id_buf, new_pos, new_len).astype("=i4").tobytes())
        all_rows = np.frombuffer(b"".join(base_rows), dtype="=i4")
        if missed:
            all_rows = all_rows.copy()
            events = row_entries(old_ptr, missed)
            parsed = events if visible is None else visible[events]
            all_rows[events] = table.rows(old.id_buf, old.id_pos[parsed], old.id_len[parsed])
        new = HistoryColumns(new_ptr, weights.astype(np.float32)[by_user], new_t, new_h, new_pos, new_len,
                             old.id_buf)
        merged, rows = take_merged(source, old, visible, new, all_rows)
        merged = merged._replace(ptr=ptr)
        # Of the batch's new events kept in the histories (not duplicates, not capped away),
        # those on items the model does not know; the fold-in counts the unknown events of
        # whole histories, so each fold of a user would count its old ones again.
        outcome.unknown_item_events = int(np.count_nonzero(rows[source >= len(old_t)] < 0))
        outcome.applied_items = decoded.items() if items is None else items
        outcome.new_users = int(np.count_nonzero(fresh & (counts > 0)))
        outcome.new_user_events = int(counts[fresh].sum()) if n_users else 0
        # A sample is enough for the cosine-shift histogram; reading every updated user's
        # vector would add a RocksDB multi-get of the whole batch to the hot path.
        now = time.monotonic()
        if changed_users and now - partition.sampled_at >= DRIFT_SAMPLE_INTERVAL_S:
            partition.sampled_at = now
            outcome.previous_vectors = store.get_factors(changed_users[:DRIFT_SAMPLE_USERS], model.version)

        # Step 5: one exact solve for every changed user.
        grams = partition.grams
        hits, misses = (0, 0) if grams is None else (grams.hits, grams.misses)
        started = time.perf_counter()
        vectors, _ = model.fold_rows(merged.ptr, rows, merged.weights, merged.times,
                                     keys=changed_users, grams=grams, serial=serial)
        outcome.fold_seconds = time.perf_counter() - started
        if grams is not None:
            outcome.gram_cache_hits, outcome.gram_cache_misses = grams.hits - hits, grams.misses - misses
        # A changed user has events (a user left with none is deleted): its newest is its last.
        records = dict(zip(changed_users, VectorRecord.many(
            vectors, model.version, np.diff(merged.ptr).tolist(),
            merged.times[merged.ptr[1:] - 1].tolist(), time.time())))
        outcome.users_updated = len(records)
        outcome.vectors = records

        # Step 6: one WriteBatch; the cache takes the very bytes written, once they are.
        # A user gets a new head (its sealed part stays) or its whole history again.
        started = time.perf_counter()
        skip = head_skip[changed_idx]
        as_head = skip >= 0
        blobs = encode_histories(merged, merged.ptr[:-1] + np.where(as_head, skip, 0), merged.ptr[1:],
                                 np.where(as_head, head_evicted[changed_idx], -1))
        whole, heads, headless, entries = {}, {}, [], {}
        rows_mem = rows.tobytes()
        bounds = (4 * merged.ptr).tolist()
        no_head = (~stored_head & ~reset)[changed_idx].tolist()
        for j, (user, u, blob, head_only, evicted) in enumerate(zip(
                changed_users, changed_idx.tolist(), blobs, as_head.tolist(),
                head_evicted[changed_idx].tolist())):
            if head_only:
                heads[user] = blob
                entries[user] = (parts[2 * u], split_head_record(blob)[1], evicted,
                                 rows_mem[bounds[j]:bounds[j + 1]])
            else:
                whole[user] = blob
                entries[user] = (blob, _EMPTY_BLOB, -1, rows_mem[bounds[j]:bounds[j + 1]])
                if no_head[j]:
                    headless.append(user)
        outcome.heads_written = len(heads)
        outcome.outbox = store.commit_batch(whole, records, deletes, outcome.last_offset,
                                            model_version=model.version, heads=heads,
                                            headless=frozenset(headless))
        outcome.write_seconds = time.perf_counter() - started
        cache.committed(entries, deletes)
        return outcome

    @staticmethod
    def _columns(decoded: list, outcome: BatchOutcome) -> tuple[list, ...]:
        """Step 3 event by event, for batches with forgets (or rejections)."""
        segment: dict[str, int] = {}
        users: list[str] = []
        forget_at: list[int] = []  # per user: events before this position are forgotten
        seg, items, weights, times, hashes = [], [], [], [], []
        for event in decoded:
            if type(event) is Rejected:
                continue
            s = segment.get(event.user)
            if s is None:
                s = segment[event.user] = len(users)
                users.append(event.user)
                forget_at.append(-1)
            if type(event) is Forget:
                forget_at[s] = len(seg)
                outcome.forgotten += 1
                continue
            seg.append(s)
            items.append(event.item)
            weights.append(event.weight)
            times.append(event.ts)
            hashes.append(event.event_id_hash)
        return users, forget_at, seg, items, weights, times, hashes

    def _prepare(self, store: PartitionStore, model: LoadedModel) -> "_Partition":
        """The store's caches for ``model``, made when missing (or made for another model).
        Both memory budgets are shared by the stores this processor serves: the history
        cache's bound follows their number at every batch; a normal-equation cache, whose
        slab is sized once, is made again when it holds more than its share (as the first
        partitions of a new assignment arrive). An entry of either holds what it was built
        from, so neither needs invalidating."""
        partition = self._partitions.get(store)
        if partition is None:
            partition = self._partitions[store] = _Partition()
        share = len(self._partitions)
        if partition.history is None or partition.history.model is not model:
            partition.history = HistoryCache(model, self.cache_events)
        partition.history.max_events = self.cache_events // share
        budget = self.config.gram_cache_bytes // share
        if partition.grams_model is not model or partition.grams_budget > budget:
            partition.grams = model.gram_cache(budget)
            partition.grams_model, partition.grams_budget = model, budget
        return partition

    def gram_cache(self, store: PartitionStore) -> GramCache | None:
        """The store's normal-equation cache (None before its first batch or without one)."""
        partition = self._partitions.get(store)
        return None if partition is None else partition.grams

    def gram_cache_counts(self) -> tuple[int, int, int, int]:
        """(hits, misses, entries, capacity) of the stores' normal-equation caches, summed
        (all zero before the first fold or without them)."""
        caches = [p.grams for p in list(self._partitions.values()) if p.grams is not None]
        return (sum(g.hits for g in caches), sum(g.misses for g in caches), sum(len(g) for g in caches),
                sum(g.capacity for g in caches))

    def cache_sizes(self) -> tuple[int, int, int, int]:
        """(events, capacity in events) of the stores' history caches and (entries,
        capacity in entries) of their normal-equation caches, summed over the stores (call
        while no batch is applied)."""
        _, _, entries, capacity = self.gram_cache_counts()
        events = sum(p.history.events for p in list(self._partitions.values()) if p.history is not None)
        return events, self.cache_events, entries, capacity

    def forget(self, store: PartitionStore) -> None:
        """Drop what is cached for ``store`` (call when the store is closed)."""
        self._partitions.pop(store, None)


@dataclass(eq=False)
class _Partition:
    """What a processor keeps for one store: its history cache and normal-equation cache
    (each tied to one model), and when drift last sampled its previous vectors."""

    history: "HistoryCache | None" = None
    grams: GramCache | None = None
    grams_model: LoadedModel | None = None
    grams_budget: int = 0
    sampled_at: float = -np.inf


_EMPTY_BLOB = encode_history(UserHistory.empty())
_NEW_USER = (_EMPTY_BLOB, _EMPTY_BLOB, -1, b"")


class HistoryCache:
    """Histories of recently updated users of ONE partition store, with their item indices.

    Holds the very bytes the store committed, the sealed part and the head (entries are
    installed only after the WriteBatch that holds them was written), and each history's
    item rows in the model (native int32 bytes), so a user found here needs neither a
    RocksDB read, nor a validating decode, nor a lookup of every item of its history in the
    model. Bounded by ``max_events`` cached events; the least recently updated users go
    first. Tied to one model: the indices are its rows.
    """

    def __init__(self, model: LoadedModel, max_events: int) -> None:
        self.model = model
        self.max_events = max_events
        # user -> (sealed part, head's history, head's evicted count or -1 when no head
        # record is stored, item rows): bytes objects (and an int), which the garbage
        # collector does not track (a big cache does not slow its passes) and which a
        # batch joins into one buffer without a per-user NumPy call.
        # An OrderedDict: evicting its oldest entry is O(1), where a dict's first key after
        # many deletions costs a scan over the deleted slots.
        self._entries: OrderedDict[str, tuple[bytes, bytes, int, bytes]] = OrderedDict()
        self._events = 0

    def __contains__(self, user: str) -> bool:
        return user in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def events(self) -> int:
        """What the cache holds against ``max_events``: its events, plus
        ``ENTRY_OVERHEAD_EVENTS`` per user."""
        return self._events

    def get(self, user: str) -> tuple[bytes, bytes, int, bytes] | None:
        """``(sealed part, head's history, head's evicted count, item rows)``: the user's
        stored history parts (an empty head history and -1 when no head record is stored)
        and the model row of each event of its history (native int32 bytes); None when
        the user is not cached."""
        return self._entries.get(user)

    def lookup(self, users: Sequence[str]) -> list:
        """:meth:`get` of each of ``users``."""
        return list(map(self._entries.get, users))

    def committed(self, written: dict[str, tuple[bytes, bytes, int, bytes]],
                  deletes: list[str]) -> None:
        """Install what a batch wrote, ``user -> entry`` as :meth:`get` returns it (call
        only after its WriteBatch was written)."""
        entries = self._entries
        pop = entries.pop
        # Dropped, then (re-)inserted last: the order is update order.
        old = [pop(user, None) for user in deletes] + [pop(user, None) for user in written]
        old = [entry for entry in old if entry is not None]
        entries.update(written)
        self._events += (sum(len(entry[3]) for entry in written.values())
                         - sum(len(entry[3]) for entry in old)) // 4 \
            + ENTRY_OVERHEAD_EVENTS * (len(written) - len(old))
        while self._events > self.max_events and entries:
            _, (_, _, _, user_rows) = entries.popitem(last=False)
            self._events -= len(user_rows) // 4 + ENTRY_OVERHEAD_EVENTS
