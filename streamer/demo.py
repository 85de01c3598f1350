"""``foldstream demo``: the whole pipeline on one machine, in about a minute (41 s warm on 2
cores; the first run compiles the numba kernels: 2.5-3 minutes).

1. synthesise a drifting interaction log (or read ``--interactions``);
2. train the first model on the events before a time cutoff and promote it;
3. start the embedded broker and create the topics;
4. replay the whole log into the input topic in time order (plus a few malformed records,
   to show dead-lettering) while the consumer folds every event in;
5. check a sample of stored vectors against the offline fold-in of the same histories;
6. print a summary: events applied, vectors published, dead-lettered, latency
   percentiles, and prequential hit@10 with fold-in versus a stale model.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from factors.data import Interactions, read_interactions
from factors.evaluate import prequential, temporal_split
from factors.foldin import FoldIn
from factors.pipeline import TrainParams, fold_in_users, train
from factors.synth import SynthParams, generate
from streamer.broker import EmbeddedBroker
from streamer.config import AppConfig
from streamer.kafka_io import make_producer
from streamer.progress import ProgressLine
from streamer.reader import StoreReader
from streamer.registry import ModelRegistry
from streamer.replay import event_messages, log_fingerprint, produce
from streamer.service import FoldService
from streamer.topics import ensure_topics
from streamer.warmup import compile_kernels_once

# Malformed records mixed into the replay, one of each kind, to show the dead-letter path.
MALFORMED = [
    (b"demo-bad", b"{not json"),
    (b"demo-bad", b'{"user": "demo-bad"}'),
    (b"demo-bad", b'{"user": "demo-bad", "item": "x", "weight": -1}'),
    (None, b'{"user": "demo-bad", "item": "x"}'),
]


@dataclass(frozen=True)
class DemoParams:
    workdir: Path = Path("demo-run")
    interactions: Path | None = None
    users: int = 20_000
    items: int = 5_000
    events: int = 300_000
    seed: int = 0
    train_fraction: float = 0.5
    partitions: int = 4
    rate: float | None = None
    k: int = 10
    verify_sample: int = 500
    prequential_sample: int = 20_000


def run_demo(params: DemoParams, train_params: TrainParams, out: TextIO = sys.stdout) -> dict:
    """Steps 1-6 of the module docstring; returns the summary (also in ``summary.json``).

    The replay runs in a child process started with ``spawn``, which imports the caller's
    main module again: a script that calls this needs an ``if __name__ == "__main__":``
    guard (``foldstream demo`` has one).
    """
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    work = params.workdir
    for sub in ("state", "models", "broker"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    if params.interactions is not None:
        inter, _ = read_interactions(params.interactions)
        source = str(params.interactions)
    else:
        inter = generate(SynthParams(users=params.users, items=params.items,
                                     events=params.events, seed=params.seed,
                                     activity_exponent=0.8))
        source = f"synthetic ({params.users} users, {params.items} items, seed {params.seed})"
    say(f"[1/5] data: {len(inter)} events from {source}")

    train_part, stream_part = temporal_split(inter, params.train_fraction)
    bar = ProgressLine("      training", total=train_params.iterations)
    result = train(train_part, train_params,
                   callback=lambda it, loss, s: bar.update(it + 1, f"loss={loss:.4g}"))
    bar.close()
    registry = ModelRegistry(work / "models")
    version = registry.add(result.artifact(train_part))
    registry.promote(version, reason="demo: initial model")
    say(f"[2/5] trained {version} on {len(train_part)} events before the cutoff in "
        f"{result.seconds:.1f}s (k={train_params.factors}, {train_params.solver})")

    with EmbeddedBroker(work / "broker") as broker:
        config = AppConfig().replace(
            kafka={"bootstrap_servers": broker.bootstrap, "input_partitions": params.partitions,
                   "session_timeout_ms": 6_000, "heartbeat_interval_ms": 500},
            store={"state_dir": work / "state"},
            model={"registry_dir": work / "models"},
            metrics={"port": 0},
        )
        ensure_topics(config.kafka)
        say(f"[3/5] broker on {broker.bootstrap}; topics {config.kafka.input_topic} "
            f"({params.partitions} partitions), {config.kafka.output_topic} (compacted), "
            f"{config.kafka.dead_letter_topic}")
        summary = _stream(config, inter, params, say)

    summary.update(_verify(config, registry, inter, params))
    say(f"[4/5] verified {summary['verified_users']} stored vectors against the offline "
        f"fold-in: max |difference| {summary['verify_max_abs_diff']:.2e}")

    summary.update(_prequential(result, train_part, stream_part, train_params, params))
    say("[5/5] summary")
    for line in _summary_lines(summary):
        say("      " + line)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _messages(inter: Interactions):
    """The replay: every event in time order, with MALFORMED spread through it."""
    bad_every = max(1, len(inter) // (len(MALFORMED) + 1))
    bad = iter(MALFORMED)
    for i, message in enumerate(event_messages(inter, log_fingerprint(inter))):
        if i and i % bad_every == 0:
            extra = next(bad, None)
            if extra is not None:
                yield extra
        yield message
    yield from bad


def _replay(bootstrap: str, topic: str, inter: Interactions, rate: float | None, produced,
            stop, errors) -> None:
    """The producer process: replays ``inter`` into ``topic``; counts into ``produced``
    (a shared int), stops when ``stop`` is set, reports an error on ``errors``."""
    try:
        producer = make_producer(bootstrap, linger_ms=20, batch_size=256 * 1024)
        try:
            produce(producer, topic, _messages(inter), rate=rate,
                    on_progress=lambda n: setattr(produced, "value", n), should_stop=stop.is_set)
        finally:
            producer.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the demo's process
        errors.put(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def _stream(config: AppConfig, inter: Interactions, params: DemoParams, say) -> dict:
    total = len(inter) + len(MALFORMED)
    # The producer runs in its own process: in a thread of this one it held the GIL the
    # consumer needs, and the demo measured the two taking turns (3-8k records/s) instead of
    # the consumer.
    ctx = multiprocessing.get_context("spawn")
    produced, stop, errors = ctx.Value("q", 0, lock=False), ctx.Event(), ctx.Queue()
    replayer = ctx.Process(target=_replay, name="demo-producer", daemon=True,
                           args=(config.kafka.bootstrap_servers, config.kafka.input_topic, inter,
                                 params.rate, produced, stop, errors))

    def producer_failed() -> str | None:
        if replayer.exitcode in (None, 0):
            return None
        try:
            return errors.get(timeout=1)
        except queue.Empty:
            return f"exit code {replayer.exitcode}"

    bar = ProgressLine("      streaming", total=total, force=False)
    last = {"t": time.monotonic(), "applied": 0}
    rates: list[float] = []

    def on_batch(service: FoldService, outcomes) -> None:
        now = time.monotonic()
        if now - last["t"] >= 0.5:
            s = service.stats
            rate = (s.consumed - last["applied"]) / (now - last["t"])
            rates.append(rate)
            lag = max(0, produced.value - s.consumed)
            bar.update(s.consumed, f"{rate:8.0f} ev/s lag={lag} users={s.users_updated}")
            last.update(t=now, applied=s.consumed)

    service = FoldService(config, on_batch=on_batch)
    seconds = compile_kernels_once(service.model, config.processing)
    if seconds is not None:
        say(f"      consumer kernels compiled (numba; cached for the next run) in {seconds:.1f}s")
    say(f"      replaying {len(inter)} events (+{len(MALFORMED)} malformed) in time order "
        "(a separate producer process)")
    started = time.monotonic()
    service.start()
    replayer.start()
    try:
        while service.stats.consumed < total:
            failed = producer_failed()
            if failed:
                raise RuntimeError(f"demo: the producer process failed: {failed}")
            if time.monotonic() - started > 1800:
                raise TimeoutError("demo: the consumer did not catch up within 30 minutes")
            service.run_once()
    finally:
        stop.set()
        service.close()
        replayer.join(30)
        if replayer.is_alive():
            replayer.terminate()
        bar.close()
    seconds = time.monotonic() - started
    s = service.stats
    p50, p99 = s.latency_percentiles(50, 99)
    c50, c99 = s.consumer_latency_percentiles(50, 99)
    say(f"      streamed {s.consumed} records in {seconds:.1f}s "
        f"({s.consumed / seconds:.0f} records/s end to end)")
    return {
        "events_applied": s.applied,
        "records_consumed": s.consumed,
        "vectors_published": s.published,
        "dead_lettered": s.dead_lettered,
        "unknown_item_events": s.unknown_item_events,
        "stream_seconds": round(seconds, 2),
        "throughput_events_per_s": round(s.consumed / seconds, 1),
        "latency_p50_ms": round(p50, 1),
        "latency_p99_ms": round(p99, 1),
        "consumer_latency_p50_ms": round(c50, 1),
        "consumer_latency_p99_ms": round(c99, 1),
        "model_version": service.model.version,
    }


def _verify(config: AppConfig, registry: ModelRegistry, inter: Interactions,
            params: DemoParams) -> dict:
    active = registry.load()
    tp = TrainParams.from_dict(active.artifact.params)
    rng = np.random.default_rng(params.seed)
    n_users = len(inter.user_ids)
    sample = rng.choice(n_users, size=min(params.verify_sample, n_users), replace=False)
    # The store keeps each user's newest history_cap events: so does the oracle.
    subset = last_events_per_user(inter.subset(np.isin(inter.users, sample)),
                                  config.processing.history_cap)
    vectors, _ = fold_in_users(active.artifact.item_factors, active.artifact.item_ids, tp, subset)
    with StoreReader(config.store.state_dir, topic=config.kafka.input_topic) as reader:
        stored = reader.get_vectors([inter.user_ids.id_of(int(u)) for u in sample])
    worst = 0.0
    for u in sample.tolist():
        user = inter.user_ids.id_of(u)
        if not np.any(subset.users == u):
            continue
        if user not in stored:
            raise AssertionError(f"demo: user {user!r} has events but no stored vector")
        worst = max(worst, float(np.max(np.abs(stored[user].vector - vectors[u]))))
    return {"verified_users": int(len(stored)), "verify_max_abs_diff": worst}


def last_events_per_user(inter: Interactions, cap: int) -> Interactions:
    """Each user's ``cap`` newest events (by time, ties in log order), in time order."""
    order = np.argsort(inter.timestamps, kind="stable")[::-1]  # newest first
    by_user = order[np.argsort(inter.users[order], kind="stable")]
    users = inter.users[by_user]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    keep = np.sort(by_user[rank < cap])
    return inter.subset(keep).sorted_by_time()


