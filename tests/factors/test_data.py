"""factors.data: CSV in and out, id indexing, the weight matrix and confidences."""

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factors.data import (
    ConfidenceParams,
    CsvColumns,
    IdIndex,
    Interactions,
    decay_weights,
    read_interactions,
    scale_weights,
    weight_matrix,
    write_interactions,
)
from factors.errors import ConfigError, DataError
from tests.paths import MOVIELENS_RATINGS

FIXTURES = Path(__file__).parent / "data"
MOVIELENS = MOVIELENS_RATINGS


@pytest.fixture
def csv_file(tmp_path):
    """Factory: write ``text`` (exact bytes, UTF-8) to a file and return its path."""

    def make(text: str, name: str = "events.csv") -> Path:
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8"))
        return path

    return make


def make_interactions(users, items, weights=None, timestamps=None) -> Interactions:
    """Interactions from id strings, indexed in first-seen order."""
    user_ids, item_ids = IdIndex.from_ids(users), IdIndex.from_ids(items)
    n = len(users)
    return Interactions(
        users=user_ids.lookup(users),
        items=item_ids.lookup(items),
        weights=np.ones(n) if weights is None else weights,
        timestamps=np.full(n, np.nan) if timestamps is None else timestamps,
        user_ids=user_ids,
        item_ids=item_ids,
    )


def event_ids(inter: Interactions) -> tuple[list[str], list[str]]:
    return (
        [inter.user_ids.id_of(u) for u in inter.users.tolist()],
        [inter.item_ids.id_of(i) for i in inter.items.tolist()],
    )


# --- IdIndex -----------------------------------------------------------------------------


def test_id_index_keeps_first_seen_order_and_maps_both_ways():
    index = IdIndex.from_ids(["b", "a", "b", "c", "a"])
    assert index.ids == ["b", "a", "c"]
    assert len(index) == 3
    assert [index.index(x) for x in "bac"] == [0, 1, 2]
    assert index.id_of(2) == "c"
    assert "a" in index and "z" not in index
    lookup = index.lookup(["c", "zz", "b"])
    assert lookup.dtype == np.int32 and lookup.tolist() == [2, -1, 0]
    assert index.add("a") == 1 and index.add("new") == 3 and index.ids[-1] == "new"
    with pytest.raises(KeyError):
        index.index("missing")
    with pytest.raises(IndexError):
        index.id_of(4)
    with pytest.raises(IndexError):
        index.id_of(-1)


def test_id_index_ids_is_a_copy():
    index = IdIndex.from_ids(["x"])
    index.ids.append("y")
    assert index.ids == ["x"] and len(index) == 1


# --- Interactions ----------------------------------------------------------------------------


def test_interactions_subset_and_sorted_by_time():
    inter = make_interactions(
        ["u1", "u2", "u3", "u4", "u5"],
        ["a", "b", "c", "d", "e"],
        timestamps=np.array([3.0, np.nan, 1.0, 3.0, 2.0]),
    )
    assert len(inter) == 5
    ordered = inter.sorted_by_time()
    assert event_ids(ordered)[0] == ["u3", "u5", "u1", "u4", "u2"]  # stable, NaN last
    assert ordered.user_ids is inter.user_ids and ordered.item_ids is inter.item_ids

    by_mask = inter.subset(inter.timestamps > 1.5)
    assert event_ids(by_mask)[1] == ["a", "d", "e"]
    by_index = inter.subset([4, 0])
    assert event_ids(by_index)[1] == ["e", "a"]
    assert len(inter.subset([])) == 0
    assert by_index.users.dtype == np.int32 and by_index.timestamps.dtype == np.float64
    with pytest.raises(DataError, match="mask must have shape"):
        inter.subset(np.array([True, False]))


def test_interactions_rejects_arrays_of_different_lengths():
    with pytest.raises(DataError, match="one length"):
        Interactions(np.zeros(2), np.zeros(3), np.ones(2), np.zeros(2), IdIndex(), IdIndex())


# --- reading ---------------------------------------------------------------------------------


def test_reads_default_columns_in_any_order(csv_file):
    path = csv_file("weight,item,extra,user,ts\n2.5,i1,x,u1,10\n1,i2,y,u2,20.5\n0,i1,z,u1,30\n")
    inter, report = read_interactions(path)
    assert event_ids(inter) == (["u1", "u2", "u1"], ["i1", "i2", "i1"])
    assert inter.weights.dtype == np.float32 and inter.weights.tolist() == [2.5, 1.0, 0.0]
    assert inter.timestamps.dtype == np.float64 and inter.timestamps.tolist() == [10, 20.5, 30]
    assert inter.users.dtype == np.int32 and inter.items.dtype == np.int32
    assert (report.rows, report.skipped, report.errors) == (3, 0, ())
    assert report.columns == CsvColumns()


