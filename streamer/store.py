"""Per-partition RocksDB state: one database per input partition, written in one batch per micro-batch.

Layout: ``STATE_DIR/<topic>-<partition>/`` is a RocksDB database (raw bytes, via rocksdict) with
four column families::

    vectors    user id -> VectorRecord          (codec.encode_vector_record)
    histories  user id -> UserHistory           (codec.encode_history: the sealed part)
               0xFF + user id -> head record    (codec.encode_history_head, optional)
    meta       b"format_version" -> <I, b"applied_offset" -> offset, b"model_version" -> text
    outbox     >Q offset + >Q write sequence -> the batch's updated and deleted user ids
               (codec.encode_outbox_users; format 1 stores may still hold per-user
               entries, >Q offset + user id -> user id + VectorRecord or a tombstone)

A history is stored as a sealed part and a head (see :mod:`streamer.codec`): the consumer
appends a user's new events to the head and rewrites the sealed part only when the head
has grown past a bound (:func:`streamer.history_kernels.plan_history_writes`), so a write
costs the new events, not the whole history. A head key is the user id's key after a 0xFF
byte, which UTF-8 never holds: it cannot be another user's key, and all heads sort after
all sealed parts.

One database per partition lets a partition move to another process on the same host: the
old owner closes it, the new owner opens it (retrying while RocksDB's LOCK is still held).

Durability: the write-ahead log is always on, so a batch that :meth:`PartitionStore.commit_batch`
returned from survives ``kill -9`` of the process (the WAL record is in the OS page cache).
``sync_writes`` (:class:`streamer.config.StoreConfig`) adds an fsync per batch, which also
survives power loss or a kernel crash, at the cost of one fsync per micro-batch (about a
millisecond on local SSD, far more on network disks). Off, the default, such a crash can lose
the last batches but never part of one (WAL recovery is point-in-time, flushes are atomic
across column families); the applied offset goes back with them, so the consumer replays
them from Kafka.

Readers in other processes use :class:`StoreReader` (RocksDB secondary instances).
"""

from __future__ import annotations

import logging
import operator
import os
import re
import struct
import time
import weakref
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, TypeVar

import numpy as np
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    Checkpoint,
    DBRecoveryMode,
    Options,
    Rdict,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from streamer import codec
from streamer.codec import OutboxEntry, UserHistory, VectorRecord
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

log = logging.getLogger(__name__)

VECTORS = "vectors"
HISTORIES = "histories"
META = "meta"
OUTBOX = "outbox"
COLUMN_FAMILIES = (VECTORS, HISTORIES, META, OUTBOX)

# 2: histories may have a head (a version-1 store is a version-2 store without heads,
# and is upgraded in place when a consumer opens it).
STORE_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
HEAD_PREFIX = b"\xff"
_OUTBOX_USERS_BYTE = bytes([codec.OUTBOX_USERS_FORMAT])  # a batch's entry, not a format-1 user's
_FORMAT_KEY = b"format_version"
_OFFSET_KEY = b"applied_offset"
_MODEL_KEY = b"model_version"
_FORMAT_VALUE = struct.Struct("<I")

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PARTITION_DIR = re.compile(r"([A-Za-z0-9._-]{1,249})-(\d+)")
_COPY_CHUNK = 10_000
# Table tuning; constants until a deployment needs to change them.
WRITE_BUFFER_BYTES = 16 * 2**20  # memtable per column family, four per partition
BLOOM_BITS_PER_KEY = 10  # point lookups of vectors and histories, mostly misses in StoreReader
MEMTABLE_BLOOM_RATIO = 0.1  # of the memtable's size, for its whole-key bloom filter

T = TypeVar("T")


