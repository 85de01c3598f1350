"""Soak benchmark: a steady offered rate for minutes, the consumer restarted every minute.

``python -m bench.bench_soak`` (about 12 minutes) or ``--duration 120 --restart-every 30
--rate 1000 --no-write`` for a short run. What runs where (all on this machine):

- the broker: the embedded Tansu broker (``streamer.broker.EmbeddedBroker``), a subprocess;
- the producer: ``python -m bench.bench_soak produce``, its own process (librdkafka), sending
  ``--rate`` events/s for ``--duration`` seconds (producer-contract JSON, unique event ids),
  cycling through a synthetic log (each cycle shifted later in time);
- the consumer: ``python -m streamer.cli run``, a subprocess, stopped every
  ``--restart-every`` seconds and started again at once: alternately by SIGTERM (a clean
  stop) and by SIGKILL (kill -9: no clean-up at all);
- this process: samples the consumer's RSS (``VmRSS`` of ``/proc/PID/status``) and the lag
  every ``--sample-every`` seconds. Lag is events the broker acknowledged to the producer
  minus events the consumer has applied (the sum of the store's applied offsets + 1, read
  through a RocksDB secondary), so it counts what a restart leaves to replay. The
  producer's count is at most 0.2 s old, so a lag under ``0.2 * rate`` reads as 0.

At the end the producer has stopped; the last consumer drains the topic and is stopped by
SIGTERM; then ``streamer.verify.verify`` audits every user's history and vector in the store
and on the output topic against the input topic. Reported: events offered / acknowledged /
applied, restarts, RSS per minute (first / last / max), the slope of RSS over the run after
the first restart (MB/min), the RSS growth from the 2nd minute to the end, each consumer
lifetime's RSS at its end (and its growth after a warm-up), lag max / p99, and the verify
result. Memory is flat when neither the run's nor the lifetimes' RSS keeps rising.
Results go to the "soak" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.events import load_events, save_events

REPO = Path(__file__).resolve().parent.parent
SESSION = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 500}


@dataclass(frozen=True)
class Scenario:
    duration: float = 600.0
    rate: float = 2_000.0
    restart_every: float = 60.0
    sample_every: float = 3.0
    users: int = 20_000
    items: int = 5_000
    factors: int = 32
    train_events: int = 200_000
    pool_events: int = 200_000  # the producer cycles through these
    partitions: int = 4
    drain_timeout: float = 180.0
    cache_events: int | None = None  # processing.history_cache_events; None: the default
    seed: int = 7


QUICK = Scenario(duration=40.0, rate=500.0, restart_every=15.0, sample_every=2.0,
                 users=2_000, items=500, factors=16, train_events=20_000, pool_events=20_000,
                 drain_timeout=60.0)


# --------------------------------------------------------------------------- the producer process


def produce_main(argv: list[str]) -> int:
    """``python -m bench.bench_soak produce ...``: send ``rate * duration`` events, paced."""
    from confluent_kafka import Producer


    p = argparse.ArgumentParser(prog="bench_soak produce")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--status", type=Path, required=True,
                   help="JSON progress, rewritten every 0.2 s")
    args = p.parse_args(argv)

    pool = load_events(args.events)
    users, items = pool.user_ids.ids, pool.item_ids.ids
    span = float(pool.timestamps.max() - pool.timestamps.min()) + 1.0
    total = int(args.rate * args.duration)
    delivered = [0, 0]  # ok, failed

    def on_delivery(err, _msg) -> None:
        delivered[1 if err is not None else 0] += 1

    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5})

    def write_status(sent: int) -> None:
        tmp = args.status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sent": sent, "delivered": delivered[0],
                                   "failed": delivered[1]}))
        tmp.replace(args.status)

    started = time.monotonic()
    last_status = started
    for n in range(total):
        row = n % len(pool)
        doc = {"user": users[pool.users[row]], "item": items[pool.items[row]],
               "weight": float(pool.weights[row]),
               "ts": float(pool.timestamps[row]) + (n // len(pool)) * span,
               "event_id": f"soak-{n}"}
        key = doc["user"].encode()
        while True:
            try:
                producer.produce(args.topic, key=key, value=json.dumps(doc).encode(),
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        if n % 10 == 0:
            producer.poll(0)
            ahead = n / args.rate - (time.monotonic() - started)
            if ahead > 0.001:
                time.sleep(ahead)
            now = time.monotonic()
            if now - last_status >= 0.2:
                write_status(n + 1)
                last_status = now
    producer.flush(60)
    seconds = time.monotonic() - started
    write_status(total)
    print(json.dumps({"sent": total, "delivered": delivered[0], "failed": delivered[1],
                      "seconds": seconds}), flush=True)
    return 0 if delivered[0] == total else 1


# --------------------------------------------------------------------------- setup


def build(work: Path, sc: Scenario, say) -> tuple[Path, Path]:
    """Train and promote a model; write the producer's event pool; return (registry, pool)."""
    from factors.pipeline import TrainParams, train
    from factors.synth import SynthParams, generate
    from streamer.registry import ModelRegistry

    started = time.monotonic()
    inter = generate(SynthParams(users=sc.users, items=sc.items,
                                 events=sc.train_events + sc.pool_events, seed=sc.seed))
    train_part = inter.subset(np.arange(sc.train_events))
    result = train(train_part, TrainParams(factors=sc.factors, iterations=5, seed=sc.seed))
    registry = ModelRegistry(work / "models")
    registry.promote(registry.add(result.artifact(train_part)), reason="bench soak")
    pool = inter.subset(np.arange(sc.train_events, len(inter)))
    events = save_events(work / "pool.npz", pool)
    say(f"setup: {sc.users:,} users, {sc.items:,} items, k={sc.factors} trained on "
        f"{sc.train_events:,} events; a pool of {len(pool):,} to replay "
        f"({time.monotonic() - started:.0f} s)")
    return work / "models", events


