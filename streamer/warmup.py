"""Compile the consumer's numba kernels before it joins a group.

numba compiles a kernel on its first call, or loads it from its cache (``NUMBA_CACHE_DIR``,
else ``__pycache__`` beside the source) when a previous process compiled it for this CPU.
On a fresh install the consumer's first turns would compile some forty kernels (record
batch parsing, event decoding, history merge and encode, item lookup, the fold-in and the
normal-equation cache, serial and on the thread pool): about a minute on a 2-core machine
(48 s, and 20 s more for the thread-pool solves of a large batch), holding the GIL, inside
a group membership, with the records of that turn waiting. :func:`compile_kernels` runs the same
path once on a few synthetic events against a scratch store, so that the cost is paid
(or, with a warm cache, the kernels loaded) before the consumer subscribes.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from kafka.record.default_records import DefaultRecordBatchBuilder

from streamer.config import ProcessingConfig
from streamer.fast_fetch import parse_partition
from streamer.model import LoadedModel
from streamer.processor import PartitionProcessor, RawRecord
from streamer.store import PartitionStore

__all__ = ["compile_kernels", "compile_kernels_once"]

_USERS = 8
_lock = threading.Lock()
_compiled = False  # in this process


def _record_batch(messages: list[tuple[bytes | None, bytes | None]]) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 22)
    now_ms = int(time.time() * 1000)
    for offset, (key, value) in enumerate(messages):
        builder.append(offset, timestamp=now_ms, key=key, value=value, headers=[])
    return bytes(builder.build())


def _event(user: str, item: str, ts: float, event_id: str | None = None) -> tuple[bytes, bytes]:
    doc = {"user": user, "item": item, "ts": ts, "weight": 1.0}
    if event_id is not None:
        doc["event_id"] = event_id
    return user.encode(), json.dumps(doc).encode()


def compile_kernels(model: LoadedModel, config: ProcessingConfig) -> float:
    """Run the consumer's kernels once on synthetic events; returns the seconds it took.

    Touches nothing outside a temporary directory: the scratch store lives and dies there.
    Batches: events of a few users (new histories, short-row fold-in), the same users again
    with one long history (the normal-equation cache fills), once more (it updates), a batch
    with a forget and a malformed record (the record-by-record decode path), and one solved
    on numba's thread pool (the kernels a large batch takes).
    """
    started = time.perf_counter()
    # A long row (more known items than the Woodbury cutoff) takes the cached path.
    items = list(model.item_index)[:model.solver.woodbury_max + 2] or ["warm-up-item"]
    batches: list[list[tuple[bytes | None, bytes | None]]] = [
        [_event(f"warm-{u}", items[(u + j) % len(items)], 1.0 + j, f"w{u}-{j}")
         for u in range(_USERS) for j in range(3)],
        [_event("warm-long", item, 10.0 + j) for j, item in enumerate(items)]
        + [_event(f"warm-{u}", items[u % len(items)], 20.0) for u in range(_USERS)],
        [_event("warm-long", items[0], 30.0), _event("warm-0", items[1], 31.0, "w0-0")],
        [(b"warm-1", None), (b"warm-2", b"{not json"), _event("warm-3", items[2], 40.0)],
        # Solved on numba's thread pool, as batches of more than SERIAL_MAX_ROWS users are
        # (a drain: a consumer restarted behind its partitions meets one at once).
        [_event("warm-long", items[1], 50.0), _event("warm-4", items[3], 51.0)],
    ]
    processor = PartitionProcessor(config)
    with tempfile.TemporaryDirectory(prefix="foldstream-warmup-") as scratch:
        with PartitionStore.open(Path(scratch), "warm-up", 0) as store:
            offset = 0
            for messages in batches:
                parsed = parse_partition("warm-up", 0, _record_batch(messages), 0)
                if parsed is None:
                    raise RuntimeError("warm-up: the record-batch parser refused its own batch")
                records = [RawRecord(offset + r.offset, r.key, r.value, r.timestamp) for r in parsed[0]]
                offset += len(records)
                decoded, outcome = processor.decode(store, records)
                processor.apply(store, decoded, outcome, model,
                                serial=False if messages is batches[-1] else None)
    processor.close()
    return time.perf_counter() - started


def compile_kernels_once(model: LoadedModel, config: ProcessingConfig) -> float | None:
    """:func:`compile_kernels` on the first call in this process; None on later ones (the
    kernels stay compiled for the life of the process)."""
    global _compiled
    with _lock:
        if _compiled:
            return None
        seconds = compile_kernels(model, config)
        _compiled = True
        return seconds
