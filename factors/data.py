"""Interactions in: a CSV event log -> dense-indexed arrays -> a users x items weight matrix.

Data flows one way. :func:`read_interactions` parses and validates a CSV file into an
:class:`Interactions` event log (one row per event, string ids mapped to dense ``int32``
indices by :class:`IdIndex`); :func:`weight_matrix` decays and sums the raw weights of
each (user, item) pair into a CSR matrix; :func:`scale_weights` turns those aggregated
weights into the confidences ``s = alpha * f(r)`` that the kernels take.

CSV format
----------
A header row, then one event per row. The columns are named by :class:`CsvColumns`
(default ``user,item,ts,weight``; the order in the file does not matter, other columns
are ignored). A MovieLens header (``userId,movieId,rating,timestamp``) is accepted
without configuration. Ids are arbitrary non-empty strings, kept exactly (no stripping).
Timestamps are seconds since the Unix epoch or ISO-8601 date-times (naive means UTC); an
empty timestamp cell means "no timestamp" (NaN). Weights are finite numbers >= 0.
"""

from __future__ import annotations

import csv
import gc
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from itertools import islice, repeat
from operator import itemgetter

import numpy as np
import scipy.sparse as sp

from factors.errors import ConfigError, DataError

__all__ = [
    "ConfidenceParams",
    "CsvColumns",
    "IdIndex",
    "Interactions",
    "ReadReport",
    "decay_weights",
    "read_interactions",
    "scale_weights",
    "weight_matrix",
    "write_interactions",
]

#: Rows parsed per vectorised step; bounds the memory held as Python strings.
_CHUNK_ROWS = 65_536
#: How many "file:line: reason" messages a ReadReport keeps.
_MAX_REPORTED = 10
_TS_EXPECTED = "timestamp must be seconds since the epoch or an ISO-8601 date-time"


# ---------------------------------------------------------------------------------------
# Ids and the event log
# ---------------------------------------------------------------------------------------


