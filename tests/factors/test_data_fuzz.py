"""Fuzzing the CSV loader: arbitrary bytes and near-valid CSV never crash it.

The offline loader's contract (``factors.data.read_interactions``): a file loads, or it
raises :class:`~factors.errors.DataError` reading ``"file:line: reason"``. Strict mode stops
at the first bad row; ``skip_bad=True`` leaves out exactly the bad rows, counts them, and
keeps the first few reasons with their line numbers. A slow, obvious reference validator
(:func:`reference_row`) decides here which generated rows are good.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from factors.data import Interactions, ReadReport, read_interactions
from factors.errors import DataError

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
BOM = "\ufeff"


def load(path, skip_bad: bool) -> tuple[Interactions, ReadReport] | DataError:
    """The loader's answer: its result, or the DataError it raised (anything else fails)."""
    try:
        return read_interactions(path, skip_bad=skip_bad)
    except DataError as exc:
        assert str(exc).startswith(f"{path}:"), exc
        return exc


def rows_of(inter: Interactions) -> list[tuple]:
    """(user, item, ts, weight) per loaded event, NaN timestamps as None (comparable)."""
    users = [inter.user_ids.id_of(u) for u in inter.users.tolist()]
    items = [inter.item_ids.id_of(i) for i in inter.items.tolist()]
    ts = [None if math.isnan(t) else t for t in inter.timestamps.tolist()]
    return list(zip(users, items, ts, inter.weights.tolist()))


# ---------------------------------------------------------------------------------------
# The reference: one row at a time, the documented rules written out plainly
# ---------------------------------------------------------------------------------------


def reference_ts(text: str) -> float | None:
    """Seconds, None for an empty cell; raises ValueError when the cell is bad."""
    try:
        value = float(text)
    except ValueError:
        if not text.strip():
            return None
        moment = datetime.fromisoformat(text.strip())  # ValueError when not ISO-8601
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def reference_weight(text: str) -> float:
    """The float32 weight; raises ValueError unless a finite number >= 0 (after rounding)."""
    with np.errstate(over="ignore"):
        weight = np.float32(float(text))
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(text)
    return float(weight)


def reference_row(row: list[str], header: list[str]) -> tuple | None:
    """(user, item, ts, weight) of a good row, None for a bad one; blank rows never get here."""
    if len(row) != len(header):
        return None
    cell = dict(zip(header, row))
    user, item = cell["user"], cell["item"]
    if not user or not item:
        return None
    try:
        ts = reference_ts(cell["ts"]) if "ts" in cell else None
        weight = reference_weight(cell["weight"]) if "weight" in cell else 1.0
    except (ValueError, OverflowError):
        return None
    return user, item, ts, weight


# ---------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------

TRICKY = [
    "", " ", "0", "-0", "1", "2.5", " 3 ", "+1", "1_000", "1e-50", "-1e-50", "-1", "1e38",
    "1e39", "1e308", "1e309", "-inf", "inf", "Infinity", "nan", "NaN", "-nan", "0x10",
    "9" * 400, "x" * 1000, "١٢٣", "2024-01-02", "2024-01-02T03:04:05Z",
    "2024-01-02 03:04:05.250+01:00", "2024-13-01", "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-23:59", "yesterday",
    '"', '""', "a,b", "'", BOM, "\x00", "\t", "é", "中文", "🙂", "\u2028", "\x85",
]
# No surrogates (not encodable) and no line breaks (so a record is one line; see below).
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                max_size=8)
fields = st.one_of(st.sampled_from(TRICKY), _text, st.integers().map(str),
                   st.floats().map(repr))
good_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
good_ts = st.one_of(
    st.just(""),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-10**12, 10**12).map(str),
    st.datetimes(timezones=st.sampled_from([None, timezone.utc])).map(lambda d: d.isoformat()),
)
good_weights = st.one_of(
    st.floats(min_value=0, max_value=3e38, allow_nan=False).map(repr),
    st.integers(0, 10**9).map(str),
)

# Headers: user and item, optionally ts and weight, maybe an ignored column; any order.
headers = st.tuples(st.booleans(), st.booleans(), st.booleans()).flatmap(
    lambda opt: st.permutations(
        ["user", "item"] + ["ts"] * opt[0] + ["weight"] * opt[1] + ["note"] * opt[2]))


TERMINATORS = st.sampled_from(["\r\n", "\n", "\r"])
MOVIELENS = {"user": "userId", "item": "movieId", "ts": "timestamp", "weight": "rating"}


