"""A consumer process that SIGKILLs itself at a chosen stage of its Nth micro-batch.

    python -m tests.faults.crashing_consumer CONFIG STAGE N

STAGE is where in the commit protocol the process dies (streamer/service.py, steps 4-6):
``before_write`` (state computed, nothing written), ``after_write`` (WriteBatch done, nothing
published), ``after_publish`` (vectors acknowledged, Kafka offsets not committed). For a
model switch (streamer/switch.py), N counts partition switches instead of batches:
``switch_before_write`` (every vector re-folded, nothing written) and ``switch_after_write``
(the switch's WriteBatch done, its outbox not published). The production code has no fault
hooks: this script patches the methods it wraps.
"""

from __future__ import annotations

import os
import signal
import sys

from streamer.config import load_config
from streamer.service import FoldService
from streamer.store import PartitionStore
from streamer.warmup import compile_kernels_once


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    config_path, stage, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    service = FoldService(load_config(config_path))
    # Before the patches: the warm-up's scratch-store writes are not the batches counted.
    compile_kernels_once(service.model, service.config.processing)
    calls = {"batches": 0, "switches": 0}
    original_commit = PartitionStore.commit_batch
    original_switch = PartitionStore.commit_model_switch
    original_commit_offsets = FoldService._commit

    def dying_around(original, counter: str, before: str, after: str):
        """``original``, killed before or after its n-th call at those stages."""
        def wrapped(self, *args, **kwargs):
            calls[counter] += 1
            if stage == before and calls[counter] == n:
                die()
            entries = original(self, *args, **kwargs)
            if stage == after and calls[counter] == n:
                die()
            return entries
        return wrapped

    def commit_offsets(self, sync):
        if stage == "after_publish" and calls["batches"] >= n:
            die()
        return original_commit_offsets(self, sync)

    PartitionStore.commit_batch = dying_around(original_commit, "batches", "before_write", "after_write")
    PartitionStore.commit_model_switch = dying_around(original_switch, "switches", "switch_before_write",
                                                      "switch_after_write")
    FoldService._commit = commit_offsets
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    service.run()


if __name__ == "__main__":
    main()