class IdIndex:
    """Bidirectional map between arbitrary UTF-8 string ids and dense int32 indices 0..n-1.

    Indices are given in first-seen order and never change: :meth:`add` only appends.
    """

    __slots__ = ("_ids", "_pos")

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> IdIndex:
        """Index ``ids`` in first-seen order; repeated ids keep their first index."""
        index = cls()
        for id_ in dict.fromkeys(ids):
            index.add(id_)
        return index

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pos

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdIndex):
            return NotImplemented
        return self._ids == other._ids

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        head = ", ".join(map(repr, self._ids[:3]))
        more = ", ..." if len(self._ids) > 3 else ""
        return f"IdIndex([{head}{more}], n={len(self._ids)})"

    def index(self, id_: str) -> int:
        """The index of ``id_``; ``KeyError`` if it is unknown."""
        return self._pos[id_]

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Indices of ``ids`` as ``int32``, ``-1`` for unknown ids."""
        return np.fromiter(map(self._pos.get, ids, repeat(-1)), dtype=np.int32, count=len(ids))

    def add(self, id_: str) -> int:
        """The index of ``id_``, appending it first if it is new."""
        pos = self._pos.get(id_)
        if pos is None:
            if not isinstance(id_, str):
                raise TypeError(f"ids must be str, got {type(id_).__name__}: {id_!r}")
            pos = self._pos[id_] = len(self._ids)
            self._ids.append(id_)
        return pos

    def id_of(self, index: int) -> str:
        """The id at ``index``; ``IndexError`` outside ``0..len-1``."""
        if not 0 <= index < len(self._ids):
            raise IndexError(f"index must be in [0, {len(self._ids)}), got {index}")
        return self._ids[index]

    @property
    def ids(self) -> list[str]:
        """All ids, position == index (a copy: use :meth:`id_of` for single lookups)."""
        return list(self._ids)

    def _encode(self, ids: Sequence[str]) -> np.ndarray:
        """Indices of ``ids`` as int32, appending new ids in first-seen order."""
        pos = self._pos
        for id_ in dict.fromkeys(ids):
            if id_ not in pos:
                pos[id_] = len(self._ids)
                self._ids.append(id_)
        return np.fromiter(map(pos.__getitem__, ids), dtype=np.int32, count=len(ids))


@dataclass(eq=False)
class Interactions:
    """An event log: one row per event, in file order (not aggregated).

    Attributes
    ----------
    users, items : np.ndarray
        ``int32`` indices into ``user_ids`` / ``item_ids``.
    weights : np.ndarray
        ``float32`` raw weights ``>= 0`` (1.0 when the file has no weight column).
    timestamps : np.ndarray
        ``float64`` seconds since the Unix epoch; NaN where unknown.
    user_ids, item_ids : IdIndex
        May hold ids that no event uses (e.g. after :meth:`subset`).
    """

    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    timestamps: np.ndarray
    user_ids: IdIndex
    item_ids: IdIndex

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, dtype=np.int32)
        self.items = np.asarray(self.items, dtype=np.int32)
        self.weights = np.asarray(self.weights, dtype=np.float32)
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        lengths = {a.shape for a in (self.users, self.items, self.weights, self.timestamps)}
        if len(lengths) != 1 or self.users.ndim != 1:
            raise DataError(
                "users, items, weights and timestamps must be 1-d arrays of one length, got "
                f"shapes {self.users.shape}, {self.items.shape}, {self.weights.shape}, "
                f"{self.timestamps.shape}"
            )

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, mask_or_indices) -> Interactions:
        """The events picked by a boolean mask or an index array (copied; IdIndex objects shared)."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool and sel.shape != self.users.shape:
            raise DataError(f"mask must have shape {self.users.shape}, got {sel.shape}")
        if sel.dtype != bool and sel.size == 0:
            sel = sel.astype(np.intp)
        return Interactions(
            users=self.users[sel],
            items=self.items[sel],
            weights=self.weights[sel],
            timestamps=self.timestamps[sel],
            user_ids=self.user_ids,
            item_ids=self.item_ids,
        )

    def sorted_by_time(self) -> Interactions:
        """The events in time order: stable (ties keep their order), NaN timestamps last."""
        return self.subset(np.argsort(self.timestamps, kind="stable"))


# ---------------------------------------------------------------------------------------
# CSV in and out
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvColumns:
    """Header names of the CSV columns; ``None`` ignores an optional column.

    While a name is left at its default and is absent from the header, its MovieLens name
    is used instead (user -> ``userId``, item -> ``movieId``, ts -> ``timestamp``,
    weight -> ``rating``). Header names are compared after stripping spaces.
    """

    user: str = "user"
    item: str = "item"
    ts: str | None = "ts"
    weight: str | None = "weight"


_MOVIELENS = CsvColumns(user="userId", item="movieId", ts="timestamp", weight="rating")


@dataclass(frozen=True)
class ReadReport:
    """What :func:`read_interactions` did.

    Attributes
    ----------
    path : str
        The file, as given.
    rows : int
        Events loaded (blank lines and skipped rows are not counted).
    skipped : int
        Bad rows left out (always 0 unless ``skip_bad``).
    errors : tuple of str
        The first few ``"file:line: reason"`` messages of the skipped rows.
    columns : CsvColumns or None
        The header names actually used; ``ts``/``weight`` are None when the file lacks them.
    """

    path: str
    rows: int
    skipped: int
    errors: tuple[str, ...]
    columns: CsvColumns | None = None


@dataclass(frozen=True)
class _Layout:
    """Resolved positions of the wanted columns in the header."""

    width: int
    header: str
    user: int
    item: int
    ts: int | None
    weight: int | None