def write_config(path: Path, bootstrap: str, work: Path, registry: Path, sc: Scenario) -> Path:
    """The TOML that both ``foldstream run`` and ``verify`` read."""
    kafka = {"bootstrap_servers": bootstrap, "input_topic": "soak-in",
             "output_topic": "soak-vectors", "dead_letter_topic": "soak-dead",
             "group_id": "soak", "input_partitions": sc.partitions, **SESSION}
    sections = {"kafka": kafka, "store": {"state_dir": str(work / "state")},
                "model": {"registry_dir": str(registry)}, "metrics": {"port": 0}}
    if sc.cache_events is not None:
        sections["processing"] = {"history_cache_events": sc.cache_events}
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- measuring


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (VmRSS), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class AppliedCounter:
    """Events the consumer has applied: sum over partitions of the applied offset + 1."""

    def __init__(self, state_dir: Path, topic: str) -> None:
        self.state_dir, self.topic, self.reader = state_dir, topic, None

    def __call__(self) -> int | None:
        from streamer.reader import StoreReader

        try:
            if self.reader is None:
                if not self.state_dir.is_dir():
                    return None
                self.reader = StoreReader(self.state_dir, topic=self.topic)
            self.reader.catch_up()
            return sum(o + 1 for o in self.reader.applied_offsets().values())
        except Exception:  # a partition mid-creation, or a secondary to reopen: next time
            self.close()
            return None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass
class Lifetime:
    index: int
    pid: int
    started: float  # seconds since the producer started
    ended: float | None = None
    how: str = "running"
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)


