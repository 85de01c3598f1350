"""A consumer process that stalls in the middle of its first non-empty micro-batch.

    python -m tests.faults.stalling_consumer CONFIG STALLED WAKE [sleep|sigstop]

The first time :meth:`PartitionProcessor.decode` gets records (poll done, nothing written),
the process writes the file STALLED (``{"partition": P, "first": O1, "last": O2}``), then

- ``sleep`` (default): sleeps until the file WAKE exists (at most ``MAX_STALL_S``); its
  heartbeat thread meanwhile leaves the group once ``max_poll_interval_ms`` has passed;
- ``sigstop``: stops itself with SIGSTOP, every thread at once; the group coordinator
  evicts it when heartbeats stop for a session timeout; the test sends SIGCONT.

Then it carries on as usual.

It prints ``STALL ...`` and ``WAKE`` around the stall and ``WRITE partition=P offset=O``
for every micro-batch written, on the stream its logging ("assignment: ...") goes to, so
the output shows which writes happened between waking and learning of the new assignment.
The production code has no fault hooks: this script patches the methods it wraps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from streamer.config import load_config
from streamer.processor import PartitionProcessor
from streamer.service import FoldService
from streamer.store import PartitionStore
from streamer.warmup import compile_kernels_once

MAX_STALL_S = 120.0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    config_path, stalled, wake = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "sleep"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = FoldService(load_config(config_path))
    # Before the patches: the warm-up's scratch store is not the first batch to stall in.
    compile_kernels_once(service.model, service.config.processing)
    original_decode = PartitionProcessor.decode
    original_commit = PartitionStore.commit_batch
    state = {"stalled": False}

    def decode(self, store, records):
        if records and not state["stalled"]:
            state["stalled"] = True
            span = {"partition": store.partition, "first": records[0].offset, "last": records[-1].offset}
            say(f"STALL {json.dumps(span)}")
            stalled.write_text(json.dumps(span))
            if mode == "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)
            deadline = time.monotonic() + MAX_STALL_S
            while mode == "sleep" and not wake.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            say("WAKE")
        return original_decode(self, store, records)

    def commit_batch(self, histories, vectors, deletes, offset, model_version=None, **parts):
        entries = original_commit(self, histories, vectors, deletes, offset, model_version=model_version, **parts)
        say(f"WRITE partition={self.partition} offset={offset}")
        return entries

    PartitionProcessor.decode = decode
    PartitionStore.commit_batch = commit_batch
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    say("SIGTERM/SIGINT finish the batch")  # what ConsumerProcess.terminate waits for
    stats = service.run()
    say(f"stopped: applied {stats.applied}")


if __name__ == "__main__":
    main()
