"""The consumer's live path without Kafka: live-sized micro-batches applied to partition
stores that hold a drained backlog, one partition at a time and side by side.

``bench_stream``'s latency run depends on the broker, the producer and the host they
share; what the consumer itself spends per live event is ``PartitionProcessor.decode`` +
``apply_many`` on the same state, measured here alone:

1. the stream scenario's synthetic log (:func:`bench.bench_stream.build`), keyed as the
   producer keys it (user id), spread over the scenario's partitions by CRC32 of the key;
2. its first ``--preload`` events folded into one store per partition in batches of
   10,000 records per partition (as a drain does); the state is set aside, so every
   measured run starts from the same one;
3. per variant and round (rounds interleaved, the order rotating): a copy of that state, a
   new processor, ``--warm`` events in live-sized batches (filling the history and
   normal-equation caches as a live stream does), then ``--events`` more, measured: wall
   and CPU time per event, and the fold and write times the batches report (summed over
   threads).

A turn holds ``--batch`` records per partition: 265 is what a turn of ``bench_stream`` at
10,000 events/s held (about 1,060 records over 4 partitions). Variants: ``apply_threads``
1 and 2. Medians over the rounds; the ratio compares the medians of one run.

Examples::

    python -m bench.bench_live            # full size (about 6 minutes on 2 cores); writes its section
    python -m bench.bench_live --quick    # smoke run; prints, writes nothing
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.bench_stream import QUICK, Scenario, build
from bench.events import load_events
from bench.report import write_section

SECTION = "live"


def partitioned_records(events: Path, count: int, partitions: int) -> list[list]:
    """The first ``count`` events as records, per partition, offsets from 0."""
    from streamer.processor import RawRecord
    from streamer.replay import event_messages

    parts: list[list] = [[] for _ in range(partitions)]
    for key, value in event_messages(load_events(events, slice(0, count)), id_prefix="live"):
        part = parts[zlib.crc32(key) % partitions]
        part.append(RawRecord(len(part), key, value, 0))
    return parts


def open_stores(state: Path, partitions: int) -> list:
    from streamer.config import StoreConfig
    from streamer.store import PartitionStore

    return [PartitionStore.open(state, "live", p, config=StoreConfig()) for p in range(partitions)]


def turns(processor, stores, model, parts, at: list[int], count: int, batch: int) -> dict:
    """Apply ``count`` events from ``at`` on, ``batch`` records per partition per turn."""
    done = users = 0
    fold = write = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    while done < count:
        work = []
        for p, store in enumerate(stores):
            records = parts[p][at[p]:at[p] + batch]
            at[p] += len(records)
            done += len(records)
            work.append((store, *processor.decode(store, records), model))
        if not any(outcome.consumed for _, _, outcome, _ in work):
            raise RuntimeError("ran out of events: lower --warm/--events or raise the scenario's backlog")
        for outcome in processor.apply_many(work):
            fold += outcome.fold_seconds
            write += outcome.write_seconds
            users += outcome.users_updated
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"events": done, "wall_us": 1e6 * wall / done, "cpu_us": 1e6 * cpu / done,
            "fold_us": 1e6 * fold / done, "write_us": 1e6 * write / done, "users": users / done}


def run(sc: Scenario, *, preload: int, warm: int, events: int, batch: int, rounds: int,
        threads: list[int], say) -> dict:
    from streamer.config import ProcessingConfig
    from streamer.model import LoadedModel
    from streamer.processor import PartitionProcessor
    from streamer.registry import ModelRegistry

    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        registry, path, n_stream = build(work, sc, say)
        model = LoadedModel(ModelRegistry(registry).load())
        started = time.monotonic()
        parts = partitioned_records(path, min(n_stream, preload + warm + events + 4 * batch * sc.partitions),
                                    sc.partitions)
        share = [len(part) * preload // sum(map(len, parts)) for part in parts]
        stores = open_stores(work / "preloaded", sc.partitions)
        processor = PartitionProcessor(ProcessingConfig())
        for start in range(0, max(share), 10_000):
            processor.apply_many([(store, *processor.decode(store, part[start:min(start + 10_000, n)]), model)
                                  for store, part, n in zip(stores, parts, share)])
        processor.close()
        for store in stores:
            store.close()
        say(f"preload: {sum(share):,} events folded into {sc.partitions} stores in "
            f"{time.monotonic() - started:.0f}s")
        results: dict[int, list[dict]] = {t: [] for t in threads}
        for r in range(rounds):
            order = threads[r % len(threads):] + threads[:r % len(threads)]
            for t in order:
                state = work / "state"
                shutil.rmtree(state, ignore_errors=True)
                shutil.copytree(work / "preloaded", state)
                stores = open_stores(state, sc.partitions)
                processor = PartitionProcessor(ProcessingConfig(apply_threads=t))
                at = list(share)
                try:
                    turns(processor, stores, model, parts, at, warm, batch)
                    m = turns(processor, stores, model, parts, at, events, batch)
                finally:
                    processor.close()
                    for store in stores:
                        store.close()
                results[t].append(m)
                say(f"round {r + 1}, apply_threads={t}: {m['wall_us']:.1f} us/event wall, "
                    f"{m['cpu_us']:.1f} CPU (fold {m['fold_us']:.1f}, write {m['write_us']:.1f}), "
                    f"{m['users']:.2f} users per event")
        medians = {t: {k: float(np.median([m[k] for m in ms])) for k in ms[0]} for t, ms in results.items()}
        return {"scenario": sc, "preload": sum(share), "warm": warm, "events": events, "batch": batch,
                "rounds": rounds, "runs": results, "medians": medians}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    sc, med = r["scenario"], r["medians"]
    base = med[min(med)]
    lines = [
        f"## live: the consumer's live path without Kafka ({sc.partitions} partitions, "
        f"{r['batch']} records per partition per turn)",
        "",
        f"`python -m bench.bench_live`. {r['preload']:,} events of the stream scenario "
        f"({sc.users:,} users, Zipf activity {sc.activity_exponent}, {sc.items:,} items, "
        f"k={sc.factors}) drained into the stores first; per run a copy of that state, "
        f"{r['warm']:,} events to warm the caches, then {r['events']:,} measured; "
        f"{r['rounds']} rounds, interleaved. Default `ProcessingConfig` but `apply_threads`.",
        "",
        "| apply_threads | wall us/event | CPU us/event | fold us/event | write us/event | users per event | wall vs 1 thread | wall per round |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t, m in sorted(med.items()):
        per_round = " / ".join(f"{x['wall_us']:.1f}" for x in r["runs"][t])
        lines.append(f"| {t} | {m['wall_us']:.1f} | {m['cpu_us']:.1f} | {m['fold_us']:.1f} | "
                     f"{m['write_us']:.1f} | {m['users']:.2f} | {base['wall_us'] / m['wall_us']:.2f}x | {per_round} |")
    lines += [
        "",
        "Wall and CPU cover `decode` and `apply_many` (history cache or RocksDB read, merge, "
        "fold-in, WriteBatch); `fold` and `write` are what the batches report, summed over "
        "the threads. No Kafka client, broker or publishing: `bench_stream` measures those, "
        "and the whole consumer at 10,000 events/s offered.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_live", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (small scenario); writes nothing")
    p.add_argument("--preload", type=int, help="events drained into the stores first (default 4,000,000)")
    p.add_argument("--warm", type=int, help="live events before measuring (default 40,000)")
    p.add_argument("--events", type=int, help="live events measured per run (default 100,000)")
    p.add_argument("--batch", type=int, default=265, help="records per partition per turn")
    p.add_argument("--rounds", type=int, help="runs per variant (default 3)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        sc, defaults = replace(QUICK, latency_seconds=0.0), (30_000, 2_000, 5_000, 1)
    else:
        sc, defaults = Scenario(backlog=4_200_000, latency_seconds=0.0), (4_000_000, 40_000, 100_000, 3)
    preload, warm, events, rounds = (given if given is not None else default for given, default in
                                     zip((args.preload, args.warm, args.events, args.rounds), defaults))
    r = run(sc, preload=preload, warm=warm, events=events, batch=args.batch, rounds=rounds,
            threads=[1, 2], say=lambda line: print(line, flush=True))
    text = markdown(r)
    print(text)
    if not (args.quick or args.no_write):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
