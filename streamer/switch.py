"""Live model switch of one partition store, and the models the consumer keeps loaded.

Each partition store records the model version its vectors were folded against (store
meta), and the consumer folds a partition's batches against that version. When the
registry's ACTIVE version differs, :func:`switch_partition` moves one partition over:

1. read every stored history of the partition (one consistent RocksDB iterator);
2. fold them in against the new model, ``SWITCH_CHUNK_USERS`` histories per batched
   exact solve (the same :meth:`streamer.model.LoadedModel.fold` the micro-batches use);
3. write every new vector, an outbox entry per user and the partition's new model version
   in ONE WriteBatch (:meth:`streamer.store.PartitionStore.commit_model_switch`): after
   any crash the partition is wholly on the old model or wholly on the new one;
4. the caller publishes the outbox entries, flushes, then acknowledges them, exactly as it
   does a micro-batch's (a crash before the acknowledgement re-sends them at start-up).

The applied offset does not move, so no event is skipped or applied twice by a switch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from streamer.codec import OutboxEntry, VectorRecord
from streamer.model import LoadedModel
from streamer.registry import ModelRegistry
from streamer.store import PartitionStore

log = logging.getLogger(__name__)

# Histories per batched solve during a switch: bounds the arrays of one solve (about
# 40 bytes per event) while keeping the per-call overhead negligible.
SWITCH_CHUNK_USERS = 4_096
# Models kept loaded: the active one and the one partitions are still leaving.
CACHED_MODELS = 2


@dataclass
class SwitchOutcome:
    """What one partition's switch wrote; ``outbox`` is for the caller to publish and ack."""

    partition: str
    from_version: str | None
    to_version: str
    users: int = 0
    seconds: float = 0.0
    outbox: list[OutboxEntry] = field(default_factory=list)


def refold(store: PartitionStore, model: LoadedModel,
           chunk_users: int = SWITCH_CHUNK_USERS) -> dict[str, VectorRecord]:
    """Steps 1-2: every stored user's vector against ``model``, tagged with its version."""
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    records: dict[str, VectorRecord] = {}
    users, histories = [], []

    def fold_chunk() -> None:
        vectors, _ = model.fold(histories)
        records.update(zip(users, VectorRecord.many(
            vectors, model.version, [len(h) for h in histories],
            [h.last_event_time for h in histories], time.time())))
        users.clear()
        histories.clear()

    for user, history in store.iter_users():
        users.append(user)
        histories.append(history)
        if len(users) >= chunk_users:
            fold_chunk()
    if users:
        fold_chunk()
    return records


def switch_partition(store: PartitionStore, model: LoadedModel,
                     chunk_users: int = SWITCH_CHUNK_USERS) -> SwitchOutcome:
    """Steps 1-3 for one partition store; the caller publishes and acks ``outbox`` (step 4)."""
    started = time.perf_counter()
    outcome = SwitchOutcome(store.name, store.model_version(), model.version)
    vectors = refold(store, model, chunk_users)
    outcome.outbox = store.commit_model_switch(vectors, model.version)
    outcome.users = len(vectors)
    outcome.seconds = time.perf_counter() - started
    log.info("%s switched from model %s to %s: %d users re-folded in %.2fs", store.name,
             outcome.from_version, model.version, outcome.users, outcome.seconds)
    return outcome


class ModelCache:
    """Loaded models by version: the active one (pinned) and at most one other.

    While partitions move from one version to the next, their batches fold against their
    stored version: keeping that one loaded beside the active one avoids reloading it per
    batch. A third version (ACTIVE changed twice before every partition caught up) evicts
    the other one; it is reloaded if a partition still needs it.
    """

    def __init__(self, registry: ModelRegistry, size: int = CACHED_MODELS) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.registry = registry
        self.size = size
        self.active: str | None = None
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def __contains__(self, version: str) -> bool:
        return version in self._models

    def __len__(self) -> int:
        return len(self._models)

    def get(self, version: str | None) -> LoadedModel:
        """The model of ``version`` (None: the registry's active one), loaded when not cached."""
        model = None if version is None else self._models.get(version)
        if model is not None:
            self._models.move_to_end(version)
            return model
        model = LoadedModel(self.registry.load(version))
        version = model.version
        self._models[version] = model
        while len(self._models) > self.size:  # least recently used, sparing the active one
            victim = next((v for v in self._models if v not in (self.active, version)),
                          next(iter(self._models)))
            del self._models[victim]
        return model

    def activate(self, version: str | None = None) -> LoadedModel:
        """Load ``version`` (None: the registry's active one) and pin it as the active model."""
        model = self.get(version)
        self.active = model.version
        return model