def test_movielens_header_is_detected():
    inter, report = read_interactions(FIXTURES / "movielens_small.csv")
    assert report.columns == CsvColumns("userId", "movieId", "timestamp", "rating")
    assert inter.user_ids.ids == ["1", "2", "3"]
    assert inter.item_ids.ids == ["31", "1029", "1061"]
    assert inter.weights.tolist() == [2.5, 3.0, 4.0, 0.5, 5.0]
    assert inter.timestamps[0] == 1260759144.0
    assert event_ids(inter)[0] == ["1", "1", "2", "3", "2"]


def test_reads_real_movielens_latest_small():
    assert MOVIELENS.is_file(), (f"MovieLens latest-small is expected at {MOVIELENS} (../shared/data "
                                 "beside the checkout, see the README); it is never downloaded")
    inter, report = read_interactions(MOVIELENS)
    assert len(inter) == report.rows == 100_004
    assert len(inter.user_ids) == 671 and len(inter.item_ids) == 9066
    assert report.skipped == 0
    assert inter.weights.min() == 0.5 and inter.weights.max() == 5.0
    assert np.isfinite(inter.timestamps).all()
    assert event_ids(inter.subset([0]))[1] == ["31"]


def test_missing_optional_columns_give_unit_weights_and_nan_times(csv_file):
    inter, report = read_interactions(csv_file("user,item\na,x\nb,y\n"))
    assert inter.weights.tolist() == [1.0, 1.0]
    assert np.isnan(inter.timestamps).all()
    assert report.columns == CsvColumns(ts=None, weight=None)


def test_custom_columns_and_ignored_optional_column(csv_file):
    path = csv_file("who,what,when,ts\nalice,book,5,1\n")
    inter, _ = read_interactions(path, CsvColumns(user="who", item="what", ts="when", weight=None))
    assert event_ids(inter) == (["alice"], ["book"])
    assert inter.timestamps.tolist() == [5.0] and inter.weights.tolist() == [1.0]
    ignored, _ = read_interactions(path, CsvColumns(user="who", item="what", ts=None))
    assert np.isnan(ignored.timestamps).all()


def test_missing_required_column_names_found_and_expected(csv_file):
    with pytest.raises(DataError) as err:
        read_interactions(csv_file("person,item,ts\np,i,1\n", name="nouser.csv"))
    message = str(err.value)
    assert "nouser.csv" in message and "'user'" in message and "'userId'" in message
    assert "person" in message and "ts" in message


def test_duplicate_column_is_an_error(csv_file):
    with pytest.raises(DataError, match="column 'item' must appear once, got 2 times"):
        read_interactions(csv_file("user,item,item\na,b,c\n"))


def test_empty_file_is_an_error_and_header_only_is_empty(csv_file):
    with pytest.raises(DataError, match="empty.csv: empty file"):
        read_interactions(csv_file("", name="empty.csv"))
    inter, report = read_interactions(csv_file("user,item,ts,weight\n"))
    assert len(inter) == 0 and report.rows == 0
    assert inter.users.dtype == np.int32 and inter.weights.dtype == np.float32
    assert len(inter.user_ids) == 0


def test_blank_lines_and_byte_order_mark_are_ignored(csv_file):
    inter, report = read_interactions(csv_file("\ufeffuser,item\n\na,x\n\n\nb,y\n\n"))
    assert event_ids(inter) == (["a", "b"], ["x", "y"]) and report.skipped == 0