def partition_dir_name(topic: str, partition: int) -> str:
    """Directory name of a partition's database: ``<topic>-<partition>``."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
        raise ConfigError(f"topic must match [A-Za-z0-9._-]{{1,249}}, got {topic!r}")
    if not isinstance(partition, int) or partition < 0:
        raise ConfigError(f"partition must be an int >= 0, got {partition!r}")
    return f"{topic}-{partition}"


def _is_lock_error(message: str) -> bool:
    # The two messages RocksDB gives when the LOCK file is taken: by another process
    # ("While lock file: <dir>/LOCK: Resource temporarily unavailable") and by this one
    # ("lock hold by current process, ... <dir>/LOCK: No locks available").
    return "/LOCK" in message and ("While lock file" in message or "lock hold by current process" in message)


_SHARED: dict[tuple[str, int], object] = {}


def _shared_cache(capacity: int) -> Cache:
    """One LRU block cache per process and size, for every partition database it opens."""
    key = ("cache", capacity)
    if key not in _SHARED:
        _SHARED[key] = Cache(capacity)
    return _SHARED[key]


def _shared_write_buffers(limit: int) -> WriteBufferManager:
    """One memtable budget per process and size, across every partition database."""
    key = ("memtables", limit)
    if key not in _SHARED:
        _SHARED[key] = WriteBufferManager(limit, False)
    return _SHARED[key]


def _options(*, create: bool, secondary: bool,
             config: StoreConfig | None = None) -> tuple[Options, dict[str, Options]]:
    """Database and column-family options.

    Memory is bounded per process, whatever the number of partitions it holds: the
    memtables of all its databases share ``config.memtable_bytes`` (a RocksDB write
    buffer manager: the largest memtable is flushed when the total nears it) and their
    block caches one LRU cache of ``config.block_cache_bytes``. Without them every
    column family of every partition had its own 32 MB default cache and 16 MB memtables.
    """
    config = config or StoreConfig()
    opts = Options(raw_mode=True)
    opts.set_keep_log_file_num(3)
    if not secondary:
        opts.set_write_buffer_manager(_shared_write_buffers(config.memtable_bytes))
    if secondary:
        # Keep every table file open, so the primary's compactions cannot delete one from under a read.
        opts.set_max_open_files(-1)
    else:
        opts.create_if_missing(create)
        opts.create_missing_column_families(create)
        opts.set_atomic_flush(True)
        opts.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    families = {}
    for name in COLUMN_FAMILIES:
        cf = Options(raw_mode=True)
        cf.set_write_buffer_size(WRITE_BUFFER_BYTES)
        table = BlockBasedOptions()
        table.set_block_cache(_shared_cache(config.block_cache_bytes))
        if name in (VECTORS, HISTORIES):
            table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
            # A bloom filter over the memtable's keys too: most head lookups of a
            # history read are misses, which the memtable otherwise answers with a search.
            cf.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
            cf.set_memtable_whole_key_filtering(True)
        cf.set_block_based_table_factory(table)
        families[name] = cf
    return opts, families


class _Db:
    """One open RocksDB instance, a view per column family, and the iterators lent out.

    rocksdict keeps the database (and its LOCK) alive while any column-family view, handle,
    iterator or Checkpoint object exists, so :meth:`close` closes all of them first.
    """

    def __init__(self, path: Path, *, create: bool, secondary_path: Path | None = None,
                 config: StoreConfig | None = None):
        opts, families = _options(create=create, secondary=secondary_path is not None,
                                  config=config)
        access = AccessType.read_write() if secondary_path is None else AccessType.secondary(str(secondary_path))
        self.path = path
        self.rdict = Rdict(str(path), opts, column_families=families, access_type=access)
        self.cf: dict[str, Rdict] = {}
        self.handle: dict = {}
        self._scans: weakref.WeakSet = weakref.WeakSet()
        try:
            self.cf = {name: self.rdict.get_column_family(name) for name in COLUMN_FAMILIES}
            if secondary_path is None:
                self.handle = {name: self.rdict.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        except Exception:
            self.close()
            raise

    def scan(self, name: str, decode: Callable[[bytes, bytes], T]) -> Iterator[T]:
        gen = self._scan(name, decode)
        self._scans.add(gen)
        return gen

    def _scan(self, name: str, decode: Callable[[bytes, bytes], T]) -> Iterator[T]:
        items = self.cf[name].items()
        for key, value in items:
            yield decode(key, value)

    def scan_histories(self) -> Iterator[tuple[bytes, bytes | None, bytes | None]]:
        gen = self._scan_histories()
        self._scans.add(gen)
        return gen

    def _scan_histories(self) -> Iterator[tuple[bytes, bytes | None, bytes | None]]:
        # Sealed parts and heads are two key ranges of one column family, walked side by
        # side. Both iterators are created in one step of this generator, before it yields
        # to anyone who could write, so they read the same state.
        cf = self.cf[HISTORIES]
        sealed = cf.items()
        heads = cf.items(from_key=HEAD_PREFIX)
        head = next(heads, None)
        for key, value in sealed:
            if key[:1] == HEAD_PREFIX:
                break
            while head is not None and head[0][1:] < key:  # a head without a sealed part
                yield head[0][1:], None, head[1]
                head = next(heads, None)
            if head is not None and head[0][1:] == key:
                yield key, value, head[1]
                head = next(heads, None)
            else:
                yield key, value, None
        while head is not None:
            yield head[0][1:], None, head[1]
            head = next(heads, None)

    def live_tables(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.rdict.live_files())

    def close(self) -> None:
        errors = []
        for gen in list(self._scans):
            try:
                gen.close()
            except ValueError:  # closed from inside its own loop body
                pass
        for view in self.cf.values():
            try:
                view.close()
            except Exception as exc:
                errors.append(exc)
        self.cf = {}
        self.handle = {}
        try:
            self.rdict.close()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise StateStoreError(f"closing {self.path} failed: {'; '.join(map(str, errors))}") from errors[0]


def _stored_format(db: _Db) -> int | None:
    raw = db.cf[META].get(_FORMAT_KEY)
    if raw is None:
        return None
    if len(raw) != _FORMAT_VALUE.size:
        raise StoreFormatError(f"format version: must be {_FORMAT_VALUE.size} bytes, got {len(raw)}")
    return _FORMAT_VALUE.unpack(raw)[0]


def _check_format(db: _Db, path: Path) -> None:
    found = _stored_format(db)
    if found not in READABLE_FORMATS:
        raise StoreFormatError(f"{path}: store format version must be one of {READABLE_FORMATS}, got {found}")


def _write_format(db: _Db) -> None:
    """Record this version's store format, fsynced."""
    batch = WriteBatch(raw_mode=True)
    batch.put(_FORMAT_KEY, _FORMAT_VALUE.pack(STORE_FORMAT_VERSION), db.handle[META])
    sync = WriteOptions()
    sync.sync = True
    db.rdict.write(batch, sync)


