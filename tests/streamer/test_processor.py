"""PartitionProcessor on a real store, without Kafka: the history cache changes nothing."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from factors import gram_cache
from streamer.config import ProcessingConfig
from streamer.events import InteractionColumns
from streamer.model import LoadedModel
from streamer import processor as processor_module
from streamer.processor import PartitionProcessor, RawRecord
from streamer.registry import ModelRegistry
from streamer.store import PartitionStore


def records(synthetic_log, count: int, seed: int) -> list[RawRecord]:
    """Events of the log with the awkward cases mixed in: re-sent event ids, late events,
    forgets (tombstones) and a few malformed records, at offsets 0..n-1."""
    rng = np.random.default_rng(seed)
    users, items = synthetic_log.user_ids.ids, synthetic_log.item_ids.ids
    rows = rng.integers(0, len(synthetic_log), count)
    out = []
    for offset, row in enumerate(rows.tolist()):
        user = users[synthetic_log.users[row]]
        kind = rng.random()
        if kind < 0.03:
            out.append(RawRecord(offset, user.encode(), None, 1000 + offset))
            continue
        if kind < 0.04:
            out.append(RawRecord(offset, user.encode(), b"{not json", 1000 + offset))
            continue
        ts = float(synthetic_log.timestamps[row]) + (-5e5 if kind < 0.1 else 0.0)  # some late
        doc = {"user": user, "item": items[synthetic_log.items[row]], "ts": ts,
               "weight": float(synthetic_log.weights[row])}
        if kind > 0.5:
            doc["event_id"] = f"e{row % 500}"  # ids repeat: duplicates
        out.append(RawRecord(offset, user.encode(), json.dumps(doc).encode(), 1000 + offset))
    return out


def run(processor, store, model, recs, batch: int) -> list:
    outcomes = []
    for start in range(0, len(recs), batch):
        decoded, outcome = processor.decode(store, recs[start:start + batch])
        outcomes.append(processor.apply(store, decoded, outcome, model))
    return outcomes


def contents(store) -> tuple[dict, dict]:
    histories = {u: h for u, h in store.iter_users()}
    vectors = {u: (r.vector.tobytes(), r.n_interactions, r.last_event_time) for u, r in store.iter_vectors()}
    return histories, vectors


@pytest.mark.parametrize("cap", [4, 1000])
def test_cached_histories_give_the_same_state_as_reading_the_store(tmp_path, synthetic_log,
                                                                   trained_registry, cap):
    model = LoadedModel(ModelRegistry(trained_registry).load())
    config = ProcessingConfig(history_cap=cap)
    recs = records(synthetic_log, 3000, seed=cap)
    cached, uncached = PartitionProcessor(config), PartitionProcessor(config, cache_events=0)
    with PartitionStore.open(tmp_path / "a", "t", 0) as a, PartitionStore.open(tmp_path / "b", "t", 0) as b:
        out_a = run(cached, a, model, recs, batch=97)
        out_b = run(uncached, b, model, recs, batch=97)
        assert contents(a) == contents(b)
        assert len(cached._partitions[a].history) > 0 and len(uncached._partitions[b].history) == 0
        for x, y in zip(out_a, out_b):
            assert (x.applied, x.duplicates, x.evicted, x.forgotten, x.users_updated,
                    x.unknown_item_events, len(x.rejected)) == \
                   (y.applied, y.duplicates, y.evicted, y.forgotten, y.users_updated,
                    y.unknown_item_events, len(y.rejected))
        assert sum(o.duplicates for o in out_a) > 0 and sum(o.forgotten for o in out_a) > 0

        # Every stored vector is the reference fold of the stored history (per-item lookups).
        histories, vectors = contents(a)
        users = sorted(histories)
        reference, _ = model.fold([histories[u] for u in users])
        for row, user in enumerate(users):
            assert vectors[user][0] == reference[row].tobytes()

        # Cached entries are bytes of their own: a view would keep a whole batch's arrays alive.
        for entry in cached._partitions[a].history._entries.values():
            assert all(type(part) is bytes for part in entry if not isinstance(part, int))

        cached.forget(a)
        assert a not in cached._partitions


def test_the_cache_keeps_to_its_bound_and_is_tied_to_one_model(tmp_path, synthetic_log,
                                                               trained_registry):
    registry = ModelRegistry(trained_registry)
    model = LoadedModel(registry.load())
    processor = PartitionProcessor(ProcessingConfig(), cache_events=200)
    recs = records(synthetic_log, 1510, seed=1)
    with PartitionStore.open(tmp_path, "t", 0) as store:
        run(processor, store, model, recs[:1500], batch=100)
        cache = processor._partitions[store].history
        assert 0 < cache._events <= 200
        other = LoadedModel(registry.load())  # same version, another object: indices redone
        run(processor, store, other, recs[1500:], batch=10)
        assert processor._partitions[store].history is not cache
        assert processor._partitions[store].history.model is other


def test_drift_samples_previous_vectors_at_most_once_per_interval_per_partition(
        tmp_path, synthetic_log, trained_registry, monkeypatch):
    model = LoadedModel(ModelRegistry(trained_registry).load())
    processor = PartitionProcessor(ProcessingConfig())
    users, items = synthetic_log.user_ids.ids[:40], synthetic_log.item_ids.ids
    recs = [RawRecord(offset, users[offset % 40].encode(), json.dumps(
        {"user": users[offset % 40], "item": items[offset % len(items)]}).encode(), 1000 + offset)
        for offset in range(1100)]
    with PartitionStore.open(tmp_path, "t", 0) as first, PartitionStore.open(tmp_path, "t", 1) as second:
        run(processor, first, model, recs[:600], batch=200)  # the users now have vectors
        run(processor, second, model, recs[:600], batch=200)
        now = processor_module.time.monotonic() + 10.0
        clock = iter([now, now + 0.1, now + 0.2, now + 0.26, now + 0.27])
        monkeypatch.setattr(processor_module.time, "monotonic", lambda: next(clock))
        sampled = [run(processor, store, model, recs[start:start + 100], batch=100)[0].previous_vectors
                   for store, start in [(first, 600), (first, 700), (second, 600), (first, 800),
                                        (second, 700)]]
    # 0.25 s apart per partition: the first store at +0 and +0.26, the second at +0.2.
    assert [len(s) > 0 for s in sampled] == [True, False, True, True, False]
    assert all(len(s) <= processor_module.DRIFT_SAMPLE_USERS for s in sampled)
    for vectors in sampled:
        for vector in vectors.values():
            assert vector.shape == (model.factors,) and np.isfinite(vector).all()


@pytest.mark.parametrize("pool", [False, True], ids=["calling-thread", "thread-pool"])
def test_cached_normal_equations_give_the_vectors_of_a_full_solve(tmp_path, synthetic_log,
                                                                    trained_registry, pool,
                                                                    monkeypatch):
    # Small batches: the same long histories come back batch after batch, as in a live
    # stream, so most of their solves are updates of cached normal equations (k = 8 here:
    # every history of more than 8 distinct items is cached). Late events, duplicates,
    # forgets and the cap's evictions all reach the updates. ``pool``: every batch goes to
    # numba's thread pool, as a draining consumer's batches of thousands of users do.
    if pool:
        monkeypatch.setattr(gram_cache, "SERIAL_MAX_ROWS", 0)
    model = LoadedModel(ModelRegistry(trained_registry).load())
    recs = records(synthetic_log, 3000, seed=7)
    with_grams = PartitionProcessor(ProcessingConfig(history_cap=40))
    without = PartitionProcessor(ProcessingConfig(history_cap=40, gram_cache_bytes=0))
    with PartitionStore.open(tmp_path / "a", "t", 0) as a, PartitionStore.open(tmp_path / "b", "t", 0) as b:
        run(with_grams, a, model, recs, batch=23)
        run(without, b, model, recs, batch=23)
        grams = with_grams.gram_cache(a)
        assert grams.hits > 200 and grams.misses > 0 and without.gram_cache(b) is None
        histories_a, vectors_a = contents(a)
        histories_b, vectors_b = contents(b)
        assert histories_a == histories_b and vectors_a.keys() == vectors_b.keys()
        for user, (vector, n, last) in vectors_a.items():
            assert (n, last) == vectors_b[user][1:]
            np.testing.assert_allclose(np.frombuffer(vector, np.float32),
                                       np.frombuffer(vectors_b[user][0], np.float32),
                                       rtol=1e-5, atol=1e-6)
        # A new model object gets a cache of its own: entries hold the old model's G and Y.
        other = LoadedModel(ModelRegistry(trained_registry).load())
        more = [r._replace(offset=r.offset + len(recs)) for r in records(synthetic_log, 30, seed=8)]
        run(with_grams, a, other, more, batch=30)
        assert with_grams.gram_cache(a) is not grams and with_grams.gram_cache(a).solver is other.solver


def _partitioned(recs: list[RawRecord], partitions: int) -> list[list[RawRecord]]:
    """``recs`` split by key as a producer would, each partition's offsets from 0."""
    parts = [[] for _ in range(partitions)]
    for r in recs:
        part = parts[zlib.crc32(r.key) % partitions]
        part.append(r._replace(offset=len(part)))
    return parts


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_partitions_applied_side_by_side_leave_the_state_of_one_at_a_time(
        tmp_path, synthetic_log, trained_registry, threads, monkeypatch):
    # Small and large batches: the large ones would use numba's thread pool on one thread
    # (SERIAL_MAX_ROWS lowered), side by side they solve on their own threads.
    monkeypatch.setattr(gram_cache, "SERIAL_MAX_ROWS", 20)
    model = LoadedModel(ModelRegistry(trained_registry).load())
    parts = _partitioned(records(synthetic_log, 2400, seed=12), 4)
    config = ProcessingConfig(history_cap=40, apply_threads=threads)
    side_by_side, one_by_one = PartitionProcessor(config), PartitionProcessor(ProcessingConfig(history_cap=40))
    states = []
    for processor, name in [(side_by_side, "a"), (one_by_one, "b")]:
        stores = [PartitionStore.open(tmp_path / name, "t", p) for p in range(4)]
        try:
            done = [0] * 4
            for size in [5, 60, 7, 200, 3, 400]:
                work = []
                for p, store in enumerate(stores):
                    decoded, outcome = processor.decode(store, parts[p][done[p]:done[p] + size])
                    work.append((store, decoded, outcome, model))
                    done[p] += size
                if processor is side_by_side:
                    outcomes = processor.apply_many(work)
                else:
                    outcomes = [processor.apply(*item) for item in work]
                assert [o.last_offset for o in outcomes] == [min(d, len(part)) - 1 for d, part in zip(done, parts)]
            states.append([contents(store) for store in stores])
            # Each store has a normal-equation cache of its own, a quarter of the budget.
            assert {processor.gram_cache(store).capacity for store in stores} == {
                config.gram_cache_bytes // 4 // gram_cache.GramCache.slot_bytes(model.factors)}
        finally:
            for store in stores:
                store.close()
        processor.close()
    assert states[0] == states[1]  # histories, and vectors bit for bit


def test_a_failing_partition_fails_the_turn_after_the_others_are_written(
        tmp_path, synthetic_log, trained_registry):
    from streamer.errors import StoreFormatError
    from streamer.store import HISTORIES

    model = LoadedModel(ModelRegistry(trained_registry).load())
    parts = _partitioned([r for r in records(synthetic_log, 1200, seed=13) if r.value and r.value.startswith(b"{")], 3)
    processor = PartitionProcessor(ProcessingConfig(apply_threads=2))
    stores = [PartitionStore.open(tmp_path, "t", p) for p in range(3)]
    try:
        processor.apply_many([(store, *processor.decode(store, part[:100]), model)
                              for store, part in zip(stores, parts)])
        damaged = parts[0][100]  # its user's stored history loses a byte
        cf = stores[0]._live().cf[HISTORIES]
        cf[damaged.key] = cf[damaged.key][:-1]
        processor.forget(stores[0])  # nothing cached: the next batch reads the store
        work = [(store, *processor.decode(store, part[100:101 if p == 0 else 200]), model)
                for p, (store, part) in enumerate(zip(stores, parts))]
        with pytest.raises(StoreFormatError):
            processor.apply_many(work)
        assert [store.applied_offset() for store in stores] == [99, 199, 199]
    finally:
        processor.close()
        for store in stores:
            store.close()


def test_an_interrupted_turn_returns_only_once_every_partition_is_written(
        tmp_path, synthetic_log, trained_registry, monkeypatch):
    import threading

    model = LoadedModel(ModelRegistry(trained_registry).load())
    parts = _partitioned([r for r in records(synthetic_log, 600, seed=14) if r.value and r.value.startswith(b"{")], 3)
    processor = PartitionProcessor(ProcessingConfig(apply_threads=2))
    released = threading.Event()
    apply = processor.apply

    def slow_apply(*args, **kwargs):
        released.wait(10)
        return apply(*args, **kwargs)
    processor.apply = slow_apply
    waits, real_wait = [], processor_module.wait

    def interrupted_wait(futures):  # Ctrl-C while the turn waits for its batches
        waits.append(len(futures))
        if len(waits) == 1:
            threading.Timer(0.3, released.set).start()
            raise KeyboardInterrupt
        return real_wait(futures)
    monkeypatch.setattr(processor_module, "wait", interrupted_wait)
    stores = [PartitionStore.open(tmp_path, "t", p) for p in range(3)]
    try:
        with pytest.raises(KeyboardInterrupt):
            processor.apply_many([(store, *processor.decode(store, part[:50]), model)
                                  for store, part in zip(stores, parts)])
        assert [store.applied_offset() for store in stores] == [49, 49, 49]
    finally:
        released.set()
        processor.close()
        for store in stores:
            store.close()


def _short_sealed(key, sealed, head):
    return {key: sealed[:-1]}


def _head_evicts_too_many(key, sealed, head):
    return {b"\xff" + key: head[:1] + (10**6).to_bytes(4, "little") + head[5:]}


def _head_without_sealed(key, sealed, head):
    return {key: None}


@pytest.mark.parametrize("damage, message", [
    (_short_sealed, "item ids need"),
    (_head_evicts_too_many, "evicts 1000000 events"),
    (_head_without_sealed, "head without a sealed part"),
])
def test_a_damaged_stored_history_stops_the_batch_before_anything_is_written(
        tmp_path, synthetic_log, trained_registry, damage, message):
    from streamer.errors import StoreFormatError
    from streamer.store import HISTORIES

    model = LoadedModel(ModelRegistry(trained_registry).load())
    recs = [r for r in records(synthetic_log, 400, seed=9) if r.value and r.value.startswith(b"{\"")]
    recs = [r._replace(offset=i) for i, r in enumerate(recs)]
    with PartitionStore.open(tmp_path, "t", 0) as store:
        run(PartitionProcessor(ProcessingConfig()), store, model, recs, batch=50)
        stored = store.get_raw_histories({r.key.decode() for r in recs})
        user = min(u for u, (sealed, head) in stored.items() if head is not None)
        sealed, head = stored[user]
        event = {"user": user, "item": synthetic_log.item_ids.ids[0], "ts": 2e9}
        next_event = RawRecord(len(recs), user.encode(), json.dumps(event).encode(), 0)
        cf = store._live().cf[HISTORIES]
        for key, value in damage(user.encode(), sealed, head).items():
            if value is None:
                del cf[key]
            else:
                cf[key] = value
        applied = store.applied_offset()
        fresh = PartitionProcessor(ProcessingConfig())  # nothing cached: reads the store
        with pytest.raises(StoreFormatError, match=message):
            run(fresh, store, model, [next_event], batch=1)
        assert store.applied_offset() == applied


@pytest.mark.parametrize("cap", [4, 40, 1000])
def test_histories_written_as_heads_equal_appending_each_batch(tmp_path, synthetic_log, trained_registry, cap):
    """Small batches, so most updates write a head only: the stored histories equal an
    independent replay with UserHistory.append (a forget empties the history), through
    the cache and, after a restart, through the store."""
    from streamer.codec import UserHistory
    from streamer.events import EventDecoder, Forget, Interaction

    model = LoadedModel(ModelRegistry(trained_registry).load())
    config = ProcessingConfig(history_cap=cap)
    recs = records(synthetic_log, 2500, seed=cap + 1)
    batch = 23
    decoder = EventDecoder(config)
    expected: dict[str, UserHistory] = {}
    for start in range(0, len(recs), batch):
        pending: dict[str, list] = {}
        for r in recs[start:start + batch]:
            event = decoder.decode(r.key, r.value, r.offset, r.timestamp)
            if isinstance(event, Forget):
                expected.pop(event.user, None)
                pending[event.user] = []
            elif isinstance(event, Interaction):
                pending.setdefault(event.user, []).append(event)
        for user, events in pending.items():
            if events:
                base = expected.get(user, UserHistory.empty())
                expected[user] = base.append([e.item for e in events], [e.weight for e in events],
                                             [e.ts for e in events], [e.event_id_hash for e in events],
                                             max_events=cap).history
    half = len(recs) // 2 // batch * batch
    with PartitionStore.open(tmp_path, "t", 0) as store:
        outcomes = run(PartitionProcessor(config), store, model, recs[:half], batch=batch)
    with PartitionStore.open(tmp_path, "t", 0) as store:  # a new process: nothing cached
        outcomes += run(PartitionProcessor(config), store, model, recs[half:], batch=batch)
        histories, vectors = contents(store)
        raw = store.get_raw_histories(list(histories))
    assert histories == expected
    heads = sum(o.heads_written for o in outcomes)
    updated = sum(o.users_updated for o in outcomes)
    assert 0.1 * updated < heads < updated  # many, not all, updates wrote a head only
    assert any(head is not None for _, head in raw.values())
    users = sorted(histories)
    reference, _ = model.fold([histories[u] for u in users])
    for row, user in enumerate(users):
        assert vectors[user][0] == reference[row].tobytes()


def test_batches_in_columns_give_the_same_state_as_decoded_records(tmp_path, synthetic_log,
                                                                   trained_registry):
    """Clean batches reach apply as InteractionColumns; decoded record by record instead
    (the path of batches with forgets or rejections) they give the same store and outcomes."""
    model = LoadedModel(ModelRegistry(trained_registry).load())
    config = ProcessingConfig(history_cap=50)
    recs = [r for r in records(synthetic_log, 3000, seed=5)
            if r.value is not None and r.value.startswith(b'{"')]
    recs = [r._replace(offset=i) for i, r in enumerate(recs)]
    columns, listed = PartitionProcessor(config), PartitionProcessor(config)
    decoder = listed.decoder
    listed.decoder.decode_batch = lambda keys, values, offsets, times: [
        decoder.decode(*args) for args in zip(keys, values, offsets, times)]
    assert isinstance(columns.decode(_Store(-1), recs[:50])[0], InteractionColumns)
    with PartitionStore.open(tmp_path / "a", "t", 0) as a, PartitionStore.open(tmp_path / "b", "t", 0) as b:
        out_a = run(columns, a, model, recs, batch=211)
        out_b = run(listed, b, model, recs, batch=211)
        assert contents(a) == contents(b)
        for x, y in zip(out_a, out_b):
            assert (x.applied, x.duplicates, x.evicted, x.users_updated, x.unknown_item_events,
                    x.applied_items, x.new_users, x.new_user_events, x.last_offset) == \
                   (y.applied, y.duplicates, y.evicted, y.users_updated, y.unknown_item_events,
                    y.applied_items, y.new_users, y.new_user_events, y.last_offset)
        assert sum(o.duplicates for o in out_a) > 0 and sum(o.evicted for o in out_a) > 0


@pytest.mark.parametrize("columns", [True, False])
def test_unknown_items_are_counted_once_per_new_event_kept(tmp_path, trained_registry, columns):
    """An event on an item the model does not know counts in the batch that applies it,
    not again each time its user is folded; a re-sent one (same event id) not at all, nor
    one the history cap drops at once. Both decode paths (a forget sends the batch down
    the record-by-record one)."""
    model = LoadedModel(ModelRegistry(trained_registry).load())
    known = list(model.item_index)[:3]

    def event(offset, user, item, ts, event_id=None):
        doc = {"user": user, "item": item, "ts": ts}
        if event_id:
            doc["event_id"] = event_id
        return RawRecord(offset, user.encode(), json.dumps(doc).encode(), 1000 + offset)

    batches = [
        [event(0, "u1", known[0], 10.0), event(1, "u1", "no-such-item", 11.0, "x1"),
         event(2, "u2", "no-such-item", 12.0)],
        [event(3, "u1", known[1], 13.0), event(4, "u1", "no-such-item", 11.0, "x1"),  # re-sent
         event(5, "u2", known[2], 14.0)],
        [event(6, "u1", "no-such-item", 15.0), event(7, "u3", "no-such-item", 1.0)],
        [event(9, "u2", "no-such-item", 0.5)],  # older than the cap keeps: dropped at once
    ]
    if not columns:
        batches[2].append(RawRecord(8, b"u4", None, 1008))  # a forget: decoded record by record
    with PartitionStore.open(tmp_path / "s", "t", 0) as store:
        processor = PartitionProcessor(ProcessingConfig(history_cap=2))
        outcomes = []
        for batch in batches:
            decoded, outcome = processor.decode(store, batch)
            assert isinstance(decoded, InteractionColumns) == (columns or batch is not batches[2])
            outcomes.append(processor.apply(store, decoded, outcome, model))
    assert [o.unknown_item_events for o in outcomes] == [2, 0, 2, 0]
    assert [(o.applied, o.duplicates, o.evicted) for o in outcomes] == [(3, 0, 0), (2, 1, 1), (2, 0, 1), (1, 0, 1)]


class _Store:
    """Just an applied offset, for decode()."""

    def __init__(self, applied: int) -> None:
        self._applied = applied

    def applied_offset(self) -> int:
        return self._applied


def test_cache_counts_say_where_each_stored_history_came_from(tmp_path, synthetic_log, trained_registry):
    # No forgets or malformed records: every user of a batch either has a stored history
    # (then it comes from the history cache or from RocksDB) or is new.
    recs = [r for r in records(synthetic_log, 2500, seed=3) if r.value not in (None, b"{not json")]
    recs = [r._replace(offset=i) for i, r in enumerate(recs)]
    model = LoadedModel(ModelRegistry(trained_registry).load())
    cached = PartitionProcessor(ProcessingConfig(history_cap=40), cache_events=600)
    uncached = PartitionProcessor(ProcessingConfig(history_cap=40, gram_cache_bytes=0), cache_events=0)
    with PartitionStore.open(tmp_path / "a", "t", 0) as a, PartitionStore.open(tmp_path / "b", "t", 0) as b:
        assert cached.cache_sizes() == (0, 600, 0, 0)
        out_a, out_b = [], []
        for start in range(0, len(recs), 50):
            batch = recs[start:start + 50]
            users = {r.key.decode() for r in batch}
            stored = users & {u for u, _ in b.iter_users()}
            out_a += run(cached, a, model, batch, batch=50)
            out_b += run(uncached, b, model, batch, batch=50)
            x, y = out_a[-1], out_b[-1]
            assert (y.history_cache_hits, y.history_cache_misses) == (0, len(stored))
            assert x.history_cache_hits + x.history_cache_misses == len(stored)
            assert (y.gram_cache_hits, y.gram_cache_misses) == (0, 0)
        hits = sum(o.history_cache_hits for o in out_a)
        misses = sum(o.history_cache_misses for o in out_a)
        assert hits > 0 and misses > 0  # 600 events do not hold every history
        grams = cached.gram_cache(a)
        assert sum(o.gram_cache_hits for o in out_a) == grams.hits > 0
        assert sum(o.gram_cache_misses for o in out_a) == grams.misses > 0
        history = cached._partitions[a].history
        assert cached.cache_sizes() == (history._events, 600, len(grams), grams.capacity)
        assert 0 < history.events <= 600
        cached.forget(a)
        assert cached.cache_sizes() == (0, 600, 0, 0)
