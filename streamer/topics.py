"""The three topics foldstream uses, created on start-up when missing."""

from __future__ import annotations

from streamer.config import KafkaConfig
from streamer.kafka_io import TopicSpec, create_topics


def topic_specs(config: KafkaConfig) -> list[TopicSpec]:
    """Input keyed by user (several partitions), compacted output, dead letters."""
    return [
        TopicSpec(config.input_topic, config.input_partitions),
        TopicSpec(config.output_topic, config.input_partitions, {"cleanup.policy": "compact"}),
        TopicSpec(config.dead_letter_topic, 1),
    ]


def ensure_topics(config: KafkaConfig) -> list[str]:
    """Create whichever of the three topics do not exist; return the names created."""
    return create_topics(config.bootstrap_servers, topic_specs(config))
