"""Fixtures shared by every test package.

Kafka: one real Tansu broker for the whole session (``kafka_broker``), and factories
that create unique topics and short-timeout clients on it, closing the clients at teardown.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Iterator

import pytest

from streamer.broker import EmbeddedBroker
from streamer.kafka_io import TopicSpec, create_topics, make_consumer, make_producer

# Tansu completes a group join about session_timeout_ms / 2 after the first JoinGroup, and
# notices a silently dead member after about 1.5 x session_timeout_ms; kafka-python's
# defaults (45 s / 3 s) make a join take ~23 s. Leave max_poll_interval_ms alone: lowering
# it makes Tansu joins slower, not faster.
FAST_GROUP_CONFIG: dict[str, Any] = {
    "session_timeout_ms": 2_000,
    "heartbeat_interval_ms": 100,
}


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One in-memory Tansu broker on a free loopback port for the whole test session."""
    with EmbeddedBroker(tmp_path_factory.mktemp("kafka-broker")) as broker:
        yield broker


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("group")`` -> ``"group-test_x-1a2b3c4d"``: names that never collide across tests."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60]

    def make(prefix: str) -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"
    return make


@pytest.fixture
def make_topic(kafka_broker: EmbeddedBroker, unique_name: Callable[[str], str]) -> Callable[..., str]:
    """``make_topic(partitions=1, compact=False)`` creates a fresh topic and returns its name."""
    def make(partitions: int = 1, compact: bool = False) -> str:
        name = unique_name("topic")
        configs = {"cleanup.policy": "compact"} if compact else {}
        create_topics(kafka_broker.bootstrap, [TopicSpec(name, partitions, configs)])
        return name
    return make


@pytest.fixture
def make_consumer_config() -> Callable[..., dict[str, Any]]:
    """``make_consumer_config(**overrides)`` -> KafkaConsumer kwargs with second-scale group timeouts."""
    def make(**overrides: Any) -> dict[str, Any]:
        return {**FAST_GROUP_CONFIG, **overrides}
    return make


@pytest.fixture
def make_kafka_consumer(kafka_broker: EmbeddedBroker,
                        make_consumer_config: Callable[..., dict[str, Any]]):
    """``make_kafka_consumer(group_id=None, **overrides)``: a fast-timeout consumer, closed at teardown."""
    consumers = []

    def make(group_id: str | None = None, **overrides: Any):
        consumer = make_consumer(kafka_broker.bootstrap, group_id, **make_consumer_config(**overrides))
        consumers.append(consumer)
        return consumer
    yield make
    for consumer in consumers:
        consumer.close(autocommit=False)


@pytest.fixture
def make_kafka_producer(kafka_broker: EmbeddedBroker):
    """``make_kafka_producer(**overrides)``: an idempotent producer, closed at teardown."""
    producers = []

    def make(**overrides: Any):
        producer = make_producer(kafka_broker.bootstrap, **overrides)
        producers.append(producer)
        return producer
    yield make
    for producer in producers:
        producer.close(timeout=5)
