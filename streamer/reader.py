"""Read-only access to a live state dir, for services beside the consumer (and for retraining).

:class:`StoreReader` opens every partition database as a RocksDB secondary instance, so it
never takes the writer's LOCK.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from streamer import codec
from streamer.codec import VectorRecord
from rocksdict import WriteBatch, WriteOptions

from streamer.errors import StateStoreError, StoreClosedError, StoreFormatError, StoreNotFoundError
from streamer.store import (
    COLUMN_FAMILIES, META, VECTORS, _COPY_CHUNK, _OFFSET_KEY, _PARTITION_DIR, _Db,
    _check_format, _stored_format,
)

if TYPE_CHECKING:
    from streamer.store import PartitionStore

log = logging.getLogger(__name__)

class _SecondaryPartition:
    def __init__(self, name: str, path: Path, db: _Db):
        self.name = name
        self.path = path
        self.db = db
        self.tables = db.live_tables()


class StoreReader:
    """Read-only view of every partition database under a state dir, for services beside the consumer.

    Each partition is opened as a RocksDB *secondary* instance (it takes no LOCK and never
    writes to the primary's files, except that rocksdict rewrites its small
    ``rocksdict-config.json`` there on every open, so the reader needs write permission on
    the partition directories). A secondary sees the primary's state as of its last
    :meth:`catch_up`; nothing changes in between, which is what makes :meth:`checkpoint`
    consistent.

    A user's events all go to one input partition, so a user lives in exactly one partition
    database. It can appear in two only after the topic's partition count changed (keys
    re-hashed); lookups then return the record with the latest ``processed_at``.

    Methods are thread-safe (one lock).

    Parameters
    ----------
    state_dir : path
        The consumer's state dir.
    topic : str, optional
        Only open this topic's partition databases (all found by default).
    secondary_dir : path, optional
        Where a private directory for the secondaries' info logs is made (the system temp
        dir by default); it is removed by :meth:`close`.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        *,
        topic: str | None = None,
        secondary_dir: str | os.PathLike | None = None,
    ):
        self.state_dir = Path(state_dir)
        self.topic = topic
        if not self.state_dir.is_dir():
            raise StoreNotFoundError(f"state dir must be an existing directory, got {self.state_dir}")
        self._lock = threading.RLock()
        self._parts: dict[str, _SecondaryPartition] = {}
        self._root: Path | None = Path(tempfile.mkdtemp(prefix="foldstream-reader-", dir=secondary_dir))
        try:
            self._discover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _open_partition(self, name: str, path: Path) -> _SecondaryPartition | None:
        """A secondary for ``path``, or None while its primary is still being created."""
        assert self._root is not None
        db = _Db(path, create=False, secondary_path=self._root / name)
        try:
            if _stored_format(db) is None:
                db.close()
                return None
            _check_format(db, path)
            return _SecondaryPartition(name, path, db)
        except BaseException:
            db.close()
            raise

    def _discover(self) -> None:
        for path in sorted(self.state_dir.iterdir()):
            name = path.name
            match = _PARTITION_DIR.fullmatch(name)
            if name in self._parts or not match or not (path / "CURRENT").is_file():
                continue
            if self.topic is not None and match.group(1) != self.topic:
                continue
            try:
                part = self._open_partition(name, path)
            except StoreFormatError:
                raise
            except Exception as exc:  # a primary mid-creation; try again at the next catch-up
                log.warning("cannot open %s as a secondary yet: %s", path, exc)
                continue
            if part is not None:
                self._parts[name] = part

    def _drop(self, name: str) -> None:
        part = self._parts.pop(name)
        try:
            part.db.close()
        except StateStoreError as exc:
            log.warning("closing secondary %s: %s", part.path, exc)

    def catch_up(self) -> None:
        """Replay what the primaries wrote since the last call; pick up new partition databases.

        RocksDB secondaries can keep serving a value replayed from the WAL after the primary
        flushed a newer one to a table file (facebook/rocksdb#14444, #15051), so a partition
        whose set of table files changed is reopened instead of trusted.
        """
        with self._lock:
            self._live()
            for name, part in list(self._parts.items()):
                if not (part.path / "CURRENT").is_file():
                    log.info("partition database %s is gone", part.path)
                    self._drop(name)
                    continue
                try:
                    part.db.rdict.try_catch_up_with_primary()
                    if part.db.live_tables() == part.tables:
                        continue
                    self._drop(name)
                    fresh = self._open_partition(name, part.path)
                except StoreFormatError:
                    raise
                except Exception as exc:
                    log.warning("catching up %s failed, dropping it until it reappears: %s", part.path, exc)
                    if name in self._parts:
                        self._drop(name)
                    continue
                if fresh is not None:
                    self._parts[name] = fresh
            self._discover()

    def close(self) -> None:
        """Close every secondary and remove the private secondary directory; idempotent."""
        with self._lock:
            for name in list(self._parts):
                self._drop(name)
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _live(self) -> None:
        if self._root is None:
            raise StoreClosedError(f"store reader of {self.state_dir} is closed")

    # ------------------------------------------------------------------ reads

    def partitions(self) -> list[str]:
        """Names (``<topic>-<partition>``) of the partition databases open."""
        with self._lock:
            return sorted(self._parts)

    def applied_offsets(self) -> dict[str, int]:
        """Applied offset of each partition as of the last catch-up (-1 when none)."""
        with self._lock:
            self._live()
            result = {}
            for name, part in sorted(self._parts.items()):
                raw = part.db.cf[META].get(_OFFSET_KEY)
                result[name] = -1 if raw is None else codec.decode_offset(raw)
            return result

    def get_vectors(self, user_ids: Iterable[str]) -> dict[str, VectorRecord]:
        """Vector records of the users found in any partition (missing users are left out)."""
        ids = list(dict.fromkeys(user_ids))
        keys = [codec.encode_user_id(u) for u in ids]
        found: dict[str, VectorRecord] = {}
        if not ids:
            return found
        with self._lock:
            self._live()
            for part in self._parts.values():
                for user_id, raw in zip(ids, part.db.cf[VECTORS][keys]):
                    if raw is None:
                        continue
                    record = codec.decode_vector_record(raw)
                    if user_id not in found or record.processed_at > found[user_id].processed_at:
                        found[user_id] = record
        return found

    def get_vector(self, user_id: str) -> VectorRecord | None:
        """The user's vector record, None when no partition holds one."""
        return self.get_vectors([user_id]).get(user_id)

    def checkpoint(self, dest: str | os.PathLike) -> dict[str, Path]:
        """Copy every partition, as of the last catch-up, into the new state dir ``dest``.

        RocksDB's own checkpoint is not used here: taken from a secondary (or read-only)
        instance it silently leaves out data still in the primary's WAL. Instead each column
        family is copied key by key from the secondary's frozen view into
        ``dest/.<name>.partial``, which is renamed to ``dest/<name>`` once complete.

        Returns
        -------
        dict
            Partition name to the copied database's path.
        """
        dest = Path(dest)
        with self._lock:
            self._live()
            clashes = [str(dest / n) for n in self._parts if (dest / n).exists()]
            if clashes:
                raise StateStoreError(f"checkpoint targets must not exist, got existing {clashes}")
            dest.mkdir(parents=True, exist_ok=True)
            return {name: _copy_partition(part.db, dest, name) for name, part in sorted(self._parts.items())}


