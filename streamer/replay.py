"""Replaying an interaction log into the input topic (``foldstream produce``, the demo)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Callable, Iterator

import numpy as np

from factors.data import Interactions


def event_messages(inter: Interactions, id_prefix: str | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs in time order, following the producer contract.

    With ``id_prefix`` each event gets ``event_id = f"{id_prefix}-{row}"`` (its row in the
    log), so replaying the same log twice is dropped as duplicates by the consumer.
    """
    order = np.argsort(inter.timestamps, kind="stable")
    users, items = inter.user_ids.ids, inter.item_ids.ids
    for row in order.tolist():
        user = users[inter.users[row]]
        doc = {"user": user, "item": items[inter.items[row]],
               "weight": float(inter.weights[row])}
        ts = float(inter.timestamps[row])
        if math.isfinite(ts):
            doc["ts"] = ts
        if id_prefix is not None:
            doc["event_id"] = f"{id_prefix}-{row}"
        yield user.encode("utf-8"), json.dumps(doc, ensure_ascii=False).encode("utf-8")


def log_fingerprint(inter: Interactions) -> str:
    """A short stable id of a log's content, the default event-id prefix."""
    h = hashlib.sha256()
    for array in (inter.users, inter.items, inter.weights, inter.timestamps):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:12]


def produce(producer, topic: str, messages, *, rate: float | None = None,
            on_progress: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> int:
    """Send ``messages`` at up to ``rate`` per second (None: as fast as possible); flush."""
    sent = 0
    started = time.monotonic()
    for key, value in messages:
        if should_stop is not None and sent % 1000 == 0 and should_stop():
            break
        producer.send(topic, key=key, value=value)
        sent += 1
        if rate and sent % 100 == 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if on_progress is not None and sent % 5000 == 0:
            on_progress(sent)
    producer.flush()
    if on_progress is not None:
        on_progress(sent)
    return sent