def read_interactions(
    path, columns: CsvColumns | None = None, skip_bad: bool = False
) -> tuple[Interactions, ReadReport]:
    """Read an event log from a UTF-8 CSV file with a header row.

    Parameters
    ----------
    path : str or os.PathLike
        The CSV file (a leading byte-order mark is ignored).
    columns : CsvColumns, optional
        Header names; defaults to ``user,item,ts,weight`` with MovieLens fallbacks.
    skip_bad : bool
        Leave out bad rows and count them in the report instead of raising.

    Returns
    -------
    (Interactions, ReadReport)
        Events in file order; ids indexed in first-seen order. A file holding only a
        header gives an empty ``Interactions``. Missing weight column: every weight is
        1.0. Missing timestamp column or empty timestamp cell: NaN.

    Raises
    ------
    DataError
        The file is empty (no header), lacks a required column, is not UTF-8 or not
        parsable CSV, or (unless ``skip_bad``) has a bad row: wrong number of fields,
        an empty id, a weight that is not a finite number >= 0, or a timestamp that is
        neither a finite number nor ISO-8601. The message reads ``"file:line: reason"``.
        Blank lines are ignored.
    """
    name = os.fspath(path)
    wanted = columns if columns is not None else CsvColumns()
    user_ids, item_ids = IdIndex(), IdIndex()
    parts: list[tuple[np.ndarray, ...]] = []
    bad_seen: list[tuple[int, str]] = []
    skipped = 0
    record = 0  # data records (including blank lines) consumed so far
    reader = None
    try:
        with _gc_paused(), open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{name}: empty file, expected a header row naming the columns")
            layout, used = _resolve_columns(name, header, wanted)
            while rows := list(islice(reader, _CHUNK_ROWS)):
                keep, cols, bad = _parse_rows(rows, layout)
                if bad:
                    if not skip_bad:
                        offset, reason = bad[0]
                        line = _record_lines(path, [record + offset])[record + offset]
                        raise DataError(f"{name}:{line}: {reason}")
                    skipped += len(bad)
                    room = _MAX_REPORTED - len(bad_seen)
                    bad_seen.extend((record + offset, reason) for offset, reason in bad[:room])
                if keep:
                    users_s, items_s, ts, weights = cols
                    parts.append(
                        (user_ids._encode(users_s), item_ids._encode(items_s), weights, ts)
                    )
                record += len(rows)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 near byte {exc.start}: {exc.reason}") from exc
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 1
        raise DataError(f"{name}:{line}: unparsable CSV: {exc}") from exc

    if parts:
        users, items, weights, ts = (np.concatenate(cols) for cols in zip(*parts))
    else:
        users = items = np.empty(0, np.int32)
        weights, ts = np.empty(0, np.float32), np.empty(0, np.float64)
    inter = Interactions(users, items, weights, ts, user_ids, item_ids)
    lines = _record_lines(path, [rec for rec, _ in bad_seen]) if bad_seen else {}
    errors = tuple(f"{name}:{lines[rec]}: {reason}" for rec, reason in bad_seen)
    return inter, ReadReport(name, len(inter), skipped, errors, used)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while parsing.

    Parsing makes millions of short-lived lists (one per CSV record), which would trigger
    full collections over the whole heap again and again (2-3x the parse time). They hold
    only strings, so reference counting alone frees them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _resolve_columns(
    name: str, header: list[str], wanted: CsvColumns
) -> tuple[_Layout, CsvColumns]:
    """Positions of the wanted columns, with MovieLens fallbacks for default names."""
    stripped = [h.strip() for h in header]
    default = CsvColumns()
    found: dict[str, int | None] = {}
    for field in fields(CsvColumns):
        key = field.name
        col = getattr(wanted, key)
        if col is not None and col not in stripped and col == getattr(default, key):
            alias = getattr(_MOVIELENS, key)
            col = alias if alias in stripped else col
        if col is None or (col not in stripped and key in ("ts", "weight")):
            found[key] = None
            continue
        if col not in stripped:
            expected = repr(col)
            if col == getattr(default, key):
                expected += f" (or MovieLens {getattr(_MOVIELENS, key)!r})"
            raise DataError(
                f"{name}:1: missing required {key} column {expected}; found columns {stripped}"
            )
        if stripped.count(col) > 1:
            raise DataError(
                f"{name}:1: column {col!r} must appear once, got {stripped.count(col)} times "
                f"in {stripped}"
            )
        found[key] = stripped.index(col)
    layout = _Layout(len(header), ",".join(stripped), **found)
    used = CsvColumns(
        **{k: (stripped[i] if i is not None else None) for k, i in found.items()}
    )
    return layout, used


