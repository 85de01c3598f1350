"""The RocksDB state store, on real databases under tmp_path."""

import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Options, Rdict

from streamer import codec
from streamer.codec import UserHistory, VectorRecord
from streamer.config import StoreConfig
from streamer.errors import (
    ConfigError,
    StaleOffsetError,
    StateStoreError,
    StoreClosedError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
)
from streamer.reader import StoreReader
from streamer.store import COLUMN_FAMILIES, PartitionStore, partition_dir_name

TOPIC = "interactions"


def history(*items: str, t0: float = 100.0) -> UserHistory:
    times = [t0 + i for i in range(len(items))]
    return UserHistory.empty().append(list(items), [1.0] * len(items), times, max_events=100).history


def record(seed: float, processed_at: float = 1.0) -> VectorRecord:
    return VectorRecord(np.full(4, seed, np.float32), "v000001", 1, 100.0, processed_at)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_store(state_dir):
    """Factory: ``make_store(partition=0, **open_kwargs)``; every store is closed at teardown."""
    opened = []

    def make(partition: int = 0, **kwargs) -> PartitionStore:
        store = PartitionStore.open(state_dir, TOPIC, partition, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def raw_db(path: Path) -> Rdict:
    """The partition database opened directly, to tamper with it."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    return Rdict(str(path), opts, column_families={n: Options(raw_mode=True) for n in COLUMN_FAMILIES})


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- batches


def test_commit_batch_writes_state_outbox_and_offset(make_store):
    store = make_store()
    assert store.applied_offset() == -1 and store.model_version() is None
    entries = store.commit_batch({"u1": history("a", "b"), "u2": history("c")}, {"u1": record(1.0)}, [], 7, "v000001")

    assert store.applied_offset() == 7 and store.model_version() == "v000001"
    assert store.get_histories(["u1", "u2", "nobody"]) == {"u1": history("a", "b"), "u2": history("c")}
    assert store.get_vectors(["u1", "u2"]) == {"u1": record(1.0)}
    assert [(e.offset, e.user_id, e.record) for e in entries] == [(7, "u1", record(1.0))]
    assert list(store.iter_outbox()) == entries
    assert dict(store.iter_users()) == {"u1": history("a", "b"), "u2": history("c")}
    assert dict(store.iter_vectors()) == {"u1": record(1.0)}


def test_reopen_after_close_keeps_state(make_store, state_dir):
    with PartitionStore.open(state_dir, TOPIC, 0) as store:
        store.commit_batch({"ü-1": history("x")}, {"ü-1": record(2.0)}, [], 3, "v000002")
    with pytest.raises(StoreClosedError):
        store.applied_offset()

    again = make_store(create=False)
    assert again.applied_offset() == 3 and again.model_version() == "v000002"
    assert again.get_histories(["ü-1"]) == {"ü-1": history("x")}
    assert [e.user_id for e in again.iter_outbox()] == ["ü-1"]


def test_offset_must_advance(make_store, state_dir):
    store = make_store()
    store.commit_batch({"u": history("a")}, {}, [], 5)
    for stale in (5, 4, -1):
        with pytest.raises(StaleOffsetError, match=f"must be > applied offset 5, got {stale}"):
            store.commit_batch({"u": history("zzz")}, {}, [], stale)
    assert store.get_histories(["u"]) == {"u": history("a")}
    store.close()

    reopened = make_store()
    with pytest.raises(StaleOffsetError):
        reopened.commit_batch({}, {}, [], 5)
    reopened.commit_batch({}, {}, [], 6)  # a batch whose events were all skipped still advances
    assert reopened.applied_offset() == 6


def test_delete_writes_tombstones(make_store):
    store = make_store()
    store.commit_batch({"u1": history("a"), "u2": history("b")}, {"u1": record(1.0), "u2": record(2.0)}, [], 1)
    entries = store.commit_batch({}, {}, ["u1", "ghost"], 2)

    assert store.get_histories(["u1", "u2"]).keys() == {"u2"}
    assert store.get_vectors(["u1", "u2"]).keys() == {"u2"}
    assert [(e.offset, e.user_id, e.record) for e in entries] == [(2, "u1", None), (2, "ghost", None)]
    # Pending entries are published with each user's state now: u1 is gone since batch 1.
    assert [(e.offset, e.user_id, e.record) for e in store.iter_outbox()] == [
        (1, "u1", None), (1, "u2", record(2.0)), (2, "u1", None), (2, "ghost", None)]
    with pytest.raises(StateStoreError, match=r"both updated and deleted.*\['u2'\]"):
        store.commit_batch({"u2": history("c")}, {}, ["u2"], 3)
    assert store.applied_offset() == 2


def test_ack_outbox_deletes_only_acknowledged_entries(make_store):
    store = make_store()
    first = store.commit_batch({}, {"a": record(1.0), "b": record(2.0)}, [], 10)
    second = store.commit_batch({}, {"a": record(3.0)}, [], 11)
    store.ack_outbox([])
    store.ack_outbox(e.key for e in first)
    assert list(store.iter_outbox()) == second
    store.close()
    assert list(make_store().iter_outbox()) == second


def test_failed_batch_leaves_nothing_behind(make_store, monkeypatch):
    store = make_store()
    store.commit_batch({"u0": history("a")}, {}, [], 1)

    def broken(record):
        raise RuntimeError("disk full while encoding")

    # Histories are staged before vectors, so this fails halfway through building the batch.
    monkeypatch.setattr(codec, "encode_vector_record", broken)
    with pytest.raises(RuntimeError):
        store.commit_batch({"u0": history("b"), "u1": history("c")}, {"u1": record(1.0)}, [], 2)
    monkeypatch.undo()

    def visible(s):
        return s.applied_offset(), s.get_histories(["u0", "u1"]), list(s.iter_outbox())

    assert visible(store) == (1, {"u0": history("a")}, [])
    store.close()
    assert visible(make_store()) == (1, {"u0": history("a")}, [])


WRITE_THEN_KILL = """
    import os, signal, sys, numpy as np
    from streamer.config import StoreConfig
    from streamer.store import PartitionStore
    from streamer.codec import UserHistory, VectorRecord
    state_dir, sync = sys.argv[1], sys.argv[2] == "sync"
    store = PartitionStore.open(state_dir, "interactions", 0, config=StoreConfig(sync_writes=sync))
    wal = lambda: max((f for f in os.listdir(store.path) if f.endswith(".log")), key=lambda f: os.path.getsize(os.path.join(store.path, f)))
    rec = VectorRecord(np.ones(8), "v000001", 1, 1.0, 2.0)
    hist = UserHistory.empty().append(["i"], [1.0], [1.0], max_events=10).history
    store.commit_batch({"a": hist}, {"a": rec}, [], 1)
    size_1 = os.path.getsize(os.path.join(store.path, wal()))
    store.commit_batch({f"b{i}": hist for i in range(50)}, {f"b{i}": rec for i in range(50)}, [], 2)
    print(wal(), size_1, os.path.getsize(os.path.join(store.path, wal())), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("sync", ["sync", "nosync"])
def test_batch_survives_kill_9_after_commit_returns(make_store, state_dir, sync):
    child = run_child(WRITE_THEN_KILL, str(state_dir), sync)
    assert child.returncode == -9, child.stderr
    store = make_store()
    assert store.applied_offset() == 2
    assert len(store.get_vectors([f"b{i}" for i in range(50)])) == 50
    assert len(store.get_histories(["a"])) == 1
    assert len(list(store.iter_outbox())) == 51


def test_torn_wal_record_drops_the_whole_batch(make_store, state_dir):
    # A crash in the middle of writing batch 2 leaves a torn tail on the WAL; recovery
    # must drop all of batch 2 and keep all of batch 1.
    child = run_child(WRITE_THEN_KILL, str(state_dir), "nosync")
    assert child.returncode == -9, child.stderr
    wal, size_1, size_2 = child.stdout.split()
    with open(state_dir / partition_dir_name(TOPIC, 0) / wal, "r+b") as fh:
        fh.truncate((int(size_1) + int(size_2)) // 2)
    store = make_store()
    assert store.applied_offset() == 1
    assert store.get_vectors(["a", "b0", "b49"]).keys() == {"a"}
    assert store.get_histories(["a", "b0", "b49"]).keys() == {"a"}
    assert [e.user_id for e in store.iter_outbox()] == ["a"]


# ---------------------------------------------------------------- opening


def _hold_store(state_dir: str, ready, release) -> None:
    store = PartitionStore.open(state_dir, TOPIC, 0)
    ready.set()
    release.wait(30)
    store.close()


def test_lock_contention_between_processes(state_dir):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_store, args=(str(state_dir), ready, release))
    holder.start()
    try:
        assert ready.wait(30), "holder process did not open the store"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"LOCK still held.*lock_timeout_s=0.3"):
            PartitionStore.open(state_dir, TOPIC, 0, lock_timeout_s=0.3)
        assert time.monotonic() - started >= 0.3

        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        with PartitionStore.open(state_dir, TOPIC, 0, lock_timeout_s=30) as store:
            assert time.monotonic() - started >= 0.4
            assert store.applied_offset() == -1
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0


def test_second_open_in_same_process_is_locked(make_store):
    make_store()
    with pytest.raises(StoreLockedError):
        make_store(lock_timeout_s=0)


def test_close_releases_lock_even_with_unfinished_iterators(make_store):
    store = make_store()
    store.commit_batch({"a": history("x"), "b": history("y")}, {"a": record(1.0)}, [], 1)
    users, outbox = store.iter_users(), store.iter_outbox()
    next(users)
    next(outbox)
    store.close()
    with pytest.raises(StoreClosedError):
        store.iter_users()
    assert make_store(lock_timeout_s=0).applied_offset() == 1


def test_open_missing_without_create(state_dir):
    with pytest.raises(StoreNotFoundError, match="create=False"):
        PartitionStore.open(state_dir, TOPIC, 9, create=False)
    assert not (state_dir / "interactions-9").exists()


def test_bad_names_and_settings():
    with pytest.raises(ConfigError, match=r"topic must match .*got 'a/b'"):
        partition_dir_name("a/b", 0)
    with pytest.raises(ConfigError, match="partition must be an int >= 0, got -1"):
        partition_dir_name("t", -1)
    with pytest.raises(ConfigError, match="lock_timeout_s must be >= 0, got -1"):
        PartitionStore.open("unused", TOPIC, 0, lock_timeout_s=-1)


def test_format_version_mismatch(make_store, state_dir):
    make_store().close()
    db = raw_db(state_dir / "interactions-0")
    db.get_column_family("meta")[b"format_version"] = (99).to_bytes(4, "little")
    db.close()
    with pytest.raises(StoreFormatError, match=r"format version must be one of \(1, 2\), got 99"):
        make_store()
    with pytest.raises(StoreFormatError, match=r"format version must be one of \(1, 2\), got 99"):
        StoreReader(state_dir)


def test_a_version_1_store_is_read_and_upgraded(make_store, state_dir):
    # Format 1 had no heads: its histories are version-2 histories without one.
    db = raw_db(state_dir / "interactions-0")
    db.get_column_family("meta")[b"format_version"] = (1).to_bytes(4, "little")
    db.get_column_family("histories")[b"u"] = codec.encode_history(history("a", "b"))
    db.close()
    with StoreReader(state_dir) as reader:  # readers accept it as it is
        assert reader.partitions() == ["interactions-0"]
    store = make_store()
    assert store.get_histories(["u"]) == {"u": history("a", "b")}
    store.commit_batch({}, {}, [], 1, heads={"u": codec.encode_history_head(1, history("c", t0=200.0))})
    assert store.get_histories(["u"]) == {"u": parts_history(history("a", "b"), 1, history("c", t0=200.0))}
    store.close()
    db = raw_db(state_dir / "interactions-0")
    assert db.get_column_family("meta")[b"format_version"] == (2).to_bytes(4, "little")
    db.close()


def parts_history(sealed: UserHistory, evicted: int, head: UserHistory) -> UserHistory:
    """The reference join: the sealed events the head does not evict, then the head's."""
    kept = sealed.item_ids[evicted:] + head.item_ids
    return UserHistory(kept, np.concatenate([sealed.weights[evicted:], head.weights]),
                       np.concatenate([sealed.times[evicted:], head.times]),
                       np.concatenate([sealed.event_hashes[evicted:], head.event_hashes]))


def test_heads_extend_the_sealed_part_until_a_whole_history_replaces_both(make_store):
    store = make_store()
    sealed = history("a", "b", "c")
    store.commit_batch({"u": sealed, "w": history("z")}, {}, [], 1)
    head = history("d", "e", t0=200.0)
    store.commit_batch({}, {}, [], 2, heads={"u": codec.encode_history_head(1, head)})
    joined = parts_history(sealed, 1, head)
    assert [i for i in joined.item_ids] == ["b", "c", "d", "e"]
    assert store.get_histories(["u", "w"]) == {"u": joined, "w": history("z")}
    assert dict(store.iter_users()) == {"u": joined, "w": history("z")}
    raw = store.get_raw_histories(["u", "w", "nobody"])
    assert raw == {"u": (codec.encode_history(sealed), codec.encode_history_head(1, head)),
                   "w": (codec.encode_history(history("z")), None)}

    # A whole history replaces both parts; a user that is declared headless keeps its head.
    store.commit_batch({"u": history("x")}, {}, [], 3)
    assert store.get_raw_histories(["u"]) == {"u": (codec.encode_history(history("x")), None)}
    store.commit_batch({}, {}, [], 4, heads={"u": codec.encode_history_head(0, head)})
    store.commit_batch({"u": history("y")}, {}, [], 5, headless={"u"})  # the caller vouches
    assert store.get_raw_histories(["u"])["u"][1] == codec.encode_history_head(0, head)

    # Deleting a user deletes both parts.
    store.commit_batch({}, {}, ["u"], 6)
    assert store.get_raw_histories(["u"]) == {} and dict(store.iter_users()) == {"w": history("z")}

    with pytest.raises(StateStoreError, match="either a whole history or a head"):
        store.commit_batch({"w": history("q")}, {}, [], 7, heads={"w": codec.encode_history_head(0, head)})
    with pytest.raises(StateStoreError, match="both updated and deleted"):
        store.commit_batch({}, {}, ["w"], 7, heads={"w": codec.encode_history_head(0, head)})


def test_iter_users_joins_heads_in_user_order(make_store):
    store = make_store()
    users = ["a", "a\x00", "ab", "b", "ü", "\U0001f600"]
    store.commit_batch({u: history(u) for u in users}, {}, [], 1)
    heads = {u: codec.encode_history_head(0, history("h" + u, t0=500.0)) for u in users[::2]}
    store.commit_batch({}, {}, [], 2, heads=heads)
    got = list(store.iter_users())
    assert [u for u, _ in got] == sorted(users, key=lambda u: u.encode())
    for user, joined in got:
        expected = parts_history(history(user), 0, history("h" + user, t0=500.0)) if user in heads else history(user)
        assert joined == expected
    # A head without its sealed part is damage, found by every reader.
    del store._live().cf["histories"][b"b"]
    store.commit_batch({}, {}, [], 3, heads={"b": codec.encode_history_head(0, history("q", t0=600.0))})
    with pytest.raises(StoreFormatError, match="head without a sealed part"):
        dict(store.iter_users())
    with pytest.raises(StoreFormatError, match="head without a sealed part"):
        store.get_histories(["b"])


def test_data_without_format_version_is_refused(state_dir):
    db = raw_db(state_dir / "interactions-0")
    db.get_column_family("vectors")[b"u"] = b"old"
    db.close()
    with pytest.raises(StoreFormatError, match="holds data but no store format version"):
        PartitionStore.open(state_dir, TOPIC, 0)


def test_corrupt_value_raises_format_error(make_store, state_dir):
    make_store().close()
    db = raw_db(state_dir / "interactions-0")
    db.get_column_family("histories")[b"u"] = b"\x11\x05\x00"
    db.close()
    store = make_store()
    with pytest.raises(StoreFormatError, match="user history: truncated"):
        store.get_histories(["u"])


def test_sizes_for_metrics(make_store):
    store = make_store()
    store.commit_batch({f"u{i}": history("a") for i in range(20)}, {f"u{i}": record(1.0) for i in range(20)}, [], 1)
    assert store.estimated_keys()["histories"] >= 20
    store.flush()
    assert store.sst_bytes()["vectors"] > 0
    assert store.disk_bytes() >= sum(store.sst_bytes().values())


# ---------------------------------------------------------------- readers and checkpoints


def test_secondary_reader_follows_an_open_primary(make_store, state_dir):
    primary = make_store()
    primary.commit_batch({"u1": history("a")}, {"u1": record(1.0)}, [], 1)
    with StoreReader(state_dir) as reader:
        assert reader.partitions() == ["interactions-0"]
        assert reader.get_vector("u1") == record(1.0)

        primary.commit_batch({}, {"u1": record(2.0), "u2": record(3.0)}, [], 2)
        assert reader.get_vector("u1") == record(1.0)  # frozen until catch-up
        reader.catch_up()
        assert reader.get_vectors(["u1", "u2", "nobody"]) == {"u1": record(2.0), "u2": record(3.0)}

        # The primary flushes a newer value to a table file between catch-ups: a plain
        # secondary would keep serving record(2.0) from its memtable.
        primary.commit_batch({}, {"u1": record(4.0)}, [], 3)
        primary.flush()
        reader.catch_up()
        assert reader.get_vector("u1") == record(4.0)

        primary.commit_batch({}, {}, ["u2"], 4)
        other = make_store(partition=1)
        other.commit_batch({}, {"w": record(5.0)}, [], 0)
        reader.catch_up()
        assert reader.get_vector("u2") is None
        assert reader.partitions() == ["interactions-0", "interactions-1"]
        assert reader.applied_offsets() == {"interactions-0": 4, "interactions-1": 0}
        assert reader.get_vector("w") == record(5.0)
    with pytest.raises(StoreClosedError):
        reader.get_vector("u1")


def test_reader_prefers_the_latest_record_after_repartitioning(make_store, state_dir):
    make_store(partition=0).commit_batch({}, {"u": record(1.0, processed_at=10.0)}, [], 1)
    make_store(partition=1).commit_batch({}, {"u": record(2.0, processed_at=20.0)}, [], 1)
    with StoreReader(state_dir) as reader:
        assert reader.get_vector("u") == record(2.0, processed_at=20.0)


def test_reader_can_be_limited_to_one_topic(make_store, state_dir):
    make_store().commit_batch({}, {"u": record(1.0)}, [], 1)
    PartitionStore.open(state_dir, "other-topic", 0).close()
    with StoreReader(state_dir) as everything, StoreReader(state_dir, topic=TOPIC) as one:
        assert everything.partitions() == ["interactions-0", "other-topic-0"]
        assert one.partitions() == ["interactions-0"]


def test_reader_needs_an_existing_state_dir(tmp_path):
    with pytest.raises(StoreNotFoundError, match="existing directory"):
        StoreReader(tmp_path / "nope")


def test_checkpoint_of_primary_is_a_consistent_state_dir(make_store, tmp_path):
    store = make_store()
    store.commit_batch({"u1": history("a")}, {"u1": record(1.0)}, [], 1, "v000001")
    target = store.checkpoint(tmp_path / "snap")
    store.commit_batch({"u2": history("b")}, {"u1": record(9.0)}, [], 2)

    assert target == tmp_path / "snap" / "interactions-0"
    with PartitionStore.open(tmp_path / "snap", TOPIC, 0, create=False) as snap:
        assert snap.applied_offset() == 1 and snap.model_version() == "v000001"
        assert dict(snap.iter_vectors()) == {"u1": record(1.0)}
        assert dict(snap.iter_users()) == {"u1": history("a")}
    with pytest.raises(StateStoreError, match="must not exist"):
        store.checkpoint(tmp_path / "snap")


def test_reader_checkpoint_includes_unflushed_writes(make_store, state_dir, tmp_path):
    # RocksDB's own checkpoint of a secondary leaves out what is only in the primary's WAL.
    make_store(partition=0).commit_batch({"u1": history("a")}, {"u1": record(1.0)}, [], 5)
    make_store(partition=2).commit_batch({}, {"w": record(2.0)}, [], 8)
    with StoreReader(state_dir) as reader:
        copies = reader.checkpoint(tmp_path / "snap")
    assert sorted(copies) == ["interactions-0", "interactions-2"]
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["interactions-0", "interactions-2"]
    with StoreReader(tmp_path / "snap") as snap:
        assert snap.applied_offsets() == {"interactions-0": 5, "interactions-2": 8}
        assert snap.get_vectors(["u1", "w"]) == {"u1": record(1.0), "w": record(2.0)}
    with PartitionStore.open(tmp_path / "snap", TOPIC, 0, create=False) as copy:
        assert copy.get_histories(["u1"]) == {"u1": history("a")}
        assert [e.user_id for e in copy.iter_outbox()] == ["u1"]


def test_sync_writes_setting_is_used(make_store):
    assert make_store(config=StoreConfig(sync_writes=True))._write_opts.sync is True
    assert make_store(partition=1)._write_opts.sync is False


def test_model_switch_rewrites_vectors_and_version_without_moving_the_offset(make_store):
    store = make_store()
    store.commit_batch({"u": history("a"), "v": history("b")}, {"u": record(1.0), "v": record(2.0)},
                       [], offset=7, model_version="v000001")
    switched = {u: VectorRecord(np.full(4, 9.0, np.float32), "v000002", 1, 100.0, 2.0) for u in ("u", "v")}
    entries = store.commit_model_switch(switched, "v000002")
    assert store.applied_offset() == 7 and store.model_version() == "v000002"
    assert {u: r.model_version for u, r in store.get_vectors(["u", "v"]).items()} == {
        "u": "v000002", "v": "v000002"}
    # Pending: the batch's users and the switch's, each with its vector now (the switch's).
    assert [(e.offset, e.user_id) for e in store.iter_outbox()] == [(7, "u"), (7, "v")] * 2
    assert all(e.record.model_version == "v000002" for e in store.iter_outbox())
    assert [e.offset for e in entries] == [7, 7]
    with pytest.raises(StateStoreError, match="another version"):
        store.commit_model_switch({"u": record(3.0)}, "v000003")


def test_get_factors_reads_vectors_of_one_model_version(make_store):
    store = make_store()
    other = VectorRecord(np.full(4, 9.0, np.float32), "v000002", 1, 100.0, 1.0)
    store.commit_batch({}, {"a": record(1.0), "b": other}, [], 1)
    got = store.get_factors(["a", "b", "nobody"], "v000001")
    assert got.keys() == {"a"} and np.array_equal(got["a"], record(1.0).vector)


def test_outbox_entries_of_format_1_are_still_published(make_store, state_dir):
    # Format 1 wrote an outbox entry per user, holding its vector record: still read.
    make_store().close()
    db = raw_db(state_dir / "interactions-0")
    db.get_column_family("outbox")[codec.encode_outbox_key(3, "old")] = codec.encode_outbox_value("old", record(5.0))
    db.get_column_family("outbox")[codec.encode_outbox_key(3, "gone")] = codec.encode_outbox_value("gone", None)
    db.close()
    store = make_store()
    new = store.commit_batch({}, {"u": record(1.0)}, [], 4)
    pending = list(store.iter_outbox())
    assert [(e.offset, e.user_id, e.record) for e in pending] == [
        (3, "gone", None), (3, "old", record(5.0)), (4, "u", record(1.0))]
    store.ack_outbox(e.key for e in pending[:2])
    assert list(store.iter_outbox()) == new