def _copy_partition(source: _Db, dest: Path, name: str) -> Path:
    partial = dest / f".{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    target = _Db(partial, create=True)
    try:
        for cf in COLUMN_FAMILIES:
            batch = WriteBatch(raw_mode=True)
            for key, value in source.cf[cf].items():
                batch.put(key, value, target.handle[cf])
                if batch.len() >= _COPY_CHUNK:
                    target.rdict.write(batch, WriteOptions())
                    batch = WriteBatch(raw_mode=True)
            if batch.len():
                target.rdict.write(batch, WriteOptions())
    finally:
        target.close()
    final = dest / name
    os.rename(partial, final)
    return final


@contextlib.contextmanager
def snapshot(state_dir: str | os.PathLike, topic: str) -> Iterator[dict[int, "PartitionStore"]]:
    """A consistent copy of every partition of ``topic``, opened read-write in a temp dir.

    Safe beside a running consumer (the copy comes from secondary instances); each
    partition is a consistent state as of one catch-up. Yields ``{partition: store}``
    and deletes the copy afterwards.
    """
    from streamer.store import PartitionStore

    with tempfile.TemporaryDirectory(prefix="foldstream-snapshot-") as tmp:
        dest = Path(tmp) / "state"
        if Path(state_dir).is_dir():
            with StoreReader(state_dir, topic=topic) as reader:
                copied = reader.checkpoint(dest)
        else:
            copied = {}
        stores = {}
        try:
            for name in sorted(copied):
                match = _PARTITION_DIR.fullmatch(name)
                partition = int(match.group(2))
                stores[partition] = PartitionStore.open(dest, topic, partition, create=False)
            yield stores
        finally:
            for store in stores.values():
                store.close()