def _parse_rows(rows: list[list[str]], layout: _Layout):
    """Validate and convert one chunk of CSV records.

    Returns ``(n_kept, (users, items, ts, weights), bad)``: the id strings and numeric
    arrays of the good rows, and ``(offset in chunk, reason)`` for each bad row in order.
    Blank records (``[]``) are dropped silently.
    """
    n = len(rows)
    lengths = np.fromiter(map(len, rows), dtype=np.intp, count=n)
    problems: dict[int, str] = {}
    offsets = np.flatnonzero(lengths == layout.width)
    if len(offsets) != n:
        for off in np.flatnonzero((lengths != layout.width) & (lengths != 0)):
            problems[int(off)] = (
                f"expected {layout.width} fields ({layout.header}), got {lengths[off]}: "
                f"{_show(','.join(rows[off]))}"
            )
        rows = [rows[i] for i in offsets]
    m = len(rows)
    if m == 0:
        return 0, None, sorted(problems.items())

    picks = [layout.user, layout.item] + [i for i in (layout.ts, layout.weight) if i is not None]
    cols = list(zip(*map(itemgetter(*picks), rows)))
    users, items = cols[0], cols[1]
    ts_col = cols[2] if layout.ts is not None else None
    w_col = cols[-1] if layout.weight is not None else None

    # (bad mask, what is wrong, the texts): in column order, a row reports its first problem.
    checks: list[tuple[np.ndarray, str, Sequence[str]]] = []
    for label, ids in (("user", users), ("item", items)):
        if "" in ids:
            checks.append((np.array([s == "" for s in ids]), f"{label} id must be non-empty", ids))
    if ts_col is None:
        ts = np.full(m, np.nan)
    else:
        ts, ts_bad = _parse_timestamps(ts_col)
        checks.append((ts_bad, _TS_EXPECTED, ts_col))
    if w_col is None:
        weights = np.ones(m, dtype=np.float32)
    else:
        weights = _parse_floats(w_col)
        with np.errstate(over="ignore", invalid="ignore"):
            weights = weights.astype(np.float32)
            w_bad = ~(np.isfinite(weights) & (weights >= 0))
        checks.append((w_bad, "weight must be a finite number >= 0", w_col))

    checks = [c for c in checks if c[0].any()]
    if checks:
        any_bad = np.logical_or.reduce([c[0] for c in checks])
        for j in np.flatnonzero(any_bad):
            _, what, values = next(c for c in checks if c[0][j])
            problems.setdefault(int(offsets[j]), f"{what}, got {_show(values[j])}")
        good = np.flatnonzero(~any_bad)
        users = [users[j] for j in good]
        items = [items[j] for j in good]
        ts, weights = ts[good], weights[good]
    return len(users), (users, items, ts, weights), sorted(problems.items())