def _prequential(result, train_part: Interactions, stream_part: Interactions,
                 train_params: TrainParams, params: DemoParams) -> dict:
    sample = stream_part
    if len(stream_part) > params.prequential_sample:
        sample = stream_part.subset(np.arange(params.prequential_sample))
    solver = FoldIn.from_model(result.model)
    out = {}
    for mode in ("foldin", "stale"):
        stats = prequential(solver, result.model.user_factors_, train_part, sample,
                            k=params.k, mode=mode, params=train_params.confidence)
        out[f"prequential_hit@{params.k}_{mode}"] = round(stats["hit_rate"], 4)
        out[f"prequential_ndcg@{params.k}_{mode}"] = round(stats["ndcg"], 4)
    out["prequential_events"] = int(len(sample))
    return out


def _summary_lines(summary: dict) -> list[str]:
    k = next((key.split("@")[1].split("_")[0] for key in summary if key.startswith("prequential_hit@")), "10")
    return [
        f"events applied          {summary['events_applied']}",
        f"vectors published       {summary['vectors_published']}",
        f"dead-lettered           {summary['dead_lettered']}",
        f"events on unknown items {summary['unknown_item_events']}",
        f"throughput              {summary['throughput_events_per_s']:.0f} records/s",
        f"event->published p50    {summary['latency_p50_ms']:.1f} ms (the replay outruns the "
        "consumer: includes queueing behind the backlog)",
        f"event->published p99    {summary['latency_p99_ms']:.1f} ms",
        f"  of which in consumer  p50 {summary['consumer_latency_p50_ms']:.1f} ms, p99 "
        f"{summary['consumer_latency_p99_ms']:.1f} ms (from poll to acknowledgement)",
        f"prequential hit@{k}      fold-in {summary[f'prequential_hit@{k}_foldin']:.4f}  "
        f"vs stale {summary[f'prequential_hit@{k}_stale']:.4f} "
        f"(first {summary['prequential_events']} streamed events)",
    ]
