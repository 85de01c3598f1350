"""The downstream contract: what we write to the ``user-vectors`` and dead-letter topics.

``user-vectors`` is compacted; key = user id (UTF-8); value = UTF-8 JSON::

    {"user": "u1", "vector": [0.0123, ...], "model_version": "v000003",
     "interactions": 17, "last_event_time": 1700000123.5, "processed_at": 1700000124.01}

``vector`` holds float32 values written as the float64 numbers they are exactly, so
``np.asarray(doc["vector"], dtype=np.float32)`` recovers the stored vector bit for bit.
``last_event_time`` is null for a user without events. A null value (tombstone) means
the user was forgotten.

Dead letters carry the original key and value bytes and these headers:
``reason`` (one of :data:`streamer.events.REASONS`), ``detail``, ``source_topic``,
``source_partition``, ``source_offset``, plus the original record's headers.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from kafka.errors import KafkaError

from streamer.codec import OutboxEntry, VectorRecord
from streamer.errors import PublishError
from streamer.events import Rejected
from streamer.processor import RawRecord

VECTOR_SCHEMA_VERSION = 1


_json_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def vector_message(user: str, record: VectorRecord | None) -> bytes | None:
    """The value published for ``user`` (None = tombstone).

    The same bytes as ``json.dumps`` of the documented object with ``ensure_ascii=False``
    and compact separators, written directly: the 64 float reprs are most of the cost of
    publishing a vector, and the dict and encoder passes around them are avoided.
    """
    if record is None:
        return None
    last = record.last_event_time
    return (
        '{"user":%s,"vector":[%s],"model_version":%s,"interactions":%d,'
        '"last_event_time":%s,"processed_at":%s}' % (
            _json_text(user),
            ",".join(map(repr, record.vector.astype(float).tolist())),
            _json_text(record.model_version),
            record.n_interactions,
            repr(last) if math.isfinite(last) else "null",
            _json_text(record.processed_at),
        )
    ).encode("utf-8")


def dead_letter_headers(source_topic: str, partition: int, record: RawRecord,
                        rejected: Rejected) -> list[tuple[str, bytes]]:
    headers = [
        ("reason", rejected.reason.encode()),
        ("detail", rejected.detail.encode("utf-8", "replace")),
        ("source_topic", source_topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(record.offset).encode()),
    ]
    return headers + list(record.headers)


class Publisher:
    """Sends outbox entries and dead letters through one (idempotent) kafka-python producer."""

    def __init__(self, producer, output_topic: str, dead_letter_topic: str) -> None:
        self.producer = producer
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self._futures: list = []

    def send_vectors(self, entries: Iterable[OutboxEntry]) -> int:
        n = 0
        for entry in entries:
            self._futures.append(self.producer.send(
                self.output_topic, key=entry.user_id.encode("utf-8"),
                value=vector_message(entry.user_id, entry.record)))
            n += 1
        return n

    def send_dead_letters(self, source_topic: str, partition: int,
                          rejected: Iterable[tuple[RawRecord, Rejected]]) -> int:
        n = 0
        for record, why in rejected:
            self._futures.append(self.producer.send(
                self.dead_letter_topic, key=record.key, value=record.value,
                headers=dead_letter_headers(source_topic, partition, record, why)))
            n += 1
        return n

    def flush(self, timeout_s: float | None = None) -> int:
        """Block until everything sent is acknowledged; :class:`PublishError` if any failed.

        kafka-python's ``flush`` does not raise for failed sends, so every future is checked.
        Returns how many messages were confirmed.
        """
        futures, self._futures = self._futures, []
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise PublishError(f"producer flush failed: {exc!r}") from exc
        for future in futures:
            if not future.is_done:
                raise PublishError(f"a send was not acknowledged within {timeout_s}s")
            if future.failed():
                raise PublishError(f"publishing failed: {future.exception!r}")
        return len(futures)