def _decode_outbox(key: bytes, value: bytes) -> OutboxEntry:
    """A per-user outbox entry (written by store format 1)."""
    offset, user_id = codec.decode_outbox_key(key)
    value_user, record = codec.decode_outbox_value(value)
    if value_user != user_id:
        raise StoreFormatError(f"outbox entry: key names user {user_id!r}, value names {value_user!r}")
    return OutboxEntry(key, offset, user_id, record)


def _cf_property(db: _Db, name: str) -> dict[str, int]:
    return {cf: int(db.cf[cf].property_int_value(name) or 0) for cf in COLUMN_FAMILIES}


def _user_keys(users: Iterable[str]) -> list[bytes]:
    """:func:`codec.encode_user_id` of each of ``users`` (one ``str.encode`` each when all
    are valid, which is the same bytes)."""
    try:
        return [user.encode("utf-8") for user in users]
    except (AttributeError, UnicodeEncodeError):
        return [codec.encode_user_id(user) for user in users]  # raises its clear error


# An OutboxEntry from a tuple of its fields, in C (one per published vector).
_new_outbox_entry = partial(tuple.__new__, OutboxEntry)


class PartitionStore:
    """The state of one input partition, owned by one process at a time.

    Open it with :meth:`open`. Methods are not thread-safe: call them from the thread that
    consumes the partition.
    """

    def __init__(self, db: _Db, path: Path, topic: str, partition: int, config: StoreConfig):
        self._db: _Db | None = db
        self.path = path
        self.topic = topic
        self.partition = partition
        self.config = config
        self._write_opts = WriteOptions()
        self._write_opts.sync = config.sync_writes
        self._applied = self._read_offset()
        raw = db.cf[META].get(_MODEL_KEY)
        self._model_version = None if raw is None else codec.decode_text(raw)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        state_dir: str | os.PathLike,
        topic: str,
        partition: int,
        *,
        create: bool = True,
        lock_timeout_s: float | None = None,
        config: StoreConfig | None = None,
    ) -> "PartitionStore":
        """Open (or create) ``state_dir/<topic>-<partition>``.

        While another process holds the database's LOCK (it is still closing after a
        rebalance) this retries with exponential backoff (50 ms doubling to 1 s).

        Parameters
        ----------
        state_dir : path
        topic : str
        partition : int
        create : bool
            Create the database when missing; else raise :class:`StoreNotFoundError`.
        lock_timeout_s : float, optional
            Overrides ``config.lock_timeout_s``.
        config : streamer.config.StoreConfig, optional
            ``sync_writes``, ``lock_timeout_s`` and the memory budgets are used; ``state_dir``
            is not (pass it here).

        Raises
        ------
        StoreLockedError
            The LOCK is still held after ``lock_timeout_s``.
        StoreFormatError
            The database was written with another store format version.
        StoreNotFoundError, StateStoreError
        """
        config = config or StoreConfig()
        timeout = config.lock_timeout_s if lock_timeout_s is None else float(lock_timeout_s)
        if not timeout >= 0:
            raise ConfigError(f"lock_timeout_s must be >= 0, got {lock_timeout_s}")
        path = Path(state_dir) / partition_dir_name(topic, partition)
        if not create and not (path / "CURRENT").is_file():
            raise StoreNotFoundError(f"no partition database at {path} (create=False)")
        path.parent.mkdir(parents=True, exist_ok=True)

        deadline = time.monotonic() + timeout
        delay, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                db = _Db(path, create=create, config=config)
                break
            except Exception as exc:
                message = str(exc)
                if not _is_lock_error(message):
                    raise StateStoreError(f"cannot open {path}: {message}") from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(
                        f"{path}/LOCK still held by another process after {attempts} attempts "
                        f"in {timeout:.1f}s (lock_timeout_s={timeout})"
                    ) from exc
                if attempts == 1:
                    log.warning("%s is locked by another process; retrying for up to %.1fs", path, timeout)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        try:
            cls._init_format(db, path)
            store = cls(db, path, topic, partition, config)
        except BaseException:
            db.close()
            raise
        if attempts > 1:
            log.info("opened %s after %d attempts", path, attempts)
        return store

    @staticmethod
    def _init_format(db: _Db, path: Path) -> None:
        found = _stored_format(db)
        if found is None:
            populated = any(next(iter(db.cf[name].keys()), None) is not None for name in COLUMN_FAMILIES)
            if populated:
                raise StoreFormatError(f"{path}: holds data but no store format version, expected {STORE_FORMAT_VERSION}")
            _write_format(db)
            log.info("created partition store %s (format %d)", path, STORE_FORMAT_VERSION)
            return
        _check_format(db, path)
        if found != STORE_FORMAT_VERSION:  # an older format this version reads: upgrade
            _write_format(db)
            log.info("upgraded partition store %s from format %d to %d", path, found, STORE_FORMAT_VERSION)

    def close(self) -> None:
        """Flush and close; idempotent. Open iterators from ``iter_*`` are closed too."""
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def __enter__(self) -> "PartitionStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def name(self) -> str:
        """``<topic>-<partition>``."""
        return self.path.name

    def _live(self) -> _Db:
        if self._db is None:
            raise StoreClosedError(f"partition store {self.name} is closed")
        return self._db

    def __repr__(self) -> str:
        state = "closed" if self._db is None else f"applied_offset={self._applied}"
        return f"PartitionStore({str(self.path)!r}, {state})"

    # ------------------------------------------------------------------ reads

    def _read_offset(self) -> int:
        raw = self._live().cf[META].get(_OFFSET_KEY)
        return -1 if raw is None else codec.decode_offset(raw)

    def applied_offset(self) -> int:
        """Offset of the last event applied from this partition, -1 when none.

        After assignment the consumer seeks to ``applied_offset() + 1``.
        """
        self._live()
        return self._applied

    def model_version(self) -> str | None:
        """Model version recorded by the last batch that gave one, None when never set.

        Kept in memory beside the applied offset (read at open, set after each write that
        records one): the consumer asks for it per partition per micro-batch.
        """
        self._live()
        return self._model_version

    def _multi_get(self, name: str, user_ids: Iterable[str], decode: Callable[[bytes], T]) -> dict[str, T]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        values = self._live().cf[name][_user_keys(ids)]
        return {u: decode(v) for u, v in zip(ids, values) if v is not None}

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, UserHistory]:
        """Histories of the users that have one (missing users are left out)."""
        return {u: codec.join_history(*parts) for u, parts in self.get_raw_histories(user_ids).items()}

    def get_raw_histories(self, user_ids: Iterable[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
        """The stored parts of the users' histories, ``(sealed part, head record)`` with
        None for a missing part, as read (unchecked: see :func:`codec.join_history` and
        :func:`streamer.history_kernels.check_history_parts`); users with neither are left out."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        keys = _user_keys(ids)
        values = self._live().cf[HISTORIES][keys + [HEAD_PREFIX + k for k in keys]]
        n = len(ids)
        return {u: (s, h) for u, s, h in zip(ids, values[:n], values[n:]) if s is not None or h is not None}

    def get_vectors(self, user_ids: Iterable[str]) -> dict[str, VectorRecord]:
        """Vector records of the users that have one (missing users are left out)."""
        return self._multi_get(VECTORS, user_ids, codec.decode_vector_record)

    def get_factors(self, user_ids: Iterable[str], model_version: str) -> dict[str, np.ndarray]:
        """The stored vectors of the users whose vector was computed against
        ``model_version`` (others are left out); a light read for monitoring samples."""
        found = self._multi_get(VECTORS, user_ids, lambda buf: codec.vector_of_version(buf, model_version))
        return {u: v for u, v in found.items() if v is not None}

    def iter_users(self) -> Iterator[tuple[str, UserHistory]]:
        """Every ``(user_id, history)`` in user-id byte order, from one consistent view."""
        return (
            (codec.decode_user_id(key), codec.join_history(sealed, head))
            for key, sealed, head in self._live().scan_histories()
        )

    def iter_vectors(self) -> Iterator[tuple[str, VectorRecord]]:
        """Every ``(user_id, vector record)`` in user-id byte order, from one consistent view."""
        return self._live().scan(VECTORS, lambda k, v: (codec.decode_user_id(k), codec.decode_vector_record(v)))

    def iter_outbox(self) -> Iterator[OutboxEntry]:
        """Unacknowledged outbox entries, oldest batch first, one per user of each batch.

        At startup, publish these before consuming: they were committed but their
        publication was not acknowledged. A batch's entry names its users; each is
        published with its state now, its stored vector (which a later batch may have
        replaced: on the compacted output topic the last message per user is what counts,
        and that is the same) or a tombstone when it has none (it was forgotten).
        """
        self._live()  # a closed store raises here, not at the first entry
        return self._iter_outbox()

    def _iter_outbox(self) -> Iterator[OutboxEntry]:
        for key, value in self._live().scan(OUTBOX, lambda k, v: (k, v)):
            if value[:1] != _OUTBOX_USERS_BYTE:
                yield _decode_outbox(key, value)
                continue
            offset, _ = codec.decode_outbox_users_key(key)
            users = codec.decode_outbox_users(value)
            current = self.get_vectors(users)
            for user in users:
                yield OutboxEntry(key, offset, user, current.get(user))

    # ------------------------------------------------------------------ writes

    def commit_batch(
        self,
        histories: Mapping[str, UserHistory],
        vectors: Mapping[str, VectorRecord],
        deletes: Iterable[str],
        offset: int,
        model_version: str | None = None,
        *,
        heads: Mapping[str, bytes] | None = None,
        headless: Collection[str] | None = None,
    ) -> list[OutboxEntry]:
        """Apply one micro-batch atomically: state, outbox and offset in one WriteBatch.

        Commit order:

        1. Check the store is open, ``offset`` advances past :meth:`applied_offset`
           (else :class:`StaleOffsetError`), and no user is both updated and deleted.
        2. Stage into one ``WriteBatch``: every history (as the user's sealed part, its head
           deleted), every head, then every vector record.
        3. Stage each deleted user: delete its history (both parts) and its vector.
        4. Stage the batch's outbox entry: the users of its vector records and its deleted
           users, keyed ``(offset, write sequence number)``.
        5. Stage meta: the applied offset, and the model version when given.
           An encoding error in steps 2-5 discards the batch; nothing was written.
        6. Write the batch in one call. RocksDB logs it as one WAL record, so after any crash
           it is wholly present or wholly absent; with ``sync_writes`` the WAL is fsynced first.
        7. Only then advance the in-memory applied offset and return the outbox entries.

        The caller then publishes the entries, flushes the producer and calls
        :meth:`ack_outbox` with their keys. A crash after step 6 leaves them in the outbox
        (republished from :meth:`iter_outbox` at startup); a crash before it leaves the events
        unapplied, and Kafka redelivers them.

        Parameters
        ----------
        histories : mapping of user id to UserHistory, or to its :func:`codec.encode_history` bytes
            Whole histories: each replaces the user's sealed part and its head.
        vectors : mapping of user id to VectorRecord
        deletes : iterable of user id
        offset : int
            Offset of the last event of the batch, > :meth:`applied_offset`.
        model_version : str, optional
            Model version the vectors were computed against, recorded in meta.
        heads : mapping of user id to :func:`codec.encode_history_head` bytes, optional
            New heads of users whose stored sealed part stays (not in ``histories``).
        headless : collection of user id, optional
            The users of ``histories`` the caller knows to have no stored head; the heads
            of the others are deleted. By default the store looks the heads up, so that
            it deletes only those that exist (a delete of a missing key leaves a
            tombstone for nothing, and counts against RocksDB's estimate of the keys).

        Returns
        -------
        list of OutboxEntry
            The entries written, to publish and then acknowledge.
        """
        db = self._live()
        try:
            offset = operator.index(offset)
        except TypeError:
            raise StaleOffsetError(f"{self.name}: batch offset must be an int, got {offset!r}") from None
        if offset <= self._applied:
            raise StaleOffsetError(f"{self.name}: batch offset must be > applied offset {self._applied}, got {offset}")
        deletes = list(dict.fromkeys(deletes))
        heads = heads or {}
        both = set(deletes) & (set(histories) | set(vectors) | set(heads))
        if both:
            raise StateStoreError(f"{self.name}: users must not be both updated and deleted in one batch, got {sorted(both)[:5]}")
        if heads:
            twice = set(heads) & set(histories)
            if twice:
                raise StateStoreError(f"{self.name}: a user gets either a whole history or a head, got both for {sorted(twice)[:5]}")

        batch = WriteBatch(raw_mode=True)
        h = db.handle
        cf = h[HISTORIES]
        if headless is None:
            found = self.get_raw_histories(histories)
            headless = {u for u in histories if found.get(u, (None, None))[1] is None}
        for (user_id, history), key in zip(histories.items(), _user_keys(histories)):
            if not isinstance(history, bytes):  # else already encode_history()'s bytes
                history = codec.encode_history(history)
            batch.put(key, history, cf)
            if user_id not in headless:
                batch.delete(HEAD_PREFIX + key, cf)
        for key, head in zip(_user_keys(heads), heads.values()):
            batch.put(HEAD_PREFIX + key, head, cf)
        vectors_cf, encode_record = h[VECTORS], codec.encode_vector_record
        for key, record in zip(_user_keys(vectors), vectors.values()):
            batch.put(key, encode_record(record), vectors_cf)
        for key in _user_keys(deletes):
            batch.delete(key, cf)
            batch.delete(HEAD_PREFIX + key, cf)
            batch.delete(key, vectors_cf)
        key = codec.encode_outbox_users_key(offset, db.rdict.latest_sequence_number() + 1)
        entries = list(map(_new_outbox_entry, zip(repeat(key), repeat(offset), vectors, vectors.values())))
        entries += [OutboxEntry(key, offset, u, None) for u in deletes]
        if entries:
            batch.put(key, codec.encode_outbox_users([e.user_id for e in entries]), h[OUTBOX])
        batch.put(_OFFSET_KEY, codec.encode_offset(offset), h[META])
        if model_version is not None:
            batch.put(_MODEL_KEY, codec.encode_text(model_version), h[META])

        try:
            db.rdict.write(batch, self._write_opts)
        except Exception as exc:
            raise StateStoreError(f"{self.name}: writing batch at offset {offset} failed: {exc}") from exc
        self._applied = offset
        if model_version is not None:
            self._model_version = model_version
        return entries

    def commit_model_switch(self, vectors: Mapping[str, VectorRecord], model_version: str) -> list[OutboxEntry]:
        """Re-folded vectors of a model switch, all in one WriteBatch, offset unchanged.

        Commit order:

        1. Check the store is open and every record carries ``model_version``.
        2. Stage every vector record, and one outbox entry naming the users, keyed at the
           current applied offset (so it sorts after that batch's entry).
        3. Stage meta ``model_version``.
        4. Write the batch in one call: after any crash the partition is wholly on the old
           model or wholly on the new one.
        """
        db = self._live()
        wrong = [u for u, r in vectors.items() if r.model_version != model_version]
        if wrong:
            raise StateStoreError(f"{self.name}: model switch to {model_version} got vectors of "
                                  f"another version for {sorted(wrong)[:5]}")
        offset = max(self._applied, 0)
        batch = WriteBatch(raw_mode=True)
        h = db.handle
        key = codec.encode_outbox_users_key(offset, db.rdict.latest_sequence_number() + 1)
        entries = []
        for user_id, record in vectors.items():
            batch.put(codec.encode_user_id(user_id), codec.encode_vector_record(record), h[VECTORS])
            entries.append(OutboxEntry(key, offset, user_id, record))
        if entries:
            batch.put(key, codec.encode_outbox_users(list(vectors)), h[OUTBOX])
        batch.put(_MODEL_KEY, codec.encode_text(model_version), h[META])
        try:
            db.rdict.write(batch, self._write_opts)
        except Exception as exc:
            raise StateStoreError(f"{self.name}: writing the switch to {model_version} failed: {exc}") from exc
        self._model_version = model_version
        return entries

    def ack_outbox(self, keys: Iterable[bytes]) -> None:
        """Delete published outbox entries in one small batch (never fsynced: losing an ack only republishes)."""
        db = self._live()
        batch = WriteBatch(raw_mode=True)
        for key in dict.fromkeys(bytes(k) for k in keys):  # a batch's users share its key
            batch.delete(key, db.handle[OUTBOX])
        if batch.len():
            try:
                db.rdict.write(batch, WriteOptions())
            except Exception as exc:
                raise StateStoreError(f"{self.name}: deleting {batch.len()} outbox entries failed: {exc}") from exc

    def flush(self) -> None:
        """Flush memtables of every column family to table files."""
        db = self._live()
        for view in db.cf.values():
            view.flush(True)

    def checkpoint(self, dest_state_dir: str | os.PathLike) -> Path:
        """A consistent copy of this partition as ``dest_state_dir/<topic>-<partition>``.

        Uses RocksDB checkpoints: memtables are flushed, table files hard-linked when on the
        same filesystem. The result is itself a state dir that :class:`StoreReader` or
        :meth:`open` can read; its meta holds the applied offset it reflects.
        """
        db = self._live()
        target = Path(dest_state_dir) / self.name
        if target.exists():
            raise StateStoreError(f"checkpoint target must not exist, got existing {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = Checkpoint(db.rdict)  # holds the database open until dropped
        try:
            checkpoint.create_checkpoint(str(target))
        except Exception as exc:
            raise StateStoreError(f"{self.name}: checkpoint to {target} failed: {exc}") from exc
        finally:
            del checkpoint
        return target

    # ------------------------------------------------------------------ sizes, for metrics

    def estimated_keys(self) -> dict[str, int]:
        """RocksDB's ``rocksdb.estimate-num-keys`` per column family (approximate)."""
        return _cf_property(self._live(), "rocksdb.estimate-num-keys")

    def sst_bytes(self) -> dict[str, int]:
        """``rocksdb.total-sst-files-size`` per column family (excludes memtables and WAL)."""
        return _cf_property(self._live(), "rocksdb.total-sst-files-size")

    def disk_bytes(self) -> int:
        """Bytes of every file in the partition directory (tables, WAL, manifest, logs)."""
        total = 0
        for entry in os.scandir(self.path):
            try:
                total += entry.stat().st_size if entry.is_file() else 0
            except FileNotFoundError:  # deleted by a compaction while we looked
                pass
        return total