def csv_text(header: list[str], rows: list[list[str]], bom: bool, terminator: str,
             movielens: bool) -> str:
    r"""The file's text, the header spelled the MovieLens way when ``movielens``.

    Rows are quoted by a ``\r\n`` writer, which quotes any field holding
    ``\r`` or ``\n`` (one with ``lineterminator="\n"`` leaves a lone ``\r`` bare, and the
    reader then splits the record there), and then end in ``terminator``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    lines = []
    if movielens:
        header = [MOVIELENS.get(name, name) for name in header]
    for row in [header, *rows]:
        writer.writerow(row)
        lines.append(out.getvalue().removesuffix("\r\n") + terminator)
        out.seek(0)
        out.truncate()
    return (BOM if bom else "") + "".join(lines)


@st.composite
def near_valid(draw) -> tuple[list[str], list[list[str]], bool, str, bool]:
    """A valid header, then rows of garbage: wrong widths, blanks, bad numbers, quotes."""
    header = draw(headers)
    width = len(header)
    row = st.one_of(
        st.lists(fields, min_size=width, max_size=width),
        st.lists(fields, min_size=width, max_size=width),
        st.lists(fields, max_size=width + 2),
        st.just([]),
    )
    rows = draw(st.lists(row, max_size=12))
    return header, rows, draw(st.booleans()), draw(TERMINATORS), draw(st.booleans())


@st.composite
def valid_files(draw) -> tuple[list[str], list[list[str]], bool, str, bool]:
    header = draw(headers)
    cell = {"user": good_ids, "item": good_ids, "ts": good_ts, "weight": good_weights,
            "note": _text}
    rows = draw(st.lists(st.tuples(*(cell[h] for h in header)).map(list), max_size=15))
    return header, rows, draw(st.booleans()), draw(TERMINATORS), draw(st.booleans())


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"user,item,ts,weight\r\n" + b),
    st.binary(max_size=200).map(lambda b: b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n" + b),
))
@example(data=b"user,item\n\xe9t\xe9,x\n")      # latin-1, not UTF-8
@example(data=b"user,item\nu,i\n\xff")           # bad UTF-8 after a good row
@example(data=b"user,item\n\"open quote,x\n")  # quote never closed
@example(data=b"user,item\nu,\x00\n")            # NUL byte
@example(data=b"\n\nuser,item\nu,i\n")           # blank lines before the header
@example(data=b"")
@example(data=b"user,item\nu," + b"x" * 140_000 + b"\n")  # over csv's field size limit
@pytest.mark.parametrize("skip_bad", [False, True])
def test_arbitrary_bytes_load_or_raise_data_error(tmp_path, skip_bad, data):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    out = load(path, skip_bad)
    if not isinstance(out, DataError):
        inter, report = out
        assert len(inter) == report.rows
        assert report.skipped == 0 or skip_bad
        assert len(report.errors) == min(report.skipped, 10)


@FUZZ
@given(case=near_valid())
@example(case=(["user", "item", "weight"], [["u", "i", "-1e-50"]],  # weight rounds to -0.0
                False, "\n", False))
@example(case=(["ts", "item", "user"], [["0001-01-01T00:00:00+01:00", "i", "u"]],
                True, "\r\n", True))
@example(case=(["user", "item"], [[], ["", "i"], ["u"], ["u", "i", "x"], ["u", "i"]],
                False, "\n", False))
def test_near_valid_csv_keeps_every_good_row_and_reports_every_bad_one(tmp_path, case):
    header, rows, bom, terminator, movielens = case
    path = tmp_path / "near.csv"
    path.write_bytes(csv_text(header, rows, bom, terminator, movielens).encode("utf-8"))

    # Line of each record: the header is line 1 and no generated field holds a line break.
    expected, bad_lines = [], []
    for line, row in enumerate(rows, start=2):
        if row == []:  # a blank line: ignored, but it counts as a line
            continue
        good = reference_row(row, header)
        if good is None:
            bad_lines.append(line)
        else:
            expected.append(good)

    out = load(path, skip_bad=True)
    assert not isinstance(out, DataError), out
    inter, report = out
    assert rows_of(inter) == expected
    assert report.rows == len(expected) and report.skipped == len(bad_lines)
    assert all(e.startswith(f"{path}:") for e in report.errors)
    parsed = [e.removeprefix(f"{path}:").split(": ", 1) for e in report.errors]
    assert [line for line, _ in parsed] == [str(n) for n in bad_lines[:10]]
    assert all(reason for _, reason in parsed)

    strict = load(path, skip_bad=False)
    if bad_lines:
        assert isinstance(strict, DataError) and str(strict) == report.errors[0]
    else:
        assert not isinstance(strict, DataError), strict
        assert rows_of(strict[0]) == expected


@FUZZ
@given(case=valid_files())
@example(case=(["item", "user", "weight", "ts"], [[" a ", '"q"', "0", ""]], True, "\r\n", True))
def test_every_valid_file_loads_exactly_the_rows_written(tmp_path, case):
    header, rows, bom, terminator, movielens = case
    path = tmp_path / "valid.csv"
    path.write_bytes(csv_text(header, rows, bom, terminator, movielens).encode("utf-8"))
    inter, report = read_interactions(path)
    expected = [reference_row(row, header) for row in rows]
    assert None not in expected  # the generator only makes good rows
    assert rows_of(inter) == expected
    assert report.rows == len(rows) and report.skipped == 0 and report.errors == ()
