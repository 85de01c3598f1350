#!/bin/sh
# Load generator (docker-compose service `load`, profile `load`; in the image as
# /usr/local/bin/foldstream-load): synthesise an interaction log and replay it into the
# input topic with `foldstream produce`, LOAD_RATE events per second (unset or empty: as
# fast as the broker takes them). The SYNTH_* variables mean what they mean for
# foldstream-init-model; with the same values the log is the one the first model learnt.
set -eu

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

foldstream synth --out "$work/events.csv" --users "${SYNTH_USERS:-5000}" \
    --items "${SYNTH_ITEMS:-2000}" --events "${SYNTH_EVENTS:-200000}" --seed "${SYNTH_SEED:-0}"
foldstream produce --interactions "$work/events.csv" ${LOAD_RATE:+--rate "$LOAD_RATE"}
