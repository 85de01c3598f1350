"""Shared pieces of the factors benchmarks: thread pinning, interleaved timing, data, output.

Every benchmark measures its contenders side by side in one process, on the same data and
the same number of threads, and interleaves them round by round (rotating who goes first)
so that a noisy neighbour or a frequency change hits all of them alike. It reports medians
and ratios of medians; it never asserts a timing.
"""

from __future__ import annotations

import os

# implicit recommends a single-threaded BLAS (its own loops are the parallel ones). Setting
# the variable only helps when this module is imported before NumPy loads OpenBLAS;
# pin_threads() enforces the same limit at run time with threadpoolctl either way.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.report import RESULTS, write_section  # noqa: E402
from factors.foldin import confidence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MOVIELENS_RATINGS = REPO.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"

_BLAS_LIMIT = None  # keeps the threadpoolctl limit alive for the whole process


# ------------------------------------------------------------------------------- setup


def pin_threads(threads: int) -> int:
    """Use ``threads`` numba threads and a single-threaded BLAS; return the thread count.

    The same count is what the benchmarks pass to implicit (``num_threads``) and to
    :class:`factors.als.ImplicitALS`. It is capped at numba's pool size.
    """
    global _BLAS_LIMIT
    import threadpoolctl  # a dependency of implicit, so present wherever the benchmarks run

    _BLAS_LIMIT = threadpoolctl.threadpool_limits(1, user_api="blas")
    threads = min(threads, numba.config.NUMBA_NUM_THREADS) if threads > 0 else (
        numba.config.NUMBA_NUM_THREADS
    )
    numba.set_num_threads(threads)
    return threads


def blas_threads() -> int:
    """The largest thread count among the loaded BLAS libraries (1 after :func:`pin_threads`)."""
    import threadpoolctl

    counts = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    return max(counts, default=1)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--threads``, ``--results``, ``--no-write``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="small smoke run (seconds); does not touch bench/RESULTS.md unless "
                        "--results is given")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for numba and implicit alike (default: all cores)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"markdown file to write the section into (default: {RESULTS.name} "
                        "for full runs, nothing for --quick)")
    p.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    return p


def publish(name: str, markdown: str, args: argparse.Namespace) -> None:
    """Print the section and write it where ``args`` says (see :func:`parser`)."""
    print()
    print(markdown)
    path = args.results if args.results is not None else (None if args.quick else RESULTS)
    if args.no_write or path is None:
        print(f"\n(section {name!r} not written: quick run or --no-write)")
        return
    write_section(name, markdown, path=path)
    print(f"\nwrote section {name!r} to {path}")


def environment(threads: int) -> str:
    """One line naming the library versions and thread settings, for the results."""
    import implicit

    return (
        f"{threads} threads for numba ({_threading_layer()}) and implicit, "
        f"BLAS threads {blas_threads()} (OPENBLAS_NUM_THREADS=1, as implicit recommends); "
        f"numpy {np.__version__}, numba {numba.__version__}, implicit {implicit.__version__}, "
        f"{platform.processor() or platform.machine()}; {others_cpu()}"
    )


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds busy machine-wide, CPU seconds of this process tree)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # no guest time: in user
    t = os.times()
    return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system


_START_CPU = _cpu_snapshot()


def others_cpu() -> str:
    """How much of the machine other processes used since this module was imported.

    Machine-wide busy CPU time (``/proc/stat``) minus this process's own, as a share of
    all cores over the elapsed time: the noise the medians had to live with.
    """
    now = _cpu_snapshot()
    if _START_CPU is None or now is None:
        return "other processes' CPU use unknown"
    wall = now[0] - _START_CPU[0]
    others = (now[1] - _START_CPU[1]) - (now[2] - _START_CPU[2])
    share = max(others, 0.0) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
    return f"other processes used {share:.0%} of the {os.cpu_count()} cores during the run"


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------ timing


def interleaved(
    contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each contender, ``rounds`` times, round by round.

    Each round runs every contender once; the order rotates by one place per round so that
    no contender always follows the same one. ``warmup`` untimed rounds come first (JIT
    compilation, caches, page faults).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the values relative to their median, e.g. ``-3%/+8%``."""
    m = median(values)
    return f"-{(m - min(values)) / m:.0%}/+{(max(values) - m) / m:.0%}"


# -------------------------------------------------------------------------------- data


def synthetic_matrix(
    users: int,
    items: int,
    nnz: int,
    seed: int = 0,
    user_exponent: float = 0.9,
    item_exponent: float = 1.0,
) -> sp.csr_matrix:
    """A users x items CSR of exactly ``nnz`` distinct pairs with raw weights 1..4.

    A fast direct generator (not :func:`factors.synth.generate`, which simulates events
    one by one and takes minutes at millions of events): user activity and item
    popularity follow Zipf laws ``rank ** -exponent`` over random permutations of the
    ranks; pairs are drawn independently and the first ``nnz`` distinct ones kept.
    Deterministic for a seed. Returns float32 data, int32 indices, sorted.
    """
    rng = np.random.default_rng(seed)
    pu = _zipf(users, user_exponent, rng)
    pi = _zipf(items, item_exponent, rng)
    keys = np.empty(0, dtype=np.int64)
    while True:
        draw = int(1.2 * (nnz - len(keys))) + 1024
        u = rng.choice(users, draw, p=pu)
        i = rng.choice(items, draw, p=pi)
        keys = np.concatenate([keys, u.astype(np.int64) * items + i])
        _, first = np.unique(keys, return_index=True)
        if len(first) >= nnz:
            keys = keys[np.sort(first)[:nnz]]
            break
        keys = keys[np.sort(first)]
    weights = rng.integers(1, 5, nnz).astype(np.float32)
    R = sp.csr_matrix((weights, (keys // items, keys % items)), shape=(users, items),
                      dtype=np.float32)
    R.sort_indices()
    R.indices = R.indices.astype(np.int32)
    return R


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    p = np.empty(n)
    p[rng.permutation(n)] = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def implicit_input(R: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """``R`` with data ``c = 1 + alpha * r``: our confidence in implicit's terms (its alpha=1).

    implicit solves ``A = YtY + reg I + sum (c - 1) y y^T``, ``b = sum c y`` with ``c`` its
    input times its own alpha; ours is ``c = 1 + s`` with ``s = alpha * r``. The ``s`` come
    from :func:`factors.foldin.confidence`, the function our code uses.
    """
    C = sp.csr_matrix(R, dtype=np.float32, copy=True)
    C.data = (np.float32(1.0) + confidence(C.data, alpha)).astype(np.float32)
    return C


# ------------------------------------------------------------------------------ output


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    def align(cells):
        return ["---:" if isinstance(c, (int, float)) or _numeric(c) else "---" for c in cells]

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align(rows[0])) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(text) -> bool:
    text = str(text).rstrip("x%").replace(",", "").replace("−", "-")
    try:
        float(text)
    except ValueError:
        return False
    return True


def command_line() -> str:
    """The command that produced a section, as one would type it from the repo root."""
    module = Path(sys.argv[0]).stem
    return " ".join(["python -m bench." + module, *sys.argv[1:]])


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return numba.config.THREADING_LAYER