def test_tricky_ids_are_kept_exactly(csv_file):
    path = csv_file(
        'user,item\n'
        '"a,b"," spaced "\n'
        '"say ""hi""",line\n'
        '"multi\nline",é中文🙂\n'
        '  lead,trail  \n'
    )
    inter, _ = read_interactions(path)
    assert event_ids(inter) == (
        ["a,b", 'say "hi"', "multi\nline", "  lead"],
        [" spaced ", "line", "é中文🙂", "trail  "],
    )


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("u,i,1", "expected 4 fields (user,item,ts,weight), got 3: 'u,i,1'"),
        ("u,i,1,2,3", "expected 4 fields (user,item,ts,weight), got 5"),
        (",i,1,2", "user id must be non-empty, got ''"),
        ("u,,1,2", "item id must be non-empty, got ''"),
        ("u,i,1,-1", "weight must be a finite number >= 0, got '-1'"),
        ("u,i,1,heavy", "weight must be a finite number >= 0, got 'heavy'"),
        ("u,i,1,", "weight must be a finite number >= 0, got ''"),
        ("u,i,1,nan", "weight must be a finite number >= 0, got 'nan'"),
        ("u,i,1,inf", "weight must be a finite number >= 0, got 'inf'"),
        ("u,i,1,1e39", "weight must be a finite number >= 0, got '1e39'"),  # float32 overflow
        ("u,i,yesterday,1", "timestamp must be seconds since the epoch or an ISO-8601 date-time, got 'yesterday'"),
        ("u,i,inf,1", "timestamp must be seconds since the epoch or an ISO-8601 date-time, got 'inf'"),
        ("u,i,2024-13-01,1", "got '2024-13-01'"),
    ],
)
def test_bad_row_raises_with_file_line_and_value(csv_file, row, expected):
    path = csv_file(f"user,item,ts,weight\nok,ok,1,1\n{row}\nok2,ok2,2,2\n", name="ratings.csv")
    with pytest.raises(DataError) as err:
        read_interactions(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert expected in str(err.value)


def test_line_numbers_count_quoted_newlines_and_blank_lines(csv_file):
    path = csv_file('user,item,weight\n"two\nlines",i,1\n\n"x",i,-5\n')
    with pytest.raises(DataError, match=r":5: weight must be a finite number >= 0, got '-5'"):
        read_interactions(path)


def test_skip_bad_counts_and_reports_first_errors(csv_file):
    good = "".join(f"g{i},item,{i},1\n" for i in range(5))
    bad = "".join(f"b{i},item,{i},-1\n" for i in range(12))
    path = csv_file("user,item,ts,weight\n" + good + bad + "short,row\n", name="r.csv")
    inter, report = read_interactions(path, skip_bad=True)
    assert len(inter) == report.rows == 5
    assert report.skipped == 13
    assert len(report.errors) == 10
    assert report.errors[0] == f"{path}:7: weight must be a finite number >= 0, got '-1'"
    assert report.errors[9].startswith(f"{path}:16: ")
    assert inter.user_ids.ids == [f"g{i}" for i in range(5)]  # bad rows add no ids


def test_skip_bad_across_chunks_keeps_order(csv_file, monkeypatch):
    monkeypatch.setattr("factors.data._CHUNK_ROWS", 3)
    rows = [f"u{i},i{i % 4},{i},{-1 if i % 5 == 2 else 1}\n" for i in range(20)]
    inter, report = read_interactions(csv_file("user,item,ts,weight\n" + "".join(rows)), skip_bad=True)
    kept = [i for i in range(20) if i % 5 != 2]
    assert inter.timestamps.tolist() == kept
    assert event_ids(inter)[0] == [f"u{i}" for i in kept]
    assert report.skipped == 4 and report.errors[1].endswith(":9: weight must be a finite number >= 0, got '-1'")
    with pytest.raises(DataError, match=r"\.csv:4: weight"):  # the first bad row (i = 2)
        read_interactions(csv_file("user,item,ts,weight\n" + "".join(rows)))
    late = [f"u{i},i,{i},{-1 if i == 13 else 1}\n" for i in range(20)]  # fifth chunk
    with pytest.raises(DataError, match=r"\.csv:15: weight must be a finite number >= 0, got '-1'"):
        read_interactions(csv_file("user,item,ts,weight\n" + "".join(late)))


def test_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"user,item\n\xe9t\xe9,x\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_interactions(path)


def test_iso_8601_timestamps(csv_file):
    texts = [
        "2024-01-02T03:04:05Z",
        "2024-01-02T03:04:05+01:00",
        "2024-01-02T03:04:05",  # naive: UTC
        "2024-01-02 03:04:05.250",
        "2024-01-02",
        "1700000000",
        "1700000000.5",
        "",  # missing
    ]
    body = "".join(f"u,i,{t}\n" for t in texts)
    inter, _ = read_interactions(csv_file("user,item,ts\n" + body))
    base = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    expected = [base, base - 3600, base, base + 0.25, base - 3 * 3600 - 4 * 60 - 5,
                1700000000.0, 1700000000.5]
    assert inter.timestamps[:-1].tolist() == expected
    assert math.isnan(inter.timestamps[-1])


# --- writing ---------------------------------------------------------------------------------

_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
_events = st.lists(
    st.tuples(
        _ids,
        _ids,
        st.floats(min_value=0, allow_nan=False, allow_infinity=False, width=32),
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just(math.nan)),
    ),
    max_size=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=_events)
