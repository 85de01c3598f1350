"""End-to-end streaming benchmark: throughput and event-to-published latency of ONE consumer.

``python -m bench.bench_stream`` (about five minutes) or ``--quick`` (a smoke run of seconds).

What runs where (everything on this one machine):

- the broker: the embedded Tansu broker (``streamer.broker.EmbeddedBroker``), a subprocess;
- the producer: a separate Python process (``python -m bench.bench_stream produce``) that
  sends the producer-contract JSON of ``streamer.replay.event_messages`` with librdkafka
  (confluent-kafka), so that the load generator costs the shared CPUs as little as possible;
- the consumer: THIS process, one :class:`streamer.service.FoldService` (kafka-python
  consumer, librdkafka producer for the vectors, RocksDB, numba fold-in).

Two measurements, in this order, against one model and one state store:

1. **throughput**: the producer pre-produces a backlog of ``--backlog`` events and exits;
   then the consumer drains it alone (broker + consumer share the CPUs). Events/s is
   records consumed over the time from the end of the first turn (the one that joins the
   group, whose records are applied untimed and not counted) to the last applied and
   published.
   The backlog is sized to last at least 60 s at up to ~65,000 events/s (above the 50,000
   target, so that a faster drain still lasts a minute; the rate is over the whole drain,
   longest histories included); the drain is cut at ``--max-seconds`` if it is slower.
2. **latency**: the producer sends the next events at a fixed ``--rate`` (10,000/s) for
   ``--latency-seconds`` while the consumer runs (broker + producer + consumer share the
   CPUs), with ``linger.ms`` = ``--linger-ms`` (20: see LATENCY_LINGER_MS). Latency is,
   per event, the time from the producer's record timestamp (set when the producer hands
   it to librdkafka, so the linger counts) to the moment the vector it produced was
   acknowledged by the broker (``ServiceStats.latencies_ms``). The first ``--warmup``
   seconds are not counted. Beside it, where an event waits: the part spent in the
   consumer (from ``poll`` returning the record to the acknowledgement), the age of each
   record when ``poll`` returns it and when its Fetch response arrives (split at the
   moment that Fetch was sent), what each Fetch response carried, and the same ages for
   a consumer that only polls under the same load for as long (a fresh topic, the same
   producer and rate): the floor that the broker and kafka-python set. p99s per 10-s
   window show whether latency grows during the run.

``--profile`` adds a third, separate drain under a profiler (py-spy when it is on PATH,
else cProfile) and prints where the consumer's time goes; profiled numbers are not the
benchmark numbers. Results go to the "stream" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.events import load_events, save_events

SESSION = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 500}
# The paced producer's linger.ms. The embedded broker's cost per Fetch grows with the record
# batches a partition holds (docs/tansu-notes.md): at 5 ms (librdkafka's and our own
# producer's default) a partition gains ~200 batches a second at 10,000 events/s, and even a
# consumer that only polls sees records 150-300 ms old at p99 after a minute; at 20 ms it
# stays at 30-45 ms for the whole run. Apache Kafka finds a fetch offset by index, so there
# the linger only adds to each event's latency (which counts it: timestamps are taken when
# an event is handed to the producer). `--linger-ms 5` measures the other case.
LATENCY_LINGER_MS = 20.0
# The consumer's kafka.fetch_max_wait_ms: None keeps the service default (20 ms). The
# embedded broker holds a Fetch for part of the wait even with records ready (age inside the
# broker p99 ~21-25 ms at 20 ms, ~11 ms at 2 ms), but at 2 ms two of four latency runs at
# 10,000/s stalled for 1-2 s, and the two that did not were no better than at 20 ms (p99
# 94-126 against 62-82 ms, linger 20, this host): `--fetch-max-wait-ms` to try others.
FETCH_MAX_WAIT_MS = None
QUICK_SESSION = {"session_timeout_ms": 2_000, "heartbeat_interval_ms": 100}


@dataclass(frozen=True)
class Scenario:
    users: int = 100_000
    items: int = 20_000
    factors: int = 64
    train_events: int = 400_000
    iterations: int = 5
    activity_exponent: float = 0.8
    partitions: int = 4
    backlog: int = 5_000_000
    max_seconds: float = 150.0
    rate: float = 10_000.0
    latency_seconds: float = 60.0
    warmup: float = 5.0
    batch_max_records: int | None = None  # None: the ProcessingConfig default
    batch_max_ms: int | None = None
    history_cache_events: int | None = None  # None: the ProcessingConfig default
    gram_cache_bytes: int | None = None
    apply_threads: int | None = None
    poll_while_applying: bool | None = None
    linger_ms: float = LATENCY_LINGER_MS  # the paced producer's
    fetch_max_wait_ms: int | None = FETCH_MAX_WAIT_MS  # None: the KafkaConfig default
    seed: int = 7


QUICK = Scenario(users=5_000, items=2_000, factors=64, train_events=40_000, iterations=2,
                 backlog=40_000, max_seconds=30.0, rate=2_000.0, latency_seconds=3.0,
                 warmup=1.0, batch_max_records=4_000)


# --------------------------------------------------------------------------- the producer process


def produce_main(argv: list[str]) -> int:
    """``python -m bench.bench_stream produce ...``: send events from an .npz, print a JSON summary."""
    from confluent_kafka import Producer

    from streamer.replay import event_messages

    p = argparse.ArgumentParser(prog="bench_stream produce")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=None, help="events/s; default: as fast as possible")
    p.add_argument("--linger-ms", type=float, default=LATENCY_LINGER_MS, help="linger.ms when paced")
    args = p.parse_args(argv)

    inter = load_events(args.events, slice(args.start, args.start + args.count))
    paced = args.rate is not None
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        # Paced: see LATENCY_LINGER_MS; backlog: big batches.
        "linger.ms": args.linger_ms if paced else 50,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
    })
    messages = event_messages(inter, id_prefix=f"bench{args.start}")
    sent = 0
    started = time.monotonic()
    cpu0 = time.process_time()
    tick = 0.001
    for key, value in messages:
        if paced and sent % 10 == 0:
            ahead = sent / args.rate - (time.monotonic() - started)
            if ahead > tick:
                producer.poll(0)
                time.sleep(ahead)
        while True:
            try:
                producer.produce(args.topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.01)
        sent += 1
        if sent % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    seconds = time.monotonic() - started
    print(json.dumps({"sent": sent, "unflushed": remaining, "seconds": seconds,
                      "cpu_seconds": time.process_time() - cpu0}), flush=True)
    return 0 if remaining == 0 else 1


def start_producer(bootstrap: str, topic: str, events: Path, start: int, count: int,
                   rate: float | None, linger_ms: float = LATENCY_LINGER_MS) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.bench_stream", "produce", "--bootstrap", bootstrap,
           "--topic", topic, "--events", str(events), "--start", str(start), "--count", str(count)]
    if rate is not None:
        cmd += ["--rate", str(rate), "--linger-ms", str(linger_ms)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def finish_producer(proc: subprocess.Popen, timeout_s: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"producer process failed with status {proc.returncode}: {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- setup


def build(work: Path, sc: Scenario, say) -> tuple[Path, Path, int]:
    """Train and promote a model; write the stream events; return (registry, events, n_stream)."""
    from factors.pipeline import TrainParams, train
    from factors.synth import SynthParams, generate
    from streamer.registry import ModelRegistry

    n_stream = sc.backlog + int(sc.rate * (sc.latency_seconds + sc.warmup + 5))
    started = time.monotonic()
    inter = generate(SynthParams(users=sc.users, items=sc.items,
                                 events=sc.train_events + n_stream, seed=sc.seed,
                                 activity_exponent=sc.activity_exponent))
    train_part = inter.subset(np.arange(sc.train_events))
    params = TrainParams(factors=sc.factors, iterations=sc.iterations, seed=sc.seed)
    result = train(train_part, params)
    registry = ModelRegistry(work / "models")
    registry.promote(registry.add(result.artifact(train_part)), reason="bench")
    stream = inter.subset(np.arange(sc.train_events, len(inter)))
    events = save_events(work / "events.npz", stream)
    say(f"setup: {len(inter):,} synthetic events ({sc.users:,} users, {sc.items:,} items), "
        f"model k={sc.factors} trained on the first {sc.train_events:,} "
        f"in {time.monotonic() - started:.0f}s")
    return work / "models", events, len(stream)


# --------------------------------------------------------------------------- measuring


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by some processes between start() and stop(), in cores (1.0 = one core busy).

    ``other`` is what the rest of the machine used meanwhile: anything but ~0 means the
    numbers were measured beside someone else's work.
    """

    def __init__(self, **pids: int) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.m0 = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        used = {name: (proc_cpu_seconds(pid) - self.c0[name]) / wall
                for name, pid in self.pids.items()}
        used["other"] = max(0.0, (machine_busy_seconds() - self.m0) / wall - sum(used.values()))
        return used


