"""Keep a Fetch in flight while a turn is applied.

kafka-python sends a Fetch request only from inside ``KafkaConsumer.poll()``. A loop that
polls once and then waits for its turn thread leaves every partition unfetched for the rest
of that turn: a record produced then waits a whole turn before the broker is even asked for
it, and the longer the turn, the longer the wait (measured at 10,000 events/s: that wait was
most of a record's age when ``poll`` returned it).

Polling again with ``timeout_ms=0`` would send the next Fetch, but when nothing is buffered
kafka-python 3.0 then waits out the zero timeout, and each such wait leaves a
``KafkaTimeoutError`` in a reference cycle that holds the poll's frames, its callers' and
the Fetch responses they reached (see ``FoldService.run_once``): measured, about 1,000 of
them in 45 s made a 150 ms garbage collection. :class:`FetchAhead` does what ``poll`` does
between those waits and nothing else: when no Fetch is out, take the records the fetcher
has buffered and send the next Fetch, never waiting.

This leans on the fetcher's ``in_flight_fetches``, ``fetched_records`` and
``send_fetches`` (the steps of kafka-python 3.0's ``Fetcher.fetch_records``), so
:func:`fetch_ahead` returns None for versions it was not checked against
(:data:`CHECKED_VERSIONS`), and the service then simply waits for its turn. Group
membership, offset resets and commits still happen in the service's regular ``poll()``,
once per turn.
"""

from __future__ import annotations

import logging

import kafka

__all__ = ["CHECKED_VERSIONS", "FetchAhead", "fetch_ahead"]

log = logging.getLogger(__name__)

#: kafka-python versions whose fetcher this module was checked against.
CHECKED_VERSIONS = ("3.0.",)


class FetchAhead:
    """Takes a consumer's buffered records and sends its next Fetch, never waiting.

    Parameters
    ----------
    fetcher : kafka.consumer.fetcher.Fetcher
        The consumer's fetcher (``KafkaConsumer._fetcher``).
    """

    def __init__(self, fetcher) -> None:
        self._fetcher = fetcher

    def in_flight(self) -> bool:
        """Whether a Fetch request is out (sent, not yet answered)."""
        return self._fetcher.in_flight_fetches()

    def take(self, max_records: int) -> dict:
        """Up to ``max_records`` buffered records per partition, as ``poll()`` returns them,
        with the next Fetch sent once the buffer is empty; ``{}`` while a Fetch is out."""
        fetcher = self._fetcher
        if fetcher.in_flight_fetches():
            return {}
        records, partial = fetcher.fetched_records(max_records)
        if not partial:
            fetcher.send_fetches()
        return records


def fetch_ahead(consumer) -> FetchAhead | None:
    """A :class:`FetchAhead` for ``consumer``, or None where kafka-python is not a checked
    version or its fetcher lacks a step."""
    if not kafka.__version__.startswith(CHECKED_VERSIONS):
        log.info("kafka-python %s: not fetching ahead during turns (checked: %s)",
                 kafka.__version__, ", ".join(CHECKED_VERSIONS))
        return None
    fetcher = getattr(consumer, "_fetcher", None)
    if not all(callable(getattr(fetcher, name, None))
               for name in ("in_flight_fetches", "fetched_records", "send_fetches")):
        return None
    return FetchAhead(fetcher)
