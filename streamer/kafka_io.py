"""Kafka plumbing helpers: topic creation and kafka-python client factories.

Consumers hand out raw bytes (no deserializers): validation happens once, in
``streamer.events``. Offsets are committed explicitly, never automatically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError, for_code

from streamer import fast_fetch, group_join
from streamer.errors import TopicMismatchError

PRODUCER_DEFAULTS: Mapping[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,  # set explicitly, so a conflicting override raises instead of silently dropping it
    "linger_ms": 5,
}

# librdkafka settings of the vector publisher. Idempotence implies acks=all and ordered,
# de-duplicated retries per partition. Every micro-batch ends in a flush, so a short
# linger only groups one batch's vectors; the queue holds several large batches.
VECTOR_PRODUCER_DEFAULTS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    "message.timeout.ms": 120_000,
}

CONSUMER_DEFAULTS: Mapping[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
}




@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: ``TopicSpec("user-vectors", 4, {"cleanup.policy": "compact"})``."""

    name: str
    partitions: int = 1
    configs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("topic name must not be empty")
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions} for topic {self.name!r}")
        for key, value in self.configs.items():
            if not isinstance(value, str):
                raise ValueError(f"topic config values must be str, got {key}={value!r} for {self.name!r}")


def create_topics(bootstrap: str, specs: Iterable[TopicSpec], *, timeout_ms: int = 10_000) -> list[str]:
    """Create the topics that do not exist yet; return the names created, in spec order.

    An existing topic is accepted when its partition count and every config named in
    its spec match; otherwise :class:`TopicMismatchError` (the per-partition state and a
    compacted output topic both depend on it). Replication factor is always 1.
    """
    specs = list(specs)
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError(f"topic names must be unique, got {[spec.name for spec in specs]}")
    if not specs:
        return []
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        request = {spec.name: {"num_partitions": spec.partitions, "replication_factor": 1,
                               "configs": dict(spec.configs)} for spec in specs}
        response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
        created, existing = [], []
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if error is TopicAlreadyExistsError:
                existing.append(result["name"])
            elif result["error_code"] != 0:
                raise error(f"creating topic {result['name']!r} failed: {result['error_message']}")
            else:
                created.append(result["name"])
        if existing:
            _check_existing(admin, [spec for spec in specs if spec.name in existing])
        return [spec.name for spec in specs if spec.name in created]
    finally:
        admin.close()


def describe_topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    """Configs the broker reports for ``topic`` (Tansu reports only those set at creation)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return _topic_configs(admin, topic)
    finally:
        admin.close()


def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A kafka-python producer: idempotent, ``acks="all"``, 5 ms linger; no serializers.

    ``overrides`` are KafkaProducer keyword arguments and win over the defaults.
    """
    return KafkaProducer(bootstrap_servers=bootstrap, **{**PRODUCER_DEFAULTS, **overrides})


def make_vector_producer(bootstrap: str, client_id: str, **overrides: Any):
    """The librdkafka (``confluent_kafka.Producer``) producer that publishes vectors.

    ``overrides`` are librdkafka configuration properties (dotted names) and win over
    :data:`VECTOR_PRODUCER_DEFAULTS`; a fatal producer error is logged by librdkafka and
    surfaces as failed deliveries in :meth:`streamer.publisher.Publisher.flush`.
    """
    from confluent_kafka import Producer

    config = {**VECTOR_PRODUCER_DEFAULTS, **overrides,
              "bootstrap.servers": bootstrap, "client.id": client_id}
    return Producer(config, logger=_RDKAFKA_LOG)


_RDKAFKA_LOG = logging.getLogger("streamer.librdkafka")


def make_consumer(bootstrap: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A kafka-python consumer in ``group_id`` with auto-commit off, reading from the earliest
    offset when the group has none; no deserializers, so values arrive as ``bytes`` (or None).

    Not subscribed to anything: call ``subscribe`` or ``assign``. ``overrides`` are
    KafkaConsumer keyword arguments; session/heartbeat timeouts stay at kafka-python's
    defaults unless given (a Tansu group join takes about half the session timeout).
    Fetched records are parsed by :mod:`streamer.fast_fetch` (kafka-python's parser for
    what that leaves to it), and a group join that finishes between two polls is kept
    (:mod:`streamer.group_join`).
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id,
                             **{**CONSUMER_DEFAULTS, **overrides})
    fast_fetch.install(consumer)
    group_join.install(consumer)
    return consumer


def _check_existing(admin: KafkaAdminClient, specs: list[TopicSpec]) -> None:
    described = {topic["name"]: topic for topic in admin.describe_topics([spec.name for spec in specs])}
    for spec in specs:
        partitions = len(described[spec.name]["partitions"])
        if partitions != spec.partitions:
            raise TopicMismatchError(f"topic {spec.name!r} exists with {partitions} partitions, "
                                     f"expected {spec.partitions}")
        actual = _topic_configs(admin, spec.name)
        for key, value in spec.configs.items():
            if actual.get(key) != value:
                raise TopicMismatchError(f"topic {spec.name!r} exists with {key}={actual.get(key)!r}, "
                                         f"expected {value!r}")


def _topic_configs(admin: KafkaAdminClient, topic: str) -> dict[str, str]:
    # config_filter="all": Tansu labels creation-time configs DEFAULT_CONFIG, which the
    # default "modified" filter drops. No key list: Tansu drops the connection on one.
    result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    return {name: entry["value"] for name, entry in result.get("topic", {}).get(topic, {}).items()}
