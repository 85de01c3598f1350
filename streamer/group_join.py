"""Keep a group join that finished while no ``poll`` waited for it.

kafka-python 3.0 runs each JoinGroup -> SyncGroup round trip as a task on its network
thread. ``KafkaConsumer.poll(timeout_ms=N)`` waits for that task at most ``N`` ms and leaves
it running; the next ``poll`` waits again. But when the task finishes between two polls
(while the caller decodes and applies a batch), the next poll finds it done and starts a
new JoinGroup: the assignment it received is dropped. Every join then costs another
rebalance of the whole group, and the loop goes on for as long as joins keep finishing
between polls. With foldstream's short polls (``processing.batch_max_ms``) and a Tansu
broker, which answers a JoinGroup about half a session timeout after it arrives, a
consumer's first join was measured repeating 3 times on a quick host; a loop polling for
10 ms every 60 ms took 27 to 261 s (up to 413 JoinGroups) to get its partitions. One of
those repeated joins was never answered in a CI run, and the consumer waited the
JoinGroup's own timeout (``max_poll_interval_ms`` + 5 s).

:func:`install` wraps one consumer's coordinator so that a finished round trip whose
assignment nobody took answers the next attempt of the same generation itself, with no
request to the broker; kafka-python's own loop then completes the join as if it had
waited. A generation changed in between (a failed heartbeat, a reset) means a real join.

This leans on kafka-python internals (``_coordinator``, ``_do_join_and_sync_async``,
``_on_join_complete_async``, ``_generation``), so it only acts on the versions it was
checked against (:data:`CHECKED_VERSIONS`) and otherwise leaves the consumer as it is.
"""

from __future__ import annotations

import logging

import kafka

__all__ = ["CHECKED_VERSIONS", "install"]

log = logging.getLogger(__name__)

#: kafka-python versions whose group coordinator this module was checked against.
CHECKED_VERSIONS = ("3.0.",)


class _KeptJoin:
    """The wrappers of one coordinator's join round trip and join completion."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator
        self.join_and_sync = coordinator._do_join_and_sync_async
        self.complete = coordinator._on_join_complete_async
        # (generation, assignment bytes) of the last round trip, until a join completes with it.
        self.unclaimed: tuple[object, bytes] | None = None

    async def do_join_and_sync(self):
        kept = self.unclaimed
        if kept is not None and kept[0] is self.coordinator._generation:
            # Kept until a join completes with it: this answer may be missed by a poll too.
            log.info("group %s: completing the join of generation %s that finished between "
                     "two polls (no new JoinGroup)", self.coordinator.group_id,
                     self.coordinator._generation.generation_id)
            return kept[1]
        self.unclaimed = None
        assignment = await self.join_and_sync()
        self.unclaimed = (self.coordinator._generation, assignment)
        return assignment

    async def on_join_complete(self, *args, **kwargs):
        self.unclaimed = None
        return await self.complete(*args, **kwargs)


def install(consumer) -> bool:
    """Make ``consumer`` (a ``KafkaConsumer`` with a group) keep a finished join for its
    next poll; False (and the consumer unchanged) on a kafka-python version it was not
    checked against or without a group."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or consumer.config.get("group_id") is None:
        return False
    if not kafka.__version__.startswith(CHECKED_VERSIONS):
        log.warning("kafka-python %s: a group join that finishes between two polls is "
                    "repeated (checked against %s)", kafka.__version__, CHECKED_VERSIONS)
        return False
    kept = _KeptJoin(coordinator)
    coordinator._do_join_and_sync_async = kept.do_join_and_sync
    coordinator._on_join_complete_async = kept.on_join_complete
    return True