def _parse_floats(values: Sequence[str]) -> np.ndarray:
    """float64 of each string; NaN where it is not a number."""
    try:
        return np.fromiter(map(float, values), dtype=np.float64, count=len(values))
    except ValueError:
        return np.array([_float_or_nan(s) for s in values], dtype=np.float64)


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parse_timestamps(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(seconds float64, bad mask). Numbers or ISO-8601; an empty cell is NaN, not bad."""
    try:
        ts = np.fromiter(map(float, values), dtype=np.float64, count=len(values))
        return ts, ~np.isfinite(ts)
    except ValueError:
        pass
    ts = np.empty(len(values), dtype=np.float64)
    bad = np.zeros(len(values), dtype=bool)
    for j, text in enumerate(values):
        value = _parse_timestamp(text)
        if value is None:
            bad[j] = True
            value = math.nan
        ts[j] = value
    return ts, bad


def _parse_timestamp(text: str) -> float | None:
    """Seconds since the epoch, NaN for an empty cell, None when unparsable."""
    try:
        value = float(text)
    except ValueError:
        text = text.strip()
        if not text:
            return math.nan
        try:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
        except (ValueError, OverflowError):
            return None
    return value if math.isfinite(value) else None


def _show(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record_lines(path, records: Sequence[int]) -> dict[int, int]:
    """1-based line where each data record (0 = first after the header) starts.

    Only called on errors: the fast path never tracks lines. Quoted fields may span lines,
    so this re-reads the file with the same CSV parser.
    """
    wanted = set(records)
    last = max(records)
    lines: dict[int, int] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        previous_end = reader.line_num
        for rec, _ in enumerate(reader):
            if rec in wanted:
                lines[rec] = previous_end + 1
            if rec >= last:
                break
            previous_end = reader.line_num
    return lines


def write_interactions(path, interactions: Interactions) -> None:
    """Write ``user,item,ts,weight`` CSV that :func:`read_interactions` reads back exactly.

    Ids are quoted as needed (RFC 4180, ``\\r\\n`` line ends); timestamps are written with
    ``repr`` (NaN as an empty cell); weights with the shortest text that parses back to the
    same float32.
    """
    inter = interactions
    user_text = _index_text(inter.user_ids, inter.users)
    item_text = _index_text(inter.item_ids, inter.items)
    ts_text = ["" if t != t else repr(t) for t in inter.timestamps.tolist()]
    weight_text = _float32_text(inter.weights)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "ts", "weight"])
        writer.writerows(zip(user_text, item_text, ts_text, weight_text))


def _index_text(index: IdIndex, codes: np.ndarray) -> list[str]:
    ids = index._ids
    return [ids[c] for c in codes.tolist()]


def _float32_text(values: np.ndarray) -> list[str]:
    """Shortest round-tripping text of each float32 (formatted once per distinct value)."""
    distinct, inverse = np.unique(np.asarray(values, dtype=np.float32), return_inverse=True)
    texts = []
    for v in distinct:
        text = str(v)
        if np.float32(float(text)) != v:  # shortest float32 digits lost in the float64 detour
            text = repr(float(v))
        texts.append(text)
    return [texts[i] for i in inverse.ravel().tolist()]


# ---------------------------------------------------------------------------------------
# From raw weights to the matrix and the confidences
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceParams:
    """How raw weights ``r`` become confidences ``c = 1 + alpha * f(r)``.

    Attributes
    ----------
    alpha : float
        Scale, ``>= 0``.
    scaling : str
        ``"identity"`` (``f(r) = r``) or ``"log"`` (``f(r) = log1p(r / epsilon)``).
    epsilon : float
        ``> 0``; only used by ``"log"``.
    half_life_seconds : float or None
        Exponential time decay of each event's weight before summing, ``> 0``; None: none.
    """

    alpha: float = 10.0
    scaling: str = "identity"
    epsilon: float = 1.0
    half_life_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, ">= 0", lambda v: v >= 0)
        if self.scaling not in ("identity", "log"):
            raise ConfigError(f"scaling must be 'identity' or 'log', got {self.scaling!r}")
        _check_number("epsilon", self.epsilon, "> 0", lambda v: v > 0)
        if self.half_life_seconds is not None:
            _check_number("half_life_seconds", self.half_life_seconds, "> 0", lambda v: v > 0)


def _check_number(name: str, value, expected: str, ok) -> None:
    """ConfigError unless ``value`` is a real number (not NaN) satisfying ``ok``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number {expected}, got {value!r}") from None
    if isinstance(value, bool) or math.isnan(number) or not ok(number):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def scale_weights(r: np.ndarray, params: ConfidenceParams) -> np.ndarray:
    """``alpha * f(r)`` as float32: the kernels' ``s = c - 1`` for aggregated weights ``r``.

    Computed in float64 and rounded once; values that overflow float32 come back as inf
    (callers decide whether that is a data or a fitting error).
    """
    r = np.asarray(r, dtype=np.float64)
    f = r if params.scaling == "identity" else np.log1p(r / params.epsilon)
    with np.errstate(over="ignore"):
        return (params.alpha * f).astype(np.float32)


def decay_weights(weights, timestamps, half_life_seconds, now) -> np.ndarray:
    """``w * 0.5 ** ((now - ts) / half_life_seconds)`` as float32.

    Events with a NaN timestamp are not decayed (factor 1). The formula is applied as is:
    an event after ``now`` gets a factor above 1. ``half_life_seconds=None`` returns the
    weights unchanged (as float32).
    """
    weights = np.asarray(weights, dtype=np.float32)
    if half_life_seconds is None:
        return weights.copy()
    _check_number("half_life_seconds", half_life_seconds, "> 0", lambda v: v > 0)
    return (weights * _decay_factors(timestamps, half_life_seconds, now)).astype(np.float32)


def _decay_factors(timestamps, half_life_seconds: float, now: float) -> np.ndarray:
    ts = np.asarray(timestamps, dtype=np.float64)
    with np.errstate(over="ignore"):
        factors = np.power(0.5, (float(now) - ts) / float(half_life_seconds))
    factors[np.isnan(ts)] = 1.0
    return factors


def weight_matrix(
    inter: Interactions,
    params: ConfidenceParams,
    now: float | None = None,
    shape: tuple[int, int] | None = None,
) -> sp.csr_matrix:
    """Users x items matrix of aggregated raw weights ``r`` (not confidences).

    Each event's weight is decayed (when ``params.half_life_seconds`` is set) and the
    events of one (user, item) pair are summed (in float64, stored as float32). Indices are
    sorted; ``indices`` are int32 and ``indptr`` int64. Explicit zeros (weight-0 events)
    are kept: the pair was observed.

    Parameters
    ----------
    now : float, optional
        Decay reference time; defaults to the newest finite timestamp.
    shape : (int, int), optional
        Defaults to ``(len(inter.user_ids), len(inter.item_ids))``.
    """
    if shape is None:
        shape = (len(inter.user_ids), len(inter.item_ids))
    n_users, n_items = int(shape[0]), int(shape[1])
    for label, codes, bound in (("user", inter.users, n_users), ("item", inter.items, n_items)):
        if len(codes) and (codes.min() < 0 or codes.max() >= bound):
            raise DataError(
                f"{label} indices must be in [0, {bound}) for shape {(n_users, n_items)}, "
                f"got range [{codes.min()}, {codes.max()}]"
            )
    weights = inter.weights.astype(np.float64)
    if params.half_life_seconds is not None:
        if now is None:
            finite = inter.timestamps[np.isfinite(inter.timestamps)]
            now = float(finite.max()) if len(finite) else math.nan
        weights = weights * _decay_factors(inter.timestamps, params.half_life_seconds, now)
    summed = sp.csr_matrix((weights, (inter.users, inter.items)), shape=(n_users, n_items))
    summed.sum_duplicates()
    summed.sort_indices()
    out = sp.csr_matrix(
        (summed.data.astype(np.float32), summed.indices, summed.indptr), shape=(n_users, n_items)
    )
    # Set after construction: scipy would otherwise give both arrays one common dtype.
    out.indices = summed.indices.astype(np.int32)
    out.indptr = summed.indptr.astype(np.int64)
    out.has_sorted_indices = True
    return out