class Consumer:
    """The ``foldstream run`` subprocess, restarted on demand; one Lifetime per process."""

    def __init__(self, config: Path, logs: Path, clock) -> None:
        self.config, self.logs, self.clock = config, logs, clock
        self.lifetimes: list[Lifetime] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        n = len(self.lifetimes)
        log = open(self.logs / f"consumer-{n}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "run", "--config", str(self.config), "--quiet"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        log.close()
        self.lifetimes.append(Lifetime(n, self.proc.pid, self.clock()))

    def sample(self) -> float | None:
        life = self.lifetimes[-1]
        if self.proc.poll() is not None:
            life.ended, life.how = self.clock(), f"exited by itself (status {self.proc.returncode})"
            return None
        mb = rss_mb(self.proc.pid)
        if mb is not None:
            life.rss.append((self.clock(), mb))
        return mb

    def stop(self, kill: bool, why: str = "") -> None:
        life = self.lifetimes[-1]
        if self.proc.poll() is None:
            self.sample()  # the RSS at the very end of this lifetime
            if kill:
                self.proc.kill()
                self.proc.wait()
                life.how = "SIGKILL"
            else:
                self.proc.terminate()
                try:
                    self.proc.wait(60)
                    life.how = "SIGTERM"
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    life.how = "SIGTERM, then SIGKILL after 60 s"
            life.how += why
        life.ended = self.clock()

    def log_tail(self, lines: int = 15) -> str:
        text = (self.logs / f"consumer-{len(self.lifetimes) - 1}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {"sent": 0, "delivered": 0, "failed": 0}


# --------------------------------------------------------------------------- the run


def run(sc: Scenario, *, keep: bool, say=print) -> dict:
    from streamer.broker import EmbeddedBroker
    from streamer.config import load_config
    from streamer.topics import ensure_topics
    from streamer.verify import verify

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        registry, events = build(work, sc, say)
        with EmbeddedBroker(work / "broker") as broker:
            config_path = write_config(work / "soak.toml", broker.bootstrap, work, registry, sc)
            config = load_config(config_path)
            ensure_topics(config.kafka)
            results = soak(sc, config, config_path, broker, events, work, say)
            say("verify: auditing the store and the output topic against the input topic")
            t = time.monotonic()
            report = verify(config, timeout_s=max(300.0, sc.duration))
            results["verify"] = {**report.summary(), "seconds": time.monotonic() - t}
            for line in report.lines()[:5]:
                say(f"  {line}")
        return results
    finally:
        if keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def soak(sc: Scenario, config, config_path: Path, broker, events: Path, work: Path,
         say) -> dict:
    status = work / "producer.json"
    (work / "logs").mkdir()
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    consumer = Consumer(config_path, work / "logs", clock)
    consumer.start()
    producer = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_soak", "produce", "--bootstrap", broker.bootstrap,
         "--topic", config.kafka.input_topic, "--events", str(events), "--rate", str(sc.rate),
         "--duration", str(sc.duration), "--status", str(status)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    applied_now = AppliedCounter(config.store.state_dir, config.kafka.input_topic)
    samples: list[dict] = []  # t, life, age, rss_mb, broker_mb, delivered, applied, lag
    restarts = {"SIGTERM": 0, "SIGKILL": 0}
    unexpected = 0
    next_restart = sc.restart_every
    next_sample = 0.0
    last_report = 0.0

    def take_sample() -> dict:
        mb = consumer.sample()
        delivered = read_status(status)["delivered"]
        applied = applied_now()
        life = consumer.lifetimes[-1]
        s = {"t": clock(), "life": life.index, "age": clock() - life.started, "rss_mb": mb,
             "broker_mb": rss_mb(broker.pid) if broker.pid else None,
             "delivered": delivered, "applied": applied,
             "lag": None if applied is None else max(0, delivered - applied)}
        samples.append(s)
        return s

    try:
        while producer.poll() is None:
            now = clock()
            if now >= next_sample:
                s = take_sample()
                next_sample += sc.sample_every
                if consumer.proc.poll() is not None:
                    unexpected += 1
                    say(f"  {now:6.0f}s consumer exited by itself:\n{consumer.log_tail()}")
                    consumer.start()
                if now - last_report >= 30:
                    last_report = now
                    say(f"  {now:6.0f}s delivered {s['delivered']:,} applied {s['applied'] or 0:,} "
                        f"lag {s['lag']} rss {s['rss_mb'] or 0:.0f} MB "
                        f"(lifetime {len(consumer.lifetimes)})")
            if now >= next_restart and now < sc.duration:
                kill = (restarts["SIGTERM"] + restarts["SIGKILL"]) % 2 == 1
                consumer.stop(kill)
                restarts["SIGKILL" if kill else "SIGTERM"] += 1
                consumer.start()
                next_restart += sc.restart_every
            time.sleep(min(0.2, max(0.0, min(next_sample, next_restart) - clock())))
        out, _ = producer.communicate(timeout=120)
        produced = json.loads(out.strip().splitlines()[-1])
        produced["exit_status"] = producer.returncode

        say(f"  {clock():6.0f}s producer done: {produced['delivered']:,} acknowledged; draining")
        drain_start = clock()
        applied = applied_now() or 0
        while applied < produced["delivered"] and clock() - drain_start < sc.drain_timeout:
            time.sleep(sc.sample_every)
            take_sample()
            applied = samples[-1]["applied"] or applied
            if consumer.proc.poll() is not None:
                unexpected += 1
                say(f"  {clock():6.0f}s consumer exited by itself:\n{consumer.log_tail()}")
                consumer.start()
        drain_seconds = clock() - drain_start
        consumer.stop(kill=False, why=" (end of run, after the drain)")
        applied = applied_now() or applied
    finally:
        applied_now.close()
        if consumer.proc is not None and consumer.proc.poll() is None:
            consumer.proc.kill()
        if producer.poll() is None:
            producer.kill()
    return {"scenario": asdict(sc), "produced": produced, "applied": applied,
            "drained": applied >= produced["delivered"], "drain_seconds": drain_seconds,
            "restarts": restarts, "unexpected_exits": unexpected, "samples": samples,
            "lifetimes": [asdict(life) for life in consumer.lifetimes]}


# --------------------------------------------------------------------------- summarising


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    t, mb = np.array(points, dtype=np.float64).T
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, mb, 1)[0] * 60.0)


