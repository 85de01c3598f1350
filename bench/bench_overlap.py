"""Latency and drain rate with ``processing.poll_while_applying`` on and off, side by side.

``bench_stream``'s throughput and latency runs at one offered rate, with turns overlapping (the loop polls
while a second thread applies and publishes the turn before) and without, interleaved
(on, off, off, on, ...) so both see the same drift of a shared machine. Each run is a whole
``bench_stream`` run, smaller: a drain of ``--backlog`` events (its rate is the drain
column; the state it leaves, and the caches it fills, are where the live stream starts)
and ``--latency-seconds`` at ``--rate``.

The rate must be one the consumer sustains in both modes: above it both queue without
bound and the percentiles measure the queue, not the turn. 5,000 events/s is that on a
2-core machine that also runs the broker and the producer; the result table says whether
each run kept up.

Examples::

    python -m bench.bench_overlap                # 2 rounds (about 25 minutes); writes its section
    python -m bench.bench_overlap --quick        # smoke run; prints, writes nothing
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from bench.bench_stream import QUICK, Scenario, run
from bench.report import write_section

SECTION = "overlap"
MODES = (True, False)


def measure(sc: Scenario, rounds: int, quick: bool, say=print) -> dict:
    """``rounds`` runs per mode, interleaved, the order flipping every round."""
    runs: dict[bool, list[dict]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            say(f"bench_overlap: round {r + 1}/{rounds}, poll_while_applying={str(mode).lower()}")
            result = run(replace(sc, poll_while_applying=mode), quick=quick, profile=None,
                         keep=False, write=False, consumer_overrides={},
                         say=lambda line: say("  " + line))
            lat, tput = result["latency"], result["throughput"]
            runs[mode].append({
                "drain_per_s": tput["events_per_s"], "drain_window_min": tput["window_min"] or float("nan"),
                "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"],
                "kept_up": lat["kept_up"], "consumed_per_s": lat["consumed_per_s"],
                "consumer_cores": lat["cpu"].get("consumer", float("nan")),
                "records_per_batch": lat["records_per_batch"],
                "age_p99_ms": lat["fetch"].get("age_p99_ms", float("nan")),
                "floor_p99_ms": lat["floor"]["p99_ms"],
            })
    return {"scenario": sc, "rounds": rounds, "runs": runs}


def _count(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:,.0f}"  # nan: no run lasted a whole window


def markdown(r: dict) -> str:
    sc, runs = r["scenario"], r["runs"]
    med = {m: {k: float(np.median([x[k] for x in rs])) for k in rs[0] if k != "kept_up"}
           for m, rs in runs.items()}
    off = med[False]
    lines = [
        f"## overlap: `poll_while_applying` on vs off: a drain, then {sc.rate:,.0f} events/s offered",
        "",
        f"`python -m bench.bench_overlap`: `bench_stream` with a drain of a {sc.backlog:,}-event "
        f"backlog (cut at {sc.max_seconds:.0f} s), then its latency run ({sc.latency_seconds:.0f} s "
        f"measured after a {sc.warmup:.0f}-s warm-up); {sc.users:,} users, {sc.items:,} items, "
        f"k={sc.factors}, {sc.partitions} partitions; {r['rounds']} runs per mode, interleaved. "
        f"Medians, and each run's drain rate, p50 and p99. Latency: producer timestamp to the "
        f"vector's broker ack.",
        "",
        "| poll_while_applying | drain events/s | drain vs off | drain per run | slowest 10-s window | p50 ms | p95 ms | p99 ms | p50 vs off | p99 vs off | p50 per run | p99 per run | kept up | consumer cores | records per turn | record age at poll p99 ms | poll-only floor p99 ms (per run) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|",
    ]
    for mode in MODES:
        m, rs = med[mode], runs[mode]
        drains, p50s, p99s, floors = (" / ".join(f"{x[k]:,.0f}" for x in rs)
                                      for k in ("drain_per_s", "p50_ms", "p99_ms", "floor_p99_ms"))
        lines.append(
            f"| {str(mode).lower()} | {m['drain_per_s']:,.0f} | {m['drain_per_s'] / off['drain_per_s']:.2f}x | "
            f"{drains} | {_count(m['drain_window_min'])} | {m['p50_ms']:.0f} | {m['p95_ms']:.0f} | {m['p99_ms']:.0f} | "
            f"{m['p50_ms'] / off['p50_ms']:.2f}x | {m['p99_ms'] / off['p99_ms']:.2f}x | {p50s} | "
            f"{p99s} | {sum(x['kept_up'] for x in rs)} of {len(rs)} | {m['consumer_cores']:.2f} | "
            f"{m['records_per_batch']:,.0f} | {m['age_p99_ms']:.0f} | {floors} |")
    lines += [
        "",
        "\"Poll-only floor\": the record age at poll of a consumer that only polls, under the "
        "same load, measured after each run (`bench_stream`'s floor): no consumer built on "
        "kafka-python and this broker gets a p99 below it on this machine; its spread from "
        "run to run is the machine's noise.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (small scenario); writes nothing")
    p.add_argument("--rate", type=float, help="offered events/s (default 5,000)")
    p.add_argument("--backlog", type=int, help="events drained first (default 1,000,000, cut at 60 s)")
    p.add_argument("--rounds", type=int, default=2, help="runs per mode")
    p.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        sc = QUICK
    else:
        sc = Scenario(backlog=1_000_000, max_seconds=60.0, rate=5_000.0, latency_seconds=60.0)
    if args.rate is not None:
        sc = replace(sc, rate=args.rate)
    if args.backlog is not None:
        sc = replace(sc, backlog=args.backlog)
    r = measure(sc, 1 if args.quick else args.rounds, args.quick,
                say=lambda line: print(line, flush=True))
    text = markdown(r)
    print(text)
    if not (args.quick or args.no_write):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
