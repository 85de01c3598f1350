#!/bin/sh
# One-shot topic initialiser (docker-compose service `topics`, run in the apache/kafka image
# with Kafka's own kafka-topics.sh). Creates the three topics of streamer/topics.py unless
# they exist, named and sized by the FOLDSTREAM_KAFKA__* variables the consumer reads:
#   input        FOLDSTREAM_KAFKA__INPUT_PARTITIONS partitions (keyed by user)
#   output       as many partitions, cleanup.policy=compact (the latest vector per user)
#   dead letters 1 partition
# An existing topic is left as it is; `foldstream run` checks its partitions and
# cleanup.policy at start-up and refuses a mismatch.
set -eu

: "${FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS:?}" "${FOLDSTREAM_KAFKA__INPUT_TOPIC:?}"
: "${FOLDSTREAM_KAFKA__OUTPUT_TOPIC:?}" "${FOLDSTREAM_KAFKA__DEAD_LETTER_TOPIC:?}"
: "${FOLDSTREAM_KAFKA__INPUT_PARTITIONS:?}"
KAFKA_TOPICS="${TOPICS_TOOL:-/opt/kafka/bin/kafka-topics.sh}"  # TOPICS_TOOL: for tests

create() {  # NAME PARTITIONS [--config KEY=VALUE ...]
    name="$1" partitions="$2"
    shift 2
    "$KAFKA_TOPICS" --bootstrap-server "$FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS" --create \
        --if-not-exists --topic "$name" --partitions "$partitions" --replication-factor 1 "$@"
    echo "topics: $name ready"
}

create "$FOLDSTREAM_KAFKA__INPUT_TOPIC" "$FOLDSTREAM_KAFKA__INPUT_PARTITIONS"
create "$FOLDSTREAM_KAFKA__OUTPUT_TOPIC" "$FOLDSTREAM_KAFKA__INPUT_PARTITIONS" \
    --config cleanup.policy=compact
create "$FOLDSTREAM_KAFKA__DEAD_LETTER_TOPIC" 1