def test_write_then_read_round_trips_exactly(tmp_path, events):
    users, items, weights, stamps = (list(col) for col in zip(*events)) if events else ([],) * 4
    inter = make_interactions(users, items, np.array(weights, np.float32), np.array(stamps, np.float64))
    path = tmp_path / "roundtrip.csv"
    write_interactions(path, inter)
    back, report = read_interactions(path)
    assert report.rows == len(events) and report.skipped == 0
    assert event_ids(back) == (users, items)
    assert back.user_ids == inter.user_ids and back.item_ids == inter.item_ids
    np.testing.assert_array_equal(back.weights, inter.weights)
    np.testing.assert_array_equal(back.timestamps, inter.timestamps)


def test_written_file_is_plain_csv(tmp_path):
    inter = make_interactions(["a,b", "c"], ["x", "y"], np.array([0.1, 3], np.float32),
                              np.array([1.5, np.nan]))
    write_interactions(tmp_path / "out.csv", inter)
    text = (tmp_path / "out.csv").read_bytes().decode()
    assert text == 'user,item,ts,weight\r\n"a,b",x,1.5,0.1\r\nc,y,,3.0\r\n'


# --- confidences and the weight matrix -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha must be >= 0, got -1.0"),
        ({"alpha": math.nan}, "alpha must be >= 0, got nan"),
        ({"alpha": "ten"}, "alpha must be a number >= 0, got 'ten'"),
        ({"epsilon": 0.0}, "epsilon must be > 0, got 0.0"),
        ({"half_life_seconds": 0}, "half_life_seconds must be > 0, got 0"),
        ({"half_life_seconds": -5.0}, "half_life_seconds must be > 0, got -5.0"),
        ({"scaling": "sqrt"}, "scaling must be 'identity' or 'log', got 'sqrt'"),
    ],
)
def test_confidence_params_validate(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ConfidenceParams(**kwargs)
    assert str(err.value) == message


def test_scale_weights_identity_and_log():
    r = np.array([0.0, 1.0, 4.0], np.float32)
    identity = scale_weights(r, ConfidenceParams(alpha=2.0))
    assert identity.dtype == np.float32 and identity.tolist() == [0.0, 2.0, 8.0]
    log = scale_weights(r, ConfidenceParams(alpha=3.0, scaling="log", epsilon=2.0))
    np.testing.assert_allclose(log, 3.0 * np.log1p(r / 2.0), rtol=1e-6)
    assert log.dtype == np.float32


def test_decay_weights_halves_per_half_life_and_skips_nan():
    w = np.array([2.0, 2.0, 2.0, 2.0, 2.0], np.float32)
    ts = np.array([100.0, 90.0, 80.0, np.nan, 110.0])
    out = decay_weights(w, ts, 10.0, now=100.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [2.0, 1.0, 0.5, 2.0, 4.0])  # after now: factor > 1
    np.testing.assert_array_equal(decay_weights(w, ts, None, now=100.0), w)
    with pytest.raises(ConfigError, match="half_life_seconds must be > 0"):
        decay_weights(w, ts, 0.0, now=100.0)


def test_weight_matrix_sums_duplicates_after_decay():
    inter = make_interactions(
        ["a", "a", "b", "a", "c"],
        ["x", "y", "x", "x", "z"],
        np.array([1.0, 2.0, 3.0, 4.0, 0.0], np.float32),
        np.array([0.0, 10.0, 20.0, 20.0, np.nan]),
    )
    raw = weight_matrix(inter, ConfidenceParams())
    assert raw.shape == (3, 3) and raw.dtype == np.float32
    assert raw.indptr.dtype == np.int64 and raw.indices.dtype == np.int32
    assert raw.has_sorted_indices and raw.nnz == 4  # (a, x) summed; weight-0 event kept
    assert raw[0, 0] == 5.0 and raw[0, 1] == 2.0 and raw[1, 0] == 3.0
    assert raw.indices[raw.indptr[2]:raw.indptr[3]].tolist() == [2]  # explicit zero stored

    decayed = weight_matrix(inter, ConfidenceParams(half_life_seconds=10.0))  # now = 20
    assert decayed[0, 0] == pytest.approx(1.0 * 0.25 + 4.0) and decayed[0, 1] == pytest.approx(1.0)
    at = weight_matrix(inter, ConfidenceParams(half_life_seconds=10.0), now=30.0, shape=(5, 4))
    assert at.shape == (5, 4) and at[0, 0] == pytest.approx(0.125 + 2.0)
    with pytest.raises(DataError, match="user indices must be in"):
        weight_matrix(inter, ConfidenceParams(), shape=(2, 3))


def test_weight_matrix_of_nothing_is_empty():
    inter = make_interactions([], [])
    raw = weight_matrix(inter, ConfidenceParams(half_life_seconds=5.0), shape=(2, 3))
    assert raw.shape == (2, 3) and raw.nnz == 0 and raw.indptr.tolist() == [0, 0, 0]