class StageTimer:
    """Wall time of the stages of ``run_once``, by wrapping the few calls made per batch.

    Costs a handful of calls per micro-batch, so unlike a profiler it does not change the
    numbers. ``apply`` (the wall time of a turn's partitions, side by side on
    ``apply_threads`` threads) is split further with the fold and write times each batch
    reports, which add up over the threads. With ``poll_while_applying`` the turn thread
    runs ``apply``, ``send_vectors`` and ``flush`` while the loop thread polls; ``settle``
    is the loop thread's wait for it (and the turn's offset commit and bookkeeping).
    """

    STAGES = (("poll", "consumer", "poll"), ("decode", "processor", "decode"),
              ("settle", "service", "settle"),
              ("apply", "processor", "apply_many"), ("send_vectors", "publisher", "send_vectors"),
              ("flush", "publisher", "flush"))
    TURN_STAGES = ("apply", "send_vectors", "flush")

    def __init__(self, service) -> None:
        self.seconds = {name: 0.0 for name, _, _ in self.STAGES}
        self.seconds.update(fold=0.0, write=0.0)
        self.calls: dict[str, list[float]] = {name: [] for name, _, _ in self.STAGES}
        self._installed = []
        for name, owner, method in self.STAGES:
            target = service if owner == "service" else getattr(service, owner)
            setattr(target, method, self._timed(name, getattr(target, method)))
            self._installed.append((target, method))
        self.service = service

    def _timed(self, name, fn):
        seconds, calls = self.seconds, self.calls[name]

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t
                seconds[name] += took
                calls.append(took)
        return timed

    def call_percentiles(self) -> dict[str, tuple[float, float, float]]:
        """Per stage, the p50 / p99 / max of one call's wall time in ms: where the tail of
        a latency run comes from (a stage whose slowest calls are long stalls the turn)."""
        return {name: tuple(float(v) for v in np.percentile(1e3 * np.array(calls), [50, 99, 100]))
                for name, calls in self.calls.items() if calls}

    def stages(self, seconds: float) -> dict[str, float]:
        """The stages' seconds and ``other``: the loop thread's wall time in none of them
        (the turn thread's stages overlap the loop's when turns overlap)."""
        stages = dict(self.seconds)
        overlap = self.service.config.processing.poll_while_applying
        stages["other"] = seconds - sum(v for k, v in stages.items() if k not in ("fold", "write")
                                        and not (overlap and k in self.TURN_STAGES))
        stages["overlap"] = float(overlap)
        return stages

    def on_batch(self, outcomes) -> None:
        for o in outcomes:
            self.seconds["fold"] += o.fold_seconds
            self.seconds["write"] += o.write_seconds

    def remove(self) -> None:
        for target, method in self._installed:
            delattr(target, method)


def record_ages_ms(polled: dict) -> list[np.ndarray]:
    """Per partition of a ``poll`` result: now minus each record's producer timestamp, ms."""
    now_ms = time.time() * 1000.0
    return [now_ms - np.fromiter((r.timestamp for r in records), np.float64, count=len(records))
            for records in polled.values()]


