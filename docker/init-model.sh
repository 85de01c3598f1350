#!/bin/sh
# One-shot model initialiser (docker-compose service `model-init`; in the image as
# /usr/local/bin/foldstream-init-model). When the registry (model.registry_dir) has no active
# model: synthesise an interaction log, train on it, add the model and promote it. When
# `foldstream model show` succeeds there is an active model already, and it does nothing.
#
# SYNTH_USERS, SYNTH_ITEMS, SYNTH_EVENTS, SYNTH_SEED  size of the log (foldstream synth)
# TRAIN_ARGS  extra `foldstream train` options, e.g. "--factors 32 --iterations 10"
set -eu

if foldstream model show >/dev/null 2>&1; then
    echo "model-init: the registry has an active model; nothing to do"
    foldstream model list
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "model-init: no active model; training a first one on synthetic data"
foldstream synth --out "$work/events.csv" --users "${SYNTH_USERS:-5000}" \
    --items "${SYNTH_ITEMS:-2000}" --events "${SYNTH_EVENTS:-200000}" --seed "${SYNTH_SEED:-0}"
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
foldstream train --interactions "$work/events.csv" --out "$work/model" ${TRAIN_ARGS:-}
foldstream model add "$work/model" --promote
