"""Run every benchmark in ``bench/`` (``bench_*.py``), one subprocess each, and say which failed.

Each benchmark runs as ``python -m bench.<name>`` in a fresh interpreter with
``OPENBLAS_NUM_THREADS=1`` (so thread settings and a crash stay inside one benchmark) and
writes its own section of ``bench/RESULTS.md``. A failing benchmark does not stop the
others; the exit status is 1 when any failed.

Examples::

    python -m bench.run_all                 # full sizes, every benchmark
    python -m bench.run_all --skip stream   # everything but bench_stream
    python -m bench.run_all --skip soak     # everything but the 10-minute soak
    python -m bench.run_all --quick         # smoke run, writes nothing by default
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def discover() -> list[str]:
    """Benchmark module names in ``bench/``: the factors ones first, the rest by name, the
    soak (the longest, about 12 minutes) last."""
    names = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    first = [n for n in ("bench_foldin", "bench_als", "bench_quality") if n in names]
    last = [n for n in ("bench_soak",) if n in names]
    return first + [n for n in names if n not in first and n not in last] + last


def _short(name: str) -> str:
    return name.removeprefix("bench_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these (e.g. foldin als)")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME",
                   help="leave these out (e.g. stream)")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before a benchmark is stopped and counted as failed")
    args, extra = p.parse_known_args(argv)

    names = discover()
    if args.only:
        names = [n for n in names if _short(n) in args.only or n in args.only]
    names = [n for n in names if _short(n) not in args.skip and n not in args.skip]
    if not names:
        print("no benchmarks selected", file=sys.stderr)
        return 1

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    outcomes: list[tuple[str, str, float]] = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else []),
               *extra]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout).returncode
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (timeout after {args.timeout:g} s)"
        outcomes.append((name, status, time.perf_counter() - start))

    print("\n=== summary")
    for name, status, seconds in outcomes:
        print(f"{name:20s} {status:28s} {seconds:7.1f} s")
    total = sum(s for _, _, s in outcomes)
    failed = [n for n, status, _ in outcomes if status != "ok"]
    print(f"{'total':20s} {'':28s} {total:7.1f} s")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