def age_percentiles(ages: list[np.ndarray]) -> tuple[float, float]:
    """p50 and p99 of the ages collected (NaN when none)."""
    values = np.concatenate(ages) if ages else np.array([np.nan])
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def batch_waits_ms(records: bytes, send_time: float, arrived: float,
                   wall_minus_mono_ms: float) -> np.ndarray:
    """Where the records of one partition's Fetch data waited before they reached the client.

    For each v2 record batch in ``records``: its record count, how long its first record
    waited for the Fetch request that returned it to be sent (0 when produced after the
    send), and how long it then spent until the response arrived (from the send, or from
    its production when later). ``send_time`` and ``arrived`` are ``time.monotonic()``;
    the producer timestamps are wall-clock ms, hence ``wall_minus_mono_ms``. Reads only
    the fixed batch header (KIP-98 layout: batchLength at 8, lastOffsetDelta at 23,
    firstTimestamp at 27); a truncated last batch is left out.
    """
    sent_ms = send_time * 1e3 + wall_minus_mono_ms
    arrived_ms = arrived * 1e3 + wall_minus_mono_ms
    rows, pos, end = [], 0, len(records)
    while pos + 43 <= end:
        (length,) = struct.unpack_from(">i", records, pos + 8)
        if pos + 12 + length > end:
            break
        delta, first_ts = struct.unpack_from(">iq", records, pos + 23)
        rows.append((delta + 1, max(0.0, sent_ms - first_ts),
                     arrived_ms - max(sent_ms, float(first_ts))))
        pos += 12 + length
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _slashed(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


class FetchProbe:
    """Where an event waits before the consumer sees it, during the latency run.

    Records the age of every record when ``poll`` returns it (now minus its producer
    timestamp) and, per Fetch response, how many of the requested partitions carried
    records. The latter reads kafka-python's fetch callback (``Fetcher._handle_fetch_response``,
    present in kafka-python 2.x and 3.x); where it is missing only the ages are recorded.
    Diagnostics of the benchmark only (the service's one use of fetcher internals is
    :mod:`streamer.fast_fetch`, which this leaves alone).
    """

    def __init__(self, service) -> None:
        self.ages: list[np.ndarray] = []
        self.partition_ages: dict[int, list[np.ndarray]] = {}
        self.responses: list[tuple[int, int, int]] = []  # partitions asked, with records, bytes
        self.response_times: list[float] = []
        # Per record batch at its Fetch response: (records, wait before the request was
        # sent, wait inside the broker), ms; see batch_waits_ms.
        self.arrivals: list[np.ndarray] = []
        self._wall_minus_mono_ms = 1e3 * (time.time() - time.monotonic())
        consumer = service.consumer
        poll = consumer.poll

        def probed_poll(*args, **kwargs):  # no locals: see FoldService.run_once
            return self._record(poll(*args, **kwargs))
        self._patched = [(consumer, "poll", consumer.__dict__.get("poll"))]
        consumer.poll = probed_poll
        fetcher = getattr(consumer, "_fetcher", None)
        handle = getattr(fetcher, "_handle_fetch_response", None)
        if handle is not None:
            def probed_handle(node_id, fetch_offsets, send_time, response, *rest):
                parts = [pd for td in response.responses for pd in td.partitions]
                arrived = time.monotonic()
                self.responses.append((len(fetch_offsets), sum(1 for pd in parts if pd.records),
                                       sum(len(pd.records or b"") for pd in parts)))
                self.response_times.append(arrived)
                for pd in parts:
                    if pd.records:
                        self.arrivals.append(batch_waits_ms(bytes(pd.records), send_time, arrived,
                                                            self._wall_minus_mono_ms))
                return handle(node_id, fetch_offsets, send_time, response, *rest)
            self._patched.append((fetcher, "_handle_fetch_response",
                                  fetcher.__dict__.get("_handle_fetch_response")))
            fetcher._handle_fetch_response = probed_handle

    def _record(self, polled: dict) -> dict:
        ages = record_ages_ms(polled)
        self.ages += ages
        for tp, a in zip(polled, ages):
            self.partition_ages.setdefault(tp.partition, []).append(a)
        return polled

    def summary(self) -> dict:
        p50, p99 = age_percentiles(self.ages)
        out = {"age_p50_ms": p50, "age_p99_ms": p99,
               "partition_age_p99_ms": {p: age_percentiles(a)[1]
                                        for p, a in sorted(self.partition_ages.items())}}
        if self.arrivals:
            a = np.concatenate(self.arrivals)
            n = a[:, 0].astype(np.int64)
            before, inside = np.repeat(a[:, 1], n), np.repeat(a[:, 2], n)
            out["arrival_age_ms"] = tuple(float(v) for v in np.percentile(before + inside, [50, 99]))
            out["before_request_ms"] = tuple(float(v) for v in np.percentile(before, [50, 99]))
            out["inside_broker_ms"] = tuple(float(v) for v in np.percentile(inside, [50, 99]))
        if len(self.response_times) > 1:
            gaps = 1e3 * np.diff(self.response_times)
            out["response_gap_ms"] = tuple(float(v) for v in np.percentile(gaps, [50, 99, 100]))
        if self.responses:
            r = np.array(self.responses, dtype=np.float64)
            with_records = r[r[:, 1] > 0]
            out.update(fetch_responses=len(r), partitions_asked=float(r[:, 0].mean()),
                       partitions_with_records=float(r[:, 1].mean()),
                       kib_per_partition=float((with_records[:, 2] / with_records[:, 1]).mean() / 1024)
                       if len(with_records) else 0.0)
        return out

    def remove(self) -> None:
        """Put back what was there (another timer's wrapper, or the class's method)."""
        for target, name, before in self._patched:
            if before is None:
                delattr(target, name)
            else:
                setattr(target, name, before)


class GcTimer:
    """Time spent in the cyclic garbage collector (a gc.callbacks hook)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t = 0.0
        gc.callbacks.append(self._hook)

    def _hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t

    def remove(self) -> None:
        gc.callbacks.remove(self._hook)


def drain(service, total: int, max_seconds: float, say, label: str) -> dict:
    """Run the service until ``total`` records are consumed; time from the end of the first
    turn, counting the records after it.

    The first turn's records arrive at some unknown point of the poll that joins the group;
    they are applied before the clock starts and left out of the count (counting them
    without their time would overstate the rate, by a whole turn of up to
    ``batch_max_records`` records)."""
    s = service.stats
    start = s.consumed
    while s.consumed == start:  # group join, then the first records
        service.run_once()
    service.settle()  # no turn in flight when the clock starts
    base = s.consumed
    total -= base - start
    if total <= 0:
        raise RuntimeError(f"{label}: the whole backlog came in the first turn(s) ({base - start:,} "
                           "records): raise the backlog or lower batch_max_records")
    timer = StageTimer(service)
    folded = [0, 0]  # histories folded, their events: the mean history length per window

    def on_batch(_service, outcomes) -> None:
        timer.on_batch(outcomes)
        for o in outcomes:
            folded[0] += len(o.vectors)
            folded[1] += sum(r.n_interactions for r in o.vectors.values())

    service.on_batch = on_batch
    gc_pause = GcTimer()
    cpu0 = time.process_time()
    first = time.monotonic()
    base_pub, base_batches, base_users = s.published, s.batches, s.users_updated
    windows, lengths, last_t, last_n = [], [], first, s.consumed
    deadline = first + max_seconds
    while s.consumed - base < total:
        now = time.monotonic()
        if now > deadline:
            say(f"  {label}: stopped at --max-seconds {max_seconds:.0f}")
            break
        service.run_once()
        if now - last_t >= 10:
            windows.append((s.consumed - last_n) / (now - last_t))
            lengths.append(folded[1] / max(1, folded[0]))
            folded[:] = [0, 0]
            last_t, last_n = now, s.consumed
            say(f"  {label}: {s.consumed - base:,} / {total:,} ({windows[-1]:,.0f}/s)")
    service.settle()  # the turn still in flight, if any, is counted too
    seconds = time.monotonic() - first
    cpu = time.process_time() - cpu0
    timer.remove()
    gc_pause.remove()
    service.on_batch = None
    consumed = s.consumed - base
    stages = timer.stages(seconds)
    stages["gc"] = gc_pause.seconds  # inside the stages above
    return {"records": consumed, "seconds": seconds, "events_per_s": consumed / seconds,
            "cpu_us_per_event": 1e6 * cpu / max(1, consumed),
            "stage_us_per_event": {k: 1e6 * v / max(1, consumed) for k, v in stages.items()},
            "vectors": s.published - base_pub, "batches": s.batches - base_batches,
            "users_updated": s.users_updated - base_users,
            "window_min": min(windows) if windows else None,
            "window_max": max(windows) if windows else None,
            "windows": windows, "window_history_lengths": lengths}


def bare_consumers(bootstrap: str, topic: str, partitions: int, total: int, max_seconds: float,
                   overrides: dict) -> dict:
    """Records/s of consumers that only fetch and parse the backlog: the client's ceiling.

    kafka-python with the service's consumer overrides (assign, no group, records dropped),
    and librdkafka (confluent-kafka) for comparison.
    """
    from confluent_kafka import Consumer, TopicPartition as RdTopicPartition
    from kafka import TopicPartition

    from streamer.kafka_io import make_consumer

    out = {}
    consumer = make_consumer(bootstrap, None, **overrides)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    n, t0 = 0, time.monotonic()
    while n < total and time.monotonic() - t0 < max_seconds:
        for records in consumer.poll(timeout_ms=100, max_records=5000).values():
            n += len(records)
    out["kafka_python"] = n / (time.monotonic() - t0)
    consumer.close()
    rd = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare", "enable.auto.commit": False})
    rd.assign([RdTopicPartition(topic, p, 0) for p in range(partitions)])
    n, t0 = 0, time.monotonic()
    while n < total and time.monotonic() - t0 < max_seconds:
        n += sum(1 for m in rd.consume(10_000, 0.1) if not m.error())
    out["librdkafka"] = n / (time.monotonic() - t0)
    rd.close()
    return out


def pipeline_floor(bootstrap: str, topic: str, partitions: int, events: Path, rate: float,
                   seconds: float, overrides: dict, session: dict, fetch_max_wait_ms: int,
                   skip: float = 2.0, linger_ms: float = LATENCY_LINGER_MS) -> dict:
    """Age of records when a consumer that does nothing else gets them: the latency floor.

    The same producer process at the same offered rate into a fresh topic, and a
    kafka-python consumer in a group with the service's fetch settings that only polls;
    no fold-in, no state, no publishing. What the benchmarked consumer adds is the rest.
    The first ``skip`` seconds (the producer's start-up) are left out.
    """
    from streamer.kafka_io import TopicSpec, create_topics, make_consumer

    create_topics(bootstrap, [TopicSpec(topic, partitions)])
    consumer = make_consumer(bootstrap, "bench-floor",
                             **{**session, "fetch_max_wait_ms": fetch_max_wait_ms, **overrides})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=100)
    proc = start_producer(bootstrap, topic, events, 0, int(rate * seconds), rate, linger_ms)
    ages, times, started = [], [], time.monotonic()
    while proc.poll() is None and time.monotonic() - started < seconds + 60:
        polled = consumer.poll(timeout_ms=50)
        now = time.monotonic() - started
        if now >= skip and polled:  # past the producer's start-up
            ages.append(np.concatenate(record_ages_ms(polled)))
            times.append(now - skip)
    finish_producer(proc)
    consumer.close(autocommit=False)
    p50, p99 = age_percentiles(ages)
    return {"events": sum(map(len, ages)), "p50_ms": p50, "p99_ms": p99,
            "windows_p99_ms": window_p99(times, ages)}


WINDOW_S = 10.0


def window_p99(times: list[float], values: list[np.ndarray], width: float = WINDOW_S) -> list[float]:
    """p99 of ``values`` per ``width``-second window of ``times`` (one time per array,
    seconds from the start); a last window shorter than half a width joins the one before."""
    if not times:
        return []
    t = np.asarray(times)
    bins = (t // width).astype(np.int64)
    last = int(bins.max())
    if last > 0 and t.max() - last * width < width / 2:
        bins[bins == last] = last - 1
    return [float(np.percentile(np.concatenate([v for v, b in zip(values, bins) if b == k]), 99))
            for k in range(int(bins.max()) + 1) if np.any(bins == k)]


class LatencyLog:
    """When each batch's latencies were recorded during the latency run: wraps
    ``ServiceStats.add_latencies`` on one service's stats (an instance attribute)."""

    def __init__(self, stats) -> None:
        self.stats, self.started = stats, time.monotonic()
        self.times: list[float] = []
        self.latencies: list[np.ndarray] = []
        self.consumer: list[np.ndarray] = []
        add = stats.add_latencies

        def logged(values, consumer_ms=float("nan")):
            self.times.append(time.monotonic() - self.started)
            self.latencies.append(values)
            self.consumer.append(np.full(values.shape[0], consumer_ms))
            return add(values, consumer_ms)
        stats.add_latencies = logged

    def windows(self) -> list[tuple[float, float]]:
        """Per window: p99 event-to-published and p99 of the consumer's share, ms."""
        return list(zip(window_p99(self.times, self.latencies), window_p99(self.times, self.consumer)))

    def remove(self) -> None:
        del self.stats.add_latencies


def crc_implementation() -> str:
    from kafka.record import util

    return "C (crc32c package)" if util.crc32c_c is not None else "pure Python (no crc32c package)"


# --------------------------------------------------------------------------- profiling

# Stages of one run_once, as (label, function name, file suffix): inclusive time.
STAGES = [
    ("consumer.poll (kafka-python fetch + record parsing)", "poll", "kafka/consumer/group.py"),
    ("processor.decode (JSON + validation)", "decode", "streamer/processor.py"),
    ("processor.apply", "apply", "streamer/processor.py"),
    ("  cache misses: store.get_raw_histories (multi-get)", "get_raw_histories", "streamer/store.py"),
    ("  cache misses: check_histories (numba)", "check_histories", "streamer/history_kernels.py"),
    ("  item lookups (numba)", "rows", "streamer/item_table.py"),
    ("  histories parsed (numba)", "parse_histories", "streamer/history_kernels.py"),
    ("  new events merged in (numba)", "merge_new_events", "streamer/history_kernels.py"),
    ("  model.fold_rows (aggregate + solve, numba)", "fold_rows", "streamer/model.py"),
    ("  histories encoded (numba)", "encode_histories", "streamer/history_kernels.py"),
    ("  store.commit_batch (WriteBatch)", "commit_batch", "streamer/store.py"),
    ("publisher.send_vectors", "send_vectors", "streamer/publisher.py"),
    ("  vector_message (orjson of 64 float32)", "vector_message", "streamer/publisher.py"),
    ("  producer.produce (librdkafka)", "_produce", "streamer/publisher.py"),
    ("publisher.flush (wait for acks)", "flush", "streamer/publisher.py"),
    ("store.ack_outbox", "ack_outbox", "streamer/store.py"),
    ("offset commit", "_commit", "streamer/service.py"),
    ("CRC32C (kafka-python)", "calc_crc32c", "kafka/record/util.py"),
]


def on_one_thread(service):
    """Context: the service applies its turns on the loop thread, the partitions one after
    another (profilers that see the loop thread only then see all of a turn)."""
    return _OneThread(service)


class _OneThread:
    def __init__(self, service) -> None:
        self.service = service

    def __enter__(self):
        s = self.service
        self.saved = s.config, s.processor.config
        s.settle()
        s.config = s.config.replace(processing={"poll_while_applying": False})
        s.processor.config = replace(s.processor.config, apply_threads=1)
        return s

    def __exit__(self, *exc) -> None:
        self.service.config, self.service.processor.config = self.saved


def profile_cprofile(service, total: int, max_seconds: float, say) -> tuple[dict, list[str]]:
    # cProfile sees the thread that enabled it only: the turns are applied on it, the
    # partitions one after another, while profiled.
    prof = cProfile.Profile()
    with on_one_thread(service):
        prof.enable()
        try:
            result = drain(service, total, max_seconds, say, "profile")
        finally:
            prof.disable()
    stats = pstats.Stats(prof)
    run_once = _cumtime(stats, "run_once", "streamer/service.py")
    lines = [f"{label:55s} {100 * _cumtime(stats, name, suffix) / run_once:5.1f}%"
             for label, name, suffix in STAGES]
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    lines.append("top self time:")
    for (file, line, name), (_, _, tt, _, _) in top:
        lines.append(f"  {100 * tt / run_once:5.1f}%  {name} ({_short(file)}:{line})")
    return result, lines


def _cumtime(stats: pstats.Stats, name: str, suffix: str) -> float:
    return sum(v[3] for (file, _, fn), v in stats.stats.items()
               if fn == name and file.endswith(suffix))


def _short(path: str) -> str:
    for marker in ("site-packages/", "/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile_pyspy(pyspy: str, service, total: int, max_seconds: float, out: Path,
                  say) -> tuple[dict, list[str]]:
    """Sample this process with py-spy (main thread, idle included) during one drain."""
    raw = out / "pyspy.txt"
    spy = subprocess.Popen([pyspy, "record", "--pid", str(os.getpid()), "--rate", "250",
                            "--format", "raw", "--idle", "--threads", "--nonblocking",
                            "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        with on_one_thread(service):  # the stages are counted in the loop thread's stacks
            result = drain(service, total, max_seconds, say, "profile")
    finally:
        spy.send_signal(2)
        spy.wait(30)
    if not raw.exists():
        return result, [f"py-spy wrote no samples (is ptrace allowed?): exit status {spy.returncode}"]
    return result, summarize_collapsed(raw.read_text())


def summarize_collapsed(text: str) -> list[str]:
    """Inclusive share of each stage, and the top leaf frames, of the run_once samples."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if "FoldService.run_once (" in stack:
            stacks.append((stack.split(";"), int(count)))
    total = sum(c for _, c in stacks) or 1

    def matches(frame: str, name: str, suffix: str) -> bool:
        function, _, where = frame.partition(" (")
        return function.rpartition(".")[2] == name and where.startswith(suffix)

    lines = []
    for label, name, suffix in STAGES:
        n = sum(c for frames, c in stacks if any(matches(f, name, suffix) for f in frames))
        lines.append(f"{label:55s} {100 * n / total:5.1f}%")
    leaves: dict[str, int] = {}
    for frames, c in stacks:
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + c
    lines.append(f"top leaf frames (of {total} samples in FoldService.run_once):")
    for frame, c in sorted(leaves.items(), key=lambda kv: kv[1], reverse=True)[:15]:
        lines.append(f"  {100 * c / total:5.1f}%  {frame}")
    return lines


# --------------------------------------------------------------------------- the run


def run(sc: Scenario, *, quick: bool, profile: str | None, keep: bool, write: bool,
        consumer_overrides: dict, say=print) -> dict:
    from streamer.broker import EmbeddedBroker
    from streamer.config import AppConfig
    from streamer.service import FoldService
    from streamer.topics import ensure_topics

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    results: dict = {"scenario": asdict(sc), "crc32c": crc_implementation(),
                     "consumer_overrides": consumer_overrides}
    say(f"bench_stream: workdir {work}; kafka-python CRC32C: {results['crc32c']}")
    try:
        registry, events, n_stream = build(work, sc, say)
        with EmbeddedBroker(work / "broker") as broker:
            processing = {k: getattr(sc, k) for k in ("batch_max_records", "batch_max_ms",
                                                      "history_cache_events", "gram_cache_bytes",
                                                      "apply_threads", "poll_while_applying")
                          if getattr(sc, k) is not None}
            config = AppConfig().replace(
                kafka={"bootstrap_servers": broker.bootstrap, "input_partitions": sc.partitions,
                       **({"fetch_max_wait_ms": sc.fetch_max_wait_ms}
                          if sc.fetch_max_wait_ms is not None else {}),
                       **(QUICK_SESSION if quick else SESSION)},
                processing=processing,
                store={"state_dir": work / "state"},
                model={"registry_dir": registry},
                metrics={"port": 0},
            )
            results["processing"] = asdict(config.processing)
            results["fetch_max_wait_ms"] = config.kafka.fetch_max_wait_ms
            ensure_topics(config.kafka)
            topic = config.kafka.input_topic

            def floor(suffix: str, seconds: float, skip: float = 2.0) -> dict:
                return pipeline_floor(broker.bootstrap, f"{topic}-{suffix}", sc.partitions, events,
                                      sc.rate, seconds, consumer_overrides,
                                      QUICK_SESSION if quick else SESSION,
                                      config.kafka.fetch_max_wait_ms, skip, sc.linger_ms)

            # The latency floor on the empty broker, for comparison with the one after the runs.
            if sc.latency_seconds > 0:
                fresh_floor = floor("floor-empty", min(sc.latency_seconds, 20.0))
                say(f"latency floor on the empty broker (a consumer that only polls): record age "
                    f"at poll p50 {fresh_floor['p50_ms']:.1f} ms, p99 {fresh_floor['p99_ms']:.1f} ms")

            # 1. throughput: pre-produce the backlog, then drain it with nothing else running.
            t = time.monotonic()
            produced = finish_producer(start_producer(broker.bootstrap, topic, events, 0,
                                                      sc.backlog, None))
            say(f"throughput: pre-produced {produced['sent']:,} events in "
                f"{time.monotonic() - t:.0f}s (separate process, librdkafka)")
            bare = bare_consumers(broker.bootstrap, topic, sc.partitions, sc.backlog,
                                  min(30.0, sc.max_seconds), consumer_overrides)
            results["bare"] = bare
            say(f"ceiling: a bare consumer that only fetches and parses: kafka-python "
                f"{bare['kafka_python']:,.0f} records/s, librdkafka {bare['librdkafka']:,.0f} records/s")
            service = FoldService(config, consumer_overrides=consumer_overrides)
            _warm(service)
            service.start()
            gc.collect()
            meter = CpuMeter(consumer=os.getpid(), broker=broker.pid)
            meter.start()
            tput = drain(service, sc.backlog, sc.max_seconds, say, "throughput")
            tput["cpu"] = meter.stop()
            results["throughput"] = tput
            say(f"throughput: {tput['records']:,} events in {tput['seconds']:.1f}s = "
                f"{tput['events_per_s']:,.0f} events/s; {tput['vectors']:,} vectors published "
                f"({tput['vectors'] / max(1, tput['records']):.2f} per event) in "
                f"{tput['batches']:,} batches; CPU cores used: " + _cpu(tput["cpu"]))
            say(f"throughput: consumer CPU {tput['cpu_us_per_event']:.1f} us/event; wall us/event by "
                f"stage: {_stages(tput)}")
            offset = sc.backlog
            if tput["records"] < sc.backlog:  # cut by --max-seconds: skip the rest of the backlog
                _skip_backlog(service)

            # 2. latency at a fixed offered rate, the producer running beside the consumer.
            count = int(sc.rate * (sc.latency_seconds + sc.warmup))
            if sc.latency_seconds > 0:
                proc = start_producer(broker.bootstrap, topic, events, offset, count, sc.rate,
                                      sc.linger_ms)
                meter = CpuMeter(consumer=os.getpid(), broker=broker.pid, producer=proc.pid)
                grams_before = service.processor.gram_cache_counts()
                st = service.stats
                history_before = st.history_cache_hits, st.history_cache_misses
                lat = _latency(service, proc, count, sc, meter, say)
                hits, misses, entries, slots = service.processor.gram_cache_counts()
                lat["gram_cache"] = {"hits": hits - grams_before[0], "misses": misses - grams_before[1],
                                     "entries": entries, "slots": slots}
                held, capacity = service.processor.cache_sizes()[:2]
                lat["history_cache"] = {"hits": st.history_cache_hits - history_before[0],
                                        "misses": st.history_cache_misses - history_before[1],
                                        "events": held, "capacity": capacity}
                results["latency"] = lat
                say(f"latency at {sc.rate:,.0f} events/s offered: p50 {lat['p50_ms']:.1f} ms, "
                    f"p95 {lat['p95_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max "
                    f"{lat['max_ms']:.1f} ms over {lat['events']:,} events; consumed "
                    f"{lat['consumed_per_s']:,.0f}/s; CPU cores used: " + _cpu(lat["cpu"]))
                say(f"latency: {lat['records_per_batch']:,.0f} records per batch, "
                    f"{lat['vectors_per_event']:.2f} vectors per event; wall us/event by stage: "
                    + _stages(lat))
                say("latency: one call's wall ms by stage, p50 / p99 / max: " + _calls(lat))
                say(f"latency: of it in the consumer (poll to acknowledged) p50 "
                    f"{lat['consumer_p50_ms']:.1f} ms, p99 {lat['consumer_p99_ms']:.1f} ms")
                g = lat["gram_cache"]
                say(f"latency: normal-equation cache {_gram_line(g)}")
                say(f"latency: history cache {_history_line(lat['history_cache'])}")
                f = lat["fetch"]
                if f:
                    say(f"latency: record age at poll p50 {f['age_p50_ms']:.1f} ms, p99 "
                        f"{f['age_p99_ms']:.1f} ms; fetch responses carried records for "
                        f"{f.get('partitions_with_records', float('nan')):.2f} of "
                        f"{f.get('partitions_asked', float('nan')):.2f} partitions asked")
                    say("latency: record age at poll p99 by partition (ms): "
                        + ", ".join(f"{p}: {v:.0f}" for p, v in f["partition_age_p99_ms"].items())
                        + "; time between Fetch responses p50 / p99 / max (ms): "
                        + _slashed(f.get("response_gap_ms", ())))
                    if "arrival_age_ms" in f:
                        say("latency: record age when its Fetch response arrives p50 / p99 "
                            + _slashed(f["arrival_age_ms"]) + " ms: waiting for the request to be "
                            "sent " + _slashed(f["before_request_ms"]) + ", then inside the broker "
                            + _slashed(f["inside_broker_ms"]))
            offset += count

            # The floor under that latency: the same load, a consumer that only polls.
            if sc.latency_seconds > 0:
                # As long as the latency run, its warm-up left out likewise: the broker's
                # cost grows with the record batches a topic holds (see the windows).
                after = results["latency"]["floor"] = floor(
                    "floor", sc.warmup + sc.latency_seconds, skip=sc.warmup)
                results["latency"]["floor_empty_broker"] = fresh_floor
                say(f"latency floor (same load, a consumer that only polls): record age at poll "
                    f"p50 {after['p50_ms']:.1f} ms, p99 {after['p99_ms']:.1f} ms")
                say(f"latency: p99 per {WINDOW_S:.0f}-s window (ms), event to published / of it in "
                    f"the consumer / floor's age at poll: " + _windows(results["latency"]))

            # 3. optional: a separate, profiled drain (numbers inflated; not the result).
            if profile:
                n = min(n_stream - offset, max(sc.backlog // 4, 10_000))
                finish_producer(start_producer(broker.bootstrap, topic, events, offset, n, None))
                pyspy = shutil.which("py-spy") if profile in ("auto", "py-spy") else None
                limit = min(sc.max_seconds, 30.0)
                if pyspy:
                    prof, lines = profile_pyspy(pyspy, service, n, limit, work, say)
                    tool = "py-spy (sampling, main thread incl. idle)"
                else:
                    prof, lines = profile_cprofile(service, n, limit, say)
                    tool = ("cProfile (deterministic; inflates Python-heavy stages; the partitions "
                            "applied one at a time, on the profiled thread)")
                results["profile"] = {"tool": tool, "events_per_s": prof["events_per_s"],
                                      "lines": lines}
                say(f"profile: {tool}, {prof['events_per_s']:,.0f} events/s under the profiler")
                for line in lines:
                    say("  " + line)
            service.close()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if write and "latency" in results:
        from bench.report import write_section

        write_section("stream", markdown(results, quick))
    return results


def _warm(service) -> None:
    """Load the numba kernels before the clock starts (they are cached on disk)."""
    from streamer.codec import UserHistory

    item = next(iter(service.model.item_index))
    service.model.fold([UserHistory.empty().append([item], [1.0], [0.0], max_events=1).history])


def _gram_line(g: dict) -> str:
    solves = g["hits"] + g["misses"]
    rate = f"{100.0 * g['hits'] / solves:.1f}% of {solves:,} long-history solves served" if solves else "unused"
    return f"{rate}; {g['entries']:,} of {g['slots']:,} slots filled"


def _history_line(h: dict) -> str:
    lookups = h["hits"] + h["misses"]
    rate = (f"{100.0 * h['hits'] / lookups:.1f}% of {lookups:,} batch users with a stored history "
            f"found in memory (the others read from RocksDB)") if lookups else "unused"
    return f"{rate}; holding {h['events']:,} of {h['capacity']:,} events"


def _throughput_verdict(t: dict, target: float = 50_000.0, seconds: float = 60.0) -> str:
    """One sentence: whether the drain met ">= 50,000 events/s sustained for >= 60 s", read
    strictly (a mean over a drain that lasted 60 s, and every 10-s window of it)."""
    mean_ok = t["events_per_s"] >= target and t["seconds"] >= seconds
    low = t.get("window_min")
    if mean_ok and low is not None and low >= target:
        return (f"Throughput target: met, strictly: {t['events_per_s']:,.0f}/s over {t['seconds']:.0f} s "
                f"and no 10-s window below {target:,.0f}/s.")
    if mean_ok:
        return (f"Throughput target: met as a mean ({t['events_per_s']:,.0f}/s over "
                f"{t['seconds']:.0f} s), not in every 10-s window (the slowest "
                f"{_fmt(low)}/s): the rate falls as histories grow (below).")
    if t["seconds"] < seconds:
        return (f"Throughput target: not shown: the drain lasted {t['seconds']:.0f} s, under "
                f"{seconds:.0f} s (pass a larger --backlog).")
    return f"Throughput target: not met ({t['events_per_s']:,.0f}/s against {target:,.0f}/s)."


def _skip_backlog(service) -> None:
    """Seek every partition to its high watermark: the rest of a cut backlog is not applied."""
    for tp in service.consumer.assignment():
        end = service.consumer.highwater(tp)
        if end is not None:
            service.consumer.seek(tp, end)


def _latency(service, proc, count: int, sc: Scenario, meter: CpuMeter, say) -> dict:
    s = service.stats
    base = s.consumed
    started = time.monotonic()
    measuring = False
    measured_from = None
    timer = probe = latency_log = None
    while s.consumed - base < count:
        service.run_once()
        now = time.monotonic()
        if not measuring and now - started >= sc.warmup:
            s.clear_latencies()
            measuring, measured_from = True, (now, s.consumed, s.batches, s.published)
            meter.start()
            timer = StageTimer(service)
            probe = FetchProbe(service)
            latency_log = LatencyLog(s)
            service.on_batch = lambda _service, outcomes: timer.on_batch(outcomes)
        if now - started > sc.latency_seconds + sc.warmup + 30:
            say("  latency: the consumer cannot keep up; stopped 30 s after the producer's end")
            break
    service.settle()
    cpu = meter.stop()
    seconds = time.monotonic() - measured_from[0]
    fetch = {}
    if timer is not None:
        fetch = probe.summary()
        latency_log.remove()
        probe.remove()  # installed after the timer: removed first
        timer.remove()
        service.on_batch = None
    kept_up = s.consumed - base >= count
    summary = finish_producer(proc)
    values = np.concatenate(s.latencies_ms) if s.latencies_ms else np.array([np.nan])
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    c50, c99 = s.consumer_latency_percentiles(50, 99)
    t0, n0, b0, v0 = measured_from
    consumed = max(1, s.consumed - n0)
    stages = timer.stages(seconds)
    return {"rate": sc.rate, "events": int(values.size), "p50_ms": float(p50),
            "stage_us_per_event": {k: 1e6 * v / consumed for k, v in stages.items()},
            "records_per_batch": consumed / max(1, s.batches - b0),
            "vectors_per_event": (s.published - v0) / consumed,
            "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(values.max()),
            "consumer_p50_ms": c50, "consumer_p99_ms": c99,
            "windows_ms": latency_log.windows() if latency_log is not None else [],
            "consumed_per_s": (s.consumed - n0) / (time.monotonic() - t0),
            "producer_achieved_per_s": summary["sent"] / summary["seconds"], "cpu": cpu,
            "kept_up": kept_up, "fetch": fetch, "calls_ms": timer.call_percentiles()}


def _where_it_waits(lat: dict, f: dict, sc: dict) -> str:
    """The latency paragraph of the RESULTS section, from what the run measured."""
    floor = lat["floor"]
    windows, floor_windows = lat.get("windows_ms", []), floor.get("windows_p99_ms", [])
    text = (f"Where an event waits: {f['age_p50_ms']:.0f} ms at p50 and {f['age_p99_ms']:.0f} ms at "
            f"p99 pass before `poll` returns it, against {floor['p50_ms']:.0f} / "
            f"{floor['p99_ms']:.0f} ms for a consumer that only polls under the same load for "
            f"as long; the consumer's own part, from `poll` to the acknowledgement, is "
            f"{lat['consumer_p50_ms']:.0f} / {lat['consumer_p99_ms']:.0f} ms.")
    if "before_request_ms" in f:
        text += (f" Of a record's age when its Fetch response arrives (p99 "
                 f"{f['arrival_age_ms'][1]:.0f} ms), {f['before_request_ms'][1]:.0f} ms at p99 pass "
                 f"before the Fetch that returns it is sent: "
                 + ("the consumer, behind, had not asked for it yet, or "
                    if not lat["kept_up"] else "")
                 + "earlier Fetches came back without it (it reached the broker late, or was "
                 "not readable there yet).")
    if len(floor_windows) > 1:
        if max(floor_windows) < 1.5 * min(floor_windows):
            text += (f" The floor holds during the run (p99 {min(floor_windows):.0f}-"
                     f"{max(floor_windows):.0f} ms per {WINDOW_S:.0f} s);")
        else:
            linger = sc["linger_ms"]
            text += (f" The floor grows during the run, p99 {floor_windows[0]:.0f} ms in its "
                     f"first {WINDOW_S:.0f} s and {floor_windows[-1]:.0f} ms in its last, with no "
                     f"consumer work at all: the embedded broker's cost per request grows with "
                     f"the record batches a partition holds (a paced producer with `linger.ms` = "
                     f"{linger:g} writes up to {1e3 / max(1.0, linger):.0f} a second to each "
                     f"partition; see docs/tansu-notes.md);")
        text += " the latency run's windows: " + ", ".join(f"{total:.0f}" for total, _ in windows) + " ms."
    if floor["p99_ms"] >= 100:
        text += (f" p99 < 100 ms cannot be shown against this broker: even an idle consumer "
                 f"gets 1% of the records {floor['p99_ms']:.0f} ms or more after they were "
                 f"produced (on the empty broker before the runs, over "
                 f"{min(sc['latency_seconds'], 20.0):.0f} s: "
                 f"{lat['floor_empty_broker']['p50_ms']:.0f} / "
                 f"{lat['floor_empty_broker']['p99_ms']:.0f} ms p50 / p99).")
    if lat["consumer_p99_ms"] >= 100:
        text += (f" The consumer's own p99 ({lat['consumer_p99_ms']:.0f} ms) is over the target "
                 f"too: at this rate each event re-solves its user's whole history, and the "
                 f"turn waits for CPU the broker and the producer also need.")
    return text


def _windows(lat: dict) -> str:
    floor = lat.get("floor", {}).get("windows_p99_ms", [])
    rows = []
    for i, (total, consumer) in enumerate(lat.get("windows_ms", [])):
        rows.append(f"{total:.0f} / {consumer:.0f} / " + (f"{floor[i]:.0f}" if i < len(floor) else "-"))
    return ", ".join(rows)


def _calls(t: dict) -> str:
    return ", ".join(f"{name} {p50:.1f} / {p99:.1f} / {top:.1f}"
                     for name, (p50, p99, top) in t.get("calls_ms", {}).items())


def _stages(t: dict) -> str:
    st = t["stage_us_per_event"]
    turn = (f"apply {st['apply']:.1f} (fold {st['fold']:.1f}, write {st['write']:.1f}), "
            f"send_vectors {st['send_vectors']:.1f}, flush {st['flush']:.1f}")
    gc_ = f"; of all these, garbage collection {st['gc']:.1f}" if "gc" in st else ""
    if st.get("overlap"):
        return (f"loop thread: poll {st['poll']:.1f}, decode {st['decode']:.1f}, waiting for the "
                f"turn thread {st['settle']:.1f}, other {st['other']:.1f}; turn thread (while the "
                f"loop polls): {turn}{gc_}")
    return (f"poll {st['poll']:.1f}, decode {st['decode']:.1f}, {turn}, "
            f"other {st['other'] + st.get('settle', 0.0):.1f}{gc_}")


def _cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {share:.2f}" for name, share in cpu.items())


def markdown(r: dict, quick: bool) -> str:
    sc, t, lat = r["scenario"], r["throughput"], r["latency"]
    lines = [
        "## stream: one consumer process, Kafka -> fold-in -> RocksDB -> published vectors",
        "",
        *(["**QUICK smoke run: sizes too small for the targets; not a result.**", ""] if quick else []),
        f"`python -m bench.bench_stream{' --quick' if quick else ''}`. Embedded Tansu broker, "
        f"producer in its own process (librdkafka), ONE consumer process (`FoldService`); all "
        f"on this machine ({os.cpu_count()} cores shared). Synthetic log: {sc['users']:,} users "
        f"(Zipf activity {sc['activity_exponent']}), {sc['items']:,} items, k={sc['factors']}, "
        f"{sc['partitions']} input partitions; batch_max_records="
        f"{r['processing']['batch_max_records']}, batch_max_ms={r['processing']['batch_max_ms']}, "
        f"history_cache_events={r['processing']['history_cache_events']}, "
        f"gram_cache_bytes={r['processing']['gram_cache_bytes']}, "
        f"apply_threads={r['processing']['apply_threads']}, fetch_max_wait_ms="
        f"{r['fetch_max_wait_ms']}. "
        f"kafka-python CRC32C: {r['crc32c']}.",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| throughput, draining a pre-produced backlog | **{t['events_per_s']:,.0f} events/s** "
        f"({t['records']:,} events in {t['seconds']:.1f} s; 10-s windows "
        f"{_fmt(t['window_min'])}..{_fmt(t['window_max'])}/s) | >= 50,000 |",
        f"| ceiling: bare consumer, fetch + parse only | kafka-python "
        f"{r['bare']['kafka_python']:,.0f} records/s; librdkafka {r['bare']['librdkafka']:,.0f} "
        f"records/s | |",
        f"| vectors published while draining | {t['vectors']:,} "
        f"({t['vectors'] / max(1, t['records']):.2f} per event, {t['batches']:,} batches) | |",
        f"| latency at {lat['rate']:,.0f} events/s offered (producer `linger.ms` "
        f"{sc['linger_ms']:g}), p50 / p95 / p99 | "
        f"**{lat['p50_ms']:.1f} / {lat['p95_ms']:.1f} / {lat['p99_ms']:.1f} ms** "
        f"(max {lat['max_ms']:.1f}; {lat['events']:,} events"
        f"{'' if lat['kept_up'] else '; DID NOT KEEP UP, consumed %.0f/s' % lat['consumed_per_s']}"
        f") | p99 < 100 ms |",
        f"| consumer CPU per event while draining | {t['cpu_us_per_event']:.1f} us | |",
        f"| wall time per event by stage (us) | {_stages(t)} | |",
        f"| CPU cores used while draining | {_cpu(t['cpu'])} | |",
        f"| CPU cores used at {lat['rate']:,.0f}/s | {_cpu(lat['cpu'])} | |",
    ]
    f = lat.get("fetch") or {}
    if f and "floor" in lat:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: age of a record when `poll` returns it, "
                         f"p50 / p99 | {f['age_p50_ms']:.1f} / {f['age_p99_ms']:.1f} ms; floor (same "
                         f"load, a consumer that only polls): {lat['floor']['p50_ms']:.1f} / "
                         f"{lat['floor']['p99_ms']:.1f} ms (on the empty broker before the runs: "
                         f"{lat['floor_empty_broker']['p50_ms']:.1f} / "
                         f"{lat['floor_empty_broker']['p99_ms']:.1f} ms) | |")
    if "gram_cache" in lat:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: cached normal equations "
                         f"(`processing.gram_cache_bytes`) | {_gram_line(lat['gram_cache'])} | |")
    if "history_cache" in lat:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: history cache "
                         f"(`processing.history_cache_events`) | {_history_line(lat['history_cache'])} | |")
    if "partitions_with_records" in f:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: Fetch responses | {f['fetch_responses']:,}; "
                         f"records for {f['partitions_with_records']:.2f} of the "
                         f"{f['partitions_asked']:.2f} partitions asked, "
                         f"{f['kib_per_partition']:.0f} KiB per partition carried"
                         + ("; time between responses p50 / p99 / max "
                            + _slashed(f["response_gap_ms"]) + " ms"
                            if "response_gap_ms" in f else "") + " | |")
    if "stage_us_per_event" in lat:
        lines.insert(-2, f"| wall time per event by stage at {lat['rate']:,.0f}/s (us) | "
                         f"{_stages(lat)}; {lat['records_per_batch']:,.0f} records per turn, "
                         f"{lat['vectors_per_event']:.2f} vectors per event | |")
    if lat.get("calls_ms"):
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: one call's wall time by stage, p50 / p99 / "
                         f"max (ms) | {_calls(lat)} | |")
    if "consumer_p99_ms" in lat:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: of the latency, in the consumer (from `poll` "
                         f"returning the record to the acknowledgement), p50 / p99 | "
                         f"{lat['consumer_p50_ms']:.1f} / {lat['consumer_p99_ms']:.1f} ms | |")
    if "arrival_age_ms" in f:
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: age of a record when its Fetch response "
                         f"arrives, p50 / p99 | {_slashed(f['arrival_age_ms'])} ms: before the Fetch "
                         f"that returned it was sent {_slashed(f['before_request_ms'])}, then in "
                         f"the broker {_slashed(f['inside_broker_ms'])} | |")
    if lat.get("windows_ms"):
        lines.insert(-2, f"| at {lat['rate']:,.0f}/s: p99 per {WINDOW_S:.0f}-s window (ms): event "
                         f"to published / of it in the consumer / floor's age at `poll` | "
                         f"{_windows(lat)} | |")
    lines += [
        "",
        "Stages: `poll` is kafka-python fetching records and `streamer.fast_fetch` parsing "
        "them (CRC32C of each batch included); `send_vectors` is formatting each vector's JSON (orjson) and handing it "
        "to librdkafka (`produce`; batching, checksums and I/O run on librdkafka's own "
        "threads, outside the GIL); `apply` is history append, "
        "fold-in and the RocksDB write, the partitions of a turn side by side on "
        f"`apply_threads` = {r['processing']['apply_threads']} threads (its wall time; `fold` "
        "and `write` add up over the threads). `other` in the CPU rows is load from processes "
        "that are not part of the benchmark.",
    ]
    lines += ["", _throughput_verdict(t)]
    if len(t.get("windows") or []) >= 2:
        w, n = t["windows"], t["window_history_lengths"]
        lines += [
            "",
            f"What limits it: the rate falls as histories grow, from {w[0]:,.0f}/s in the first "
            f"10 s (updated users held {n[0]:,.0f} events on average) to {w[-1]:,.0f}/s in the "
            f"last (at {n[-1]:,.0f} events). An exact fold-in needs the user's whole history: "
            f"each update reads it, appends, re-aggregates it, solves it (a long history's "
            f"normal equations keep their Cholesky factor, updated by a rank-1 update per "
            f"changed item, `processing.gram_cache_bytes`), and writes it to RocksDB (usually only a head of "
            f"its newest events after the stored sealed part, which is rewritten whole, up to "
            f"`history_cap` = {r['processing']['history_cap']:,} events, when the head outgrows "
            "max(16, sqrt(2 n)) events), so "
            "`apply` grows with history length while `poll`, `decode` and `send_vectors` stay "
            "per event. A user's events within one micro-batch share one solve and one write, "
            "which is why a backlog (full batches) drains faster than a live stream.",
        ]
    st = t["stage_us_per_event"]
    floor = st["poll"] + st["decode"] + st["send_vectors"] + st["flush"] + st["other"]
    lines += [
        "",
        f"Ceiling without `apply`: the per-event stages outside it (poll, decode, "
        f"send_vectors, flush, other) took {floor:.1f} us per event, so even a free fold-in "
        f"would drain at most {1e6 / floor:,.0f} events/s on this host; kafka-python's "
        f"record parsing alone is the bare-consumer ceiling above.",
    ]
    if "stage_us_per_event" in lat:
        sl = lat["stage_us_per_event"]
        lines += [
            "",
            f"Latency: at {lat['rate']:,.0f} events/s a turn holds {lat['records_per_batch']:,.0f} "
            f"records over {sc['partitions']} partitions, so nearly every event is its user's "
            f"only one in its batch ({lat['vectors_per_event']:.2f} vectors per event): each "
            f"event re-aggregates and re-solves its user's whole history (and writes its "
            f"head), and the most active users, who send most events, have the longest. `apply` "
            f"then costs {sl['apply']:.0f} us per event (fold {sl['fold']:.0f}, write "
            f"{sl['write']:.0f}) against {st['apply']:.0f} while draining, and the consumer "
            f"uses {lat['cpu'].get('consumer', float('nan')):.2f} cores of the {os.cpu_count()} it shares with "
            f"the broker and the producer.",
        ]
        if f and "floor" in lat:
            lines += ["", _where_it_waits(lat, f, sc)]
    if "profile" in r:
        p = r["profile"]
        lines += ["", f"Where the consumer's time goes ({p['tool']}; "
                  f"{p['events_per_s']:,.0f} events/s while profiled), share of `run_once`:",
                  "", "```", *p["lines"], "```"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["produce"]:
        return produce_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.bench_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--backlog", type=int, help="events pre-produced for the throughput run")
    p.add_argument("--max-seconds", type=float, help="cut the throughput drain after this long")
    p.add_argument("--rate", type=float, help="offered events/s for the latency run")
    p.add_argument("--latency-seconds", type=float, help="measured length of the latency run")
    p.add_argument("--linger-ms", type=float,
                   help=f"the latency run's producer linger.ms (default {LATENCY_LINGER_MS:g})")
    p.add_argument("--fetch-max-wait-ms", type=int,
                   help="the consumer's kafka.fetch_max_wait_ms (default: the service's, 20)")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--batch-max-records", type=int)
    p.add_argument("--batch-max-ms", type=int)
    p.add_argument("--history-cache-events", type=int, help="processing.history_cache_events")
    p.add_argument("--gram-cache-bytes", type=int, help="processing.gram_cache_bytes")
    p.add_argument("--apply-threads", type=int, help="processing.apply_threads")
    p.add_argument("--poll-while-applying", choices=["true", "false"],
                   help="processing.poll_while_applying")
    p.add_argument("--consumer", action="append", default=[], metavar="KEY=JSON",
                   help="kafka-python consumer override, e.g. --consumer fetch_min_bytes=65536")
    p.add_argument("--profile", nargs="?", const="auto", choices=["auto", "py-spy", "cprofile"],
                   help="add a profiled drain (py-spy when on PATH, else cProfile)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = p.parse_args(argv)
    sc = QUICK if args.quick else Scenario()
    changes = {name: getattr(args, name) for name in
               ("backlog", "max_seconds", "rate", "latency_seconds", "linger_ms",
                "fetch_max_wait_ms", "users", "items",
                "batch_max_records", "batch_max_ms", "history_cache_events", "gram_cache_bytes",
                "apply_threads")
               if getattr(args, name) is not None}
    if args.poll_while_applying is not None:
        changes["poll_while_applying"] = args.poll_while_applying == "true"
    sc = replace(sc, **changes)
    overrides = {}
    for item in args.consumer:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    run(sc, quick=args.quick, profile=args.profile, keep=args.keep, write=not args.no_write,
        consumer_overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