def summarize(r: dict) -> dict:
    sc = r["scenario"]
    rss = [(s["t"], s["rss_mb"]) for s in r["samples"] if s["rss_mb"] is not None]
    # A lifetime's warm-up: imports, JIT cache, group join and the first batches.
    warm = min(20.0, sc["restart_every"] / 3)
    minutes = []
    for m in range(int(max(t for t, _ in rss) // 60) + 1 if rss else 0):
        inside = [mb for t, mb in rss if m * 60 <= t < (m + 1) * 60]
        if inside:
            minutes.append({"minute": m + 1, "first": inside[0], "last": inside[-1],
                            "max": max(inside), "samples": len(inside)})
    first_restart = r["lifetimes"][1]["started"] if len(r["lifetimes"]) > 1 else None
    after = [(s["t"], s["rss_mb"]) for s in r["samples"] if s["rss_mb"] is not None
             and first_restart is not None and s["t"] >= first_restart and s["age"] >= warm]
    second = next((m for m in minutes if m["minute"] == 2), None)
    growth = (minutes[-1]["max"] - second["max"]) if second and len(minutes) > 2 else None

    lifetimes = []
    for life in r["lifetimes"]:
        pts = [(t, mb) for t, mb in life["rss"]]
        steady = [(t, mb) for t, mb in pts if t - life["started"] >= warm]
        lifetimes.append({
            "index": life["index"] + 1, "started": life["started"], "ended": life["ended"],
            "how": life["how"], "end_mb": pts[-1][1] if pts else None,
            "max_mb": max((mb for _, mb in pts), default=None),
            "growth_mb": (steady[-1][1] - steady[0][1]) if len(steady) >= 2 else None,
            "slope": slope_mb_per_min(steady)})
    lags = np.array([s["lag"] for s in r["samples"] if s["lag"] is not None], dtype=np.float64)
    broker = [s["broker_mb"] for s in r["samples"] if s["broker_mb"] is not None]
    return {"minutes": minutes, "slope_after_first_restart": slope_mb_per_min(after),
            "growth_2nd_minute_to_end": growth, "second_minute_max": second and second["max"],
            "last_minute_max": minutes[-1]["max"] if minutes else None,
            "lifetimes": lifetimes, "warm": warm,
            "lag_max": float(lags.max()) if lags.size else None,
            "lag_p99": float(np.percentile(lags, 99)) if lags.size else None,
            "lag_p50": float(np.percentile(lags, 50)) if lags.size else None,
            "broker_first_mb": broker[0] if broker else None,
            "broker_last_mb": broker[-1] if broker else None}


def _mb(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _signed(x, unit: str) -> str:
    return "-" if x is None else f"{x:+,.1f} {unit}"


def text_report(r: dict, s: dict) -> list[str]:
    """The numbers, as printed at the end of the run."""
    sc, p, v = r["scenario"], r["produced"], r["verify"]
    lines = [
        f"offered {sc['rate']:,.0f} events/s for {sc['duration']:.0f} s: sent {p['sent']:,}, "
        f"acknowledged {p['delivered']:,} (failed {p['failed']}), achieved "
        f"{p['sent'] / p['seconds']:,.0f}/s",
        f"applied {r['applied']:,} ({'drained' if r['drained'] else 'NOT DRAINED'} "
        f"{r['drain_seconds']:.0f} s after the producer stopped)",
        f"restarts: {r['restarts']['SIGTERM']} SIGTERM + {r['restarts']['SIGKILL']} SIGKILL "
        f"every {sc['restart_every']:.0f} s; {r['unexpected_exits']} unexpected exits",
        f"consumer RSS: 2nd-minute max {_mb(s['second_minute_max'])} MB, last-minute max "
        f"{_mb(s['last_minute_max'])} MB, growth {_signed(s['growth_2nd_minute_to_end'], 'MB')}; "
        f"slope after the first restart {_signed(s['slope_after_first_restart'], 'MB/min')} "
        f"(samples past each lifetime's first {s['warm']:.0f} s)",
        f"lag (events acknowledged - applied): p50 {_mb(s['lag_p50'])}, p99 {_mb(s['lag_p99'])}, "
        f"max {_mb(s['lag_max'])} (max = {(s['lag_max'] or 0) / sc['rate']:.1f} s of input)",
        f"broker RSS {_mb(s['broker_first_mb'])} -> {_mb(s['broker_last_mb'])} MB",
        f"verify: {'ok' if v['ok'] else 'FAILED'}; {v['users_checked']:,} users, "
        f"{v['mismatches']} mismatched, {v['missing']} missing, {v['extra']} extra, "
        f"{v['records_read']:,} records read, {v['records_pending']} pending "
        f"({v['seconds']:.0f} s)",
        "RSS per minute (MB, first / last / max):",
    ]
    lines += [f"  min {m['minute']:3d}: {m['first']:6.0f} {m['last']:6.0f} {m['max']:6.0f}"
              for m in s["minutes"]]
    lines.append(f"lifetimes (RSS at end / max MB; growth and slope after the first "
                 f"{s['warm']:.0f} s):")
    lines += [f"  #{life['index']:2d} {life['started']:6.0f}-{life['ended'] or 0:6.0f} s  end "
              f"{_mb(life['end_mb'])} max {_mb(life['max_mb'])}  growth "
              f"{_signed(life['growth_mb'], 'MB')}, {_signed(life['slope'], 'MB/min')}  "
              f"[{life['how']}]" for life in s["lifetimes"]]
    return lines


def markdown(r: dict, s: dict, quick: bool) -> str:
    sc, p, v = r["scenario"], r["produced"], r["verify"]
    flags = (f"--duration {sc['duration']:g} --rate {sc['rate']:g} "
             f"--restart-every {sc['restart_every']:g}"
             + ("" if sc.get("cache_events") is None else f" --cache-events {sc['cache_events']}"))
    from streamer.config import ProcessingConfig

    cache = sc.get("cache_events")
    cache = ProcessingConfig().history_cache_events if cache is None else cache
    lines = [
        "## soak: steady rate, consumer restarted every minute (SIGTERM / kill -9 alternately)",
        "",
        *(["**QUICK smoke run: too short to judge memory; not a result.**", ""] if quick else []),
        f"`python -m bench.bench_soak {flags}`. Embedded Tansu broker, producer process "
        f"(librdkafka) at a steady offered rate, ONE `foldstream run` consumer process, stopped "
        f"and restarted every {sc['restart_every']:g} s, alternately by SIGTERM and SIGKILL; "
        f"all on this machine ({os.cpu_count()} cores shared). Synthetic log: {sc['users']:,} "
        f"users, {sc['items']:,} items, k={sc['factors']}, {sc['partitions']} input partitions. "
        f"RSS is the consumer's VmRSS sampled every {sc['sample_every']:g} s; lag is events "
        "acknowledged to the producer minus events applied (store offsets), same samples. "
        f"The consumer's history cache holds up to {cache:,} events "
        "(`processing.history_cache_events`, about 40 bytes each): until the stored histories "
        "exceed it, RSS follows the state it caches.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| events offered / acknowledged / applied | {p['sent']:,} / {p['delivered']:,} / "
        f"{r['applied']:,} ({p['sent'] / p['seconds']:,.0f}/s achieved; "
        f"{'drained' if r['drained'] else '**not drained**'} {r['drain_seconds']:.0f} s after "
        "the producer stopped) |",
        f"| restarts | {r['restarts']['SIGTERM']} SIGTERM + {r['restarts']['SIGKILL']} SIGKILL; "
        f"{r['unexpected_exits']} unexpected exits |",
        f"| consumer RSS, max of minute 2 -> max of the last minute | "
        f"{_mb(s['second_minute_max'])} -> {_mb(s['last_minute_max'])} MB "
        f"(**{_signed(s['growth_2nd_minute_to_end'], 'MB')}**) |",
        f"| slope of RSS over the run after the first restart (samples past each lifetime's "
        f"first {s['warm']:.0f} s) | **{_signed(s['slope_after_first_restart'], 'MB/min')}** |",
        f"| lag p50 / p99 / max (events) | {_mb(s['lag_p50'])} / {_mb(s['lag_p99'])} / "
        f"{_mb(s['lag_max'])} (max = {(s['lag_max'] or 0) / sc['rate']:.1f} s of input) |",
        f"| broker RSS, first -> last sample | {_mb(s['broker_first_mb'])} -> "
        f"{_mb(s['broker_last_mb'])} MB |",
        f"| verify | **{'ok' if v['ok'] else 'FAILED'}**: {v['users_checked']:,} users checked, "
        f"{v['mismatches']} mismatched, {v['missing']} missing, {v['extra']} extra; "
        f"{v['records_read']:,} records read |",
        "",
        "Consumer RSS per minute (MB; a minute spans the end of one lifetime and the start of "
        "the next):",
        "",
        "| minute | first | last | max |",
        "|---|---|---|---|",
        *(f"| {m['minute']} | {m['first']:.0f} | {m['last']:.0f} | {m['max']:.0f} |"
          for m in s["minutes"]),
        "",
        f"Each consumer lifetime (growth and slope after its first {s['warm']:.0f} s of "
        "start-up):",
        "",
        "| # | seconds | RSS at end (MB) | max (MB) | growth | slope | stopped by |",
        "|---|---|---|---|---|---|---|",
        *(f"| {life['index']} | {life['started']:.0f}-{life['ended'] or 0:.0f} | "
          f"{_mb(life['end_mb'])} | {_mb(life['max_mb'])} | {_signed(life['growth_mb'], 'MB')} | "
          f"{_signed(life['slope'], 'MB/min')} | {life['how']} |" for life in s["lifetimes"]),
    ]
    if v["examples"]:
        lines += ["", "verify examples:", "", *(f"- {e}" for e in v["examples"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["produce"]:
        return produce_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.bench_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of about a minute; writes nothing unless --results")
    p.add_argument("--duration", type=float, help="seconds of offered load (default 600)")
    p.add_argument("--rate", type=float, help="offered events/s (default 2000)")
    p.add_argument("--restart-every", type=float, help="seconds between restarts (default 60)")
    p.add_argument("--sample-every", type=float, help="seconds between samples (default 3)")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--partitions", type=int)
    p.add_argument("--cache-events", type=int,
                   help="processing.history_cache_events of the consumer (default: the config's)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file to write the section into (default bench/RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw samples here")
    args = p.parse_args(argv)
    sc = QUICK if args.quick else Scenario()
    changes = {name: getattr(args, name) for name in
               ("duration", "rate", "restart_every", "sample_every", "users", "items",
                "partitions", "cache_events") if getattr(args, name) is not None}
    sc = replace(sc, **changes)
    if sc.duration <= 0 or sc.rate <= 0 or sc.restart_every <= 0 or sc.sample_every <= 0:
        p.error("--duration, --rate, --restart-every and --sample-every must be > 0")

    r = run(sc, keep=args.keep)
    s = summarize(r)
    print("\n".join(text_report(r, s)))
    if args.json is not None:
        args.json.write_text(json.dumps({**r, "summary": s}, indent=1))
    section = markdown(r, s, args.quick)
    write = not args.no_write and (not args.quick or args.results is not None)
    if write:
        from bench.report import RESULTS, write_section

        write_section("soak", section, args.results or RESULTS)
        print(f"wrote the soak section of {args.results or RESULTS}")
    else:
        print("\n" + section)
    return 0 if r["verify"]["ok"] and r["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
