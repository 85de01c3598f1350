"""Keep a slow broker from starving the consumer: lengthen the fetch wait while polls come
back empty although records lie between our positions and the log end.

A Fetch request carries ``max_wait_ms``. Apache Kafka answers as soon as it has records, so
the wait only matters on an idle topic. The embedded Tansu broker answers when the wait is
over with what it has read by then; when reading takes it longer than the wait (a loaded
host, a large in-memory log), it answers with nothing, fetch after fetch, while the log
grows. The soak benchmark saw it: at ``fetch_max_wait_ms`` = 20, kafka-python read 0
records for minutes from partitions 100,000s of records behind, while librdkafka, waiting
500 ms, read the same offsets at once; at 0, Tansu never returns a record.

:class:`FetchWaitGuard` watches for that after every poll: once polls have returned
nothing for ``check_after_s`` while some partition's position is behind its log end, it
doubles the wait kafka-python puts in its Fetch requests (from at least 10 ms, up to
``cap_ms``); after ``relax_after_s`` of polls with records it halves it again, down to the
configured value. Against Apache Kafka it never fires: there an empty poll means no records.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)

CAP_MS = 500  # kafka-python's own default wait
FLOOR_MS = 10  # the first step up from a wait of 0


class FetchWaitGuard:
    """Adapts kafka-python's ``fetch_max_wait_ms`` to a broker that answers empty when slow.

    Parameters
    ----------
    consumer : kafka.KafkaConsumer
        Its fetcher's ``config["fetch_max_wait_ms"]`` is what each Fetch request carries
        (kafka-python 2.x and 3.x); where that is missing the guard only logs, once.
    configured_ms : int
        The configured wait (``kafka.fetch_max_wait_ms``), the one kept while records flow.
    cap_ms, check_after_s, relax_after_s : see the module docstring.
    clock : callable
        Seconds, monotonic (tests pass their own).
    """

    def __init__(self, consumer, configured_ms: int, *, cap_ms: int = CAP_MS,
                 check_after_s: float = 1.0, relax_after_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.configured_ms = int(configured_ms)
        self.cap_ms = max(int(cap_ms), self.configured_ms)
        self.check_after_s = check_after_s
        self.relax_after_s = relax_after_s
        self.clock = clock
        self.current_ms = self.configured_ms
        self.raised = 0  # times the wait was raised (for logs and tests)
        self._empty_since: float | None = None
        self._flowing_since: float | None = None
        config = getattr(getattr(consumer, "_fetcher", None), "config", None)
        self._config = config if isinstance(config, dict) and "fetch_max_wait_ms" in config else None

    def after_poll(self, records: int, behind: Callable[[], Mapping[object, int]]) -> None:
        """Call after each poll with the number of records it returned; ``behind()`` gives
        the records between each fetchable partition's position and its log end (asked
        only after ``check_after_s`` of empty polls: it costs a broker round trip)."""
        now = self.clock()
        if records:
            self._empty_since = None
            if self.current_ms > self.configured_ms:
                if self._flowing_since is None:
                    self._flowing_since = now
                elif now - self._flowing_since >= self.relax_after_s:
                    self._set(max(self.configured_ms, self.current_ms // 2))
                    log.info("records flow again: fetch wait back down to %d ms", self.current_ms)
                    self._flowing_since = now
            return
        self._flowing_since = None
        if self._empty_since is None:
            self._empty_since = now
            return
        empty_s = now - self._empty_since
        if empty_s < self.check_after_s or self.current_ms >= self.cap_ms:
            return
        self._empty_since = now
        lag = {tp: n for tp, n in behind().items() if n > 0}
        if not lag:
            return
        if self._config is None:
            if not self.raised:
                log.warning("polls return nothing while %d records wait behind the log end, and "
                            "this kafka-python has no fetcher config to lengthen the fetch wait in",
                            sum(lag.values()))
            self.raised += 1
            return
        before = self.current_ms
        self._set(min(self.cap_ms, max(FLOOR_MS, 2 * self.current_ms)))
        self.raised += 1
        log.warning("the broker returned no records for %.1f s while %d records wait behind the "
                    "log end of %d partitions: fetch wait %d -> %d ms (a broker that answers a "
                    "fetch only with what it read within the wait, as the embedded Tansu does "
                    "when loaded, would otherwise starve this consumer)",
                    empty_s, sum(lag.values()), len(lag), before, self.current_ms)

    def _set(self, wait_ms: int) -> None:
        self.current_ms = wait_ms
        if self._config is not None:
            self._config["fetch_max_wait_ms"] = wait_ms
