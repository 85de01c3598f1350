"""Model directories: round trips, every load error, and atomic (over)writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import factors.artifacts as artifacts
from factors.artifacts import FORMAT_VERSION, ModelArtifact, load_model, save_model, sha256_file
from factors.errors import ArtifactError


def make_artifact(n_users=3, n_items=4, k=2, seed=0, **overrides) -> ModelArtifact:
    rng = np.random.default_rng(seed)
    fields = dict(
        item_factors=rng.normal(size=(n_items, k)).astype(np.float32),
        user_factors=rng.normal(size=(n_users, k)).astype(np.float32),
        item_ids=[f"item-{i}" for i in range(n_items)],
        user_ids=[f"user-{u}" for u in range(n_users)],
        params={"factors": k, "alpha": 10.0, "scaling": "identity", "half_life_seconds": None},
        metrics={"train_loss": 1.5, "evaluation": {"ndcg": 0.25, "users": 3}},
        input_sha256="ab" * 32,
    )
    fields.update(overrides)
    return ModelArtifact(**fields)


def assert_same(a: ModelArtifact, b: ModelArtifact) -> None:
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    assert b.item_factors.dtype == np.float32 and b.user_factors.dtype == np.float32
    assert (a.item_ids, a.user_ids) == (b.item_ids, b.user_ids)
    assert (a.params, a.metrics, a.input_sha256) == (b.params, b.metrics, b.input_sha256)
    assert (a.created, a.version) == (b.created, b.version)


def test_round_trip(tmp_path):
    original = make_artifact()
    path = save_model(tmp_path / "model", original)
    assert path == tmp_path / "model"
    assert sorted(p.name for p in path.iterdir()) == sorted(artifacts.FILES)
    loaded = load_model(path)
    assert_same(original, loaded)
    assert (loaded.k, loaded.n_users, loaded.n_items) == (2, 3, 4)


def test_model_directory_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_model(tmp_path / "m", make_artifact())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "model.json").stat().st_mode & 0o777 == 0o644


def test_model_json_contents(tmp_path):
    path = save_model(tmp_path / "m", make_artifact(metrics={"hits": np.int64(3),
                                                            "ndcg": np.float32(0.5)}))
    meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert (meta["k"], meta["n_users"], meta["n_items"]) == (2, 3, 4)
    assert meta["metrics"] == {"hits": 3, "ndcg": 0.5}  # NumPy scalars become JSON numbers
    assert meta["created"].endswith("+00:00") and "T" in meta["created"]
    assert meta["foldstream_version"] == artifacts.foldstream_version()
    assert meta["input_sha256"] == "ab" * 32
    assert np.load(path / "item_factors.npy", allow_pickle=False).dtype == np.float32


def test_float64_factors_are_stored_as_float32(tmp_path):
    original = make_artifact()
    wide = make_artifact(item_factors=original.item_factors.astype(np.float64))
    loaded = load_model(save_model(tmp_path / "m", wide))
    assert loaded.item_factors.dtype == np.float32
    np.testing.assert_array_equal(loaded.item_factors, original.item_factors)


@settings(max_examples=40, deadline=None)
@given(
    item_ids=st.lists(st.text(), min_size=0, max_size=6, unique=True),
    user_ids=st.lists(st.text(), min_size=1, max_size=4, unique=True),
)
def test_any_text_ids_round_trip_exactly(item_ids, user_ids):
    awkward = ["line\nbreak", 'quote " and \\ backslash', "tab\tnul\x00", "\u2028ünï©ødé😀",
               "  ", "\r\n"]
    item_ids = item_ids + [a for a in awkward if a not in item_ids]
    original = make_artifact(n_users=len(user_ids), n_items=len(item_ids),
                             item_ids=item_ids, user_ids=user_ids)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(save_model(Path(tmp) / "m", original))
    assert loaded.item_ids == item_ids and loaded.user_ids == user_ids


def test_sha256_file(tmp_path):
    f = tmp_path / "input.csv"
    data = b"user,item\n" + os.urandom(3 << 20)  # spans several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# ---------------------------------------------------------------------------------------
# load errors: each damages one thing in a freshly saved model


@pytest.fixture
def saved(tmp_path):
    return save_model(tmp_path / "model", make_artifact())


def rewrite_json(path: Path, change) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    change(meta)
    path.write_text(json.dumps(meta), encoding="utf-8")


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="model directory not found"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("name", artifacts.FILES)
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(ArtifactError, match=f"is missing {name}"):
        load_model(saved)


@pytest.mark.parametrize("name", ["model.json", "item_ids.json", "user_ids.json"])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_unreadable_json(saved, name, content):
    (saved / name).write_bytes(content)
    with pytest.raises(ArtifactError, match=f"cannot read .*{name}"):
        load_model(saved)


def test_model_json_not_an_object(saved):
    (saved / "model.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="must hold a JSON object"):
        load_model(saved)


def test_format_version_mismatch(saved):
    rewrite_json(saved / "model.json", lambda m: m.update(format_version=2))
    with pytest.raises(ArtifactError, match="model format version 2 is not supported, expected 1"):
        load_model(saved)


@pytest.mark.parametrize("key", ["params", "metrics", "k", "n_users", "n_items", "created",
                                 "input_sha256", "foldstream_version"])
def test_model_json_missing_key(saved, key):
    rewrite_json(saved / "model.json", lambda m: m.pop(key))
    with pytest.raises(ArtifactError, match=f"missing key '{key}'"):
        load_model(saved)


@pytest.mark.parametrize("key, value", [("k", "2"), ("n_users", -1), ("n_items", True),
                                        ("params", []), ("created", 5)])
def test_model_json_invalid_value(saved, key, value):
    rewrite_json(saved / "model.json", lambda m: m.update({key: value}))
    with pytest.raises(ArtifactError, match=f"{key} has an invalid value"):
        load_model(saved)


@pytest.mark.parametrize("key", ["n_users", "n_items", "k"])
def test_model_json_disagrees_with_arrays(saved, key):
    rewrite_json(saved / "model.json", lambda m: m.update({key: m[key] + 1}))
    with pytest.raises(ArtifactError, match="states n_items, n_users, k"):
        load_model(saved)


def test_wrong_dtype(saved):
    np.save(saved / "user_factors.npy", np.zeros((3, 2), np.float64))
    with pytest.raises(ArtifactError, match="user_factors.npy has dtype float64, expected float32"):
        load_model(saved)


def test_not_2d(saved):
    np.save(saved / "item_factors.npy", np.zeros(8, np.float32))
    with pytest.raises(ArtifactError, match="item_factors must be 2-D"):
        load_model(saved)


def test_different_k(saved):
    np.save(saved / "user_factors.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ArtifactError, match="k=2, user_factors k=3"):
        load_model(saved)


@pytest.mark.parametrize("name, rows", [("item_ids.json", 3), ("user_ids.json", 5)])
def test_ids_do_not_match_rows(saved, name, rows):
    (saved / name).write_text(json.dumps([f"x{i}" for i in range(rows)]))
    with pytest.raises(ArtifactError, match=f"has {rows} ids for"):
        load_model(saved)


@pytest.mark.parametrize("content, message", [
    ('{"a": 1}', "must be a JSON array of strings"),
    ('["a", 2, "c"]', r"item_ids\[1\] is 2, expected a string"),
    ('["a", "b", "a", "c"]', "has the id 'a' twice"),
])
def test_bad_ids(saved, content, message):
    (saved / "item_ids.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        load_model(saved)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_factors(saved, bad):
    factors = np.ones((4, 2), np.float32)
    factors[1, 1] = bad
    np.save(saved / "item_factors.npy", factors)
    with pytest.raises(ArtifactError, match="item_factors has 1 NaN or infinite values"):
        load_model(saved)


@pytest.mark.parametrize("content", [b"not an npy file", b"\x93NUMPY\x01\x00truncated"])
def test_corrupt_npy(saved, content):
    (saved / "item_factors.npy").write_bytes(content)
    with pytest.raises(ArtifactError, match="cannot read .*item_factors.npy"):
        load_model(saved)


def test_pickled_npy_is_refused(saved):
    np.save(saved / "item_factors.npy", np.array([{"x": 1}] * 4, dtype=object),
            allow_pickle=True)
    with pytest.raises(ArtifactError, match="cannot read .*item_factors.npy"):
        load_model(saved)


def test_npz_is_refused(saved):
    with open(saved / "item_factors.npy", "wb") as fh:
        np.savez(fh, a=np.ones((4, 2), np.float32))
    with pytest.raises(ArtifactError, match="not a single .npy array"):
        load_model(saved)


# ---------------------------------------------------------------------------------------
# save: validation, refusal to clobber, atomic replacement


@pytest.mark.parametrize("overrides, message", [
    (dict(item_factors=np.full((4, 2), np.nan, np.float32)), "NaN or infinite"),
    (dict(user_factors=np.ones((3, 3), np.float32)), "k=2, user_factors k=3"),
    (dict(item_ids=["a", "b"]), "item_ids has 2 ids for 4 factor rows"),
    (dict(user_ids=["a", "a", "b"]), "has the id 'a' twice"),
    (dict(user_ids=["a", "\ud800", "b"]), "is not valid UTF-8"),
    (dict(item_factors=np.ones((4, 2), np.int32)), "must be floating point"),
    (dict(metrics={"loss": float("nan")}), "JSON-serialisable and finite"),
    (dict(params={"when": object()}), "JSON-serialisable and finite"),
    (dict(params=[("alpha", 1.0)]), "params has an invalid value"),
    (dict(input_sha256=b"\x00" * 32), "input_sha256 has an invalid value"),
    (dict(created=None), "created has an invalid value"),
])
def test_save_rejects_invalid_artifacts_and_writes_nothing(tmp_path, overrides, message):
    with pytest.raises(ArtifactError, match=message):
        save_model(tmp_path / "m", make_artifact(**overrides))
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_path_without_overwrite(saved):
    before = load_model(saved)
    with pytest.raises(ArtifactError, match="already exists; pass overwrite=True"):
        save_model(saved, make_artifact(seed=1))
    assert_same(before, load_model(saved))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]


def test_overwrite_replaces_and_leaves_nothing_behind(saved):
    new = make_artifact(n_users=5, seed=1)
    save_model(saved, new, overwrite=True)
    assert_same(new, load_model(saved))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]


def test_overwrite_refuses_something_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a model directory"):
        save_model(tmp_path / "notes", make_artifact(), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        save_model(tmp_path / "file", make_artifact(), overwrite=True)
    assert (tmp_path / "notes" / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]


def test_save_creates_missing_parents(tmp_path):
    original = make_artifact()
    assert_same(original, load_model(save_model(tmp_path / "a" / "b" / "model", original)))


def failing_after(calls: int, real):
    """A stand-in for ``real`` that works ``calls`` times, then raises OSError."""
    count = {"n": 0}

    def fake(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_write_leaves_old_model_and_no_temp_dir(saved, monkeypatch, overwrite):
    before = load_model(saved)
    target = saved if overwrite else saved.parent / "other"
    # the first array is written, the second fails
    monkeypatch.setattr(artifacts.np, "save", failing_after(1, np.save))
    with pytest.raises(OSError, match="simulated"):
        save_model(target, make_artifact(seed=1), overwrite=overwrite)
    monkeypatch.undo()
    assert_same(before, load_model(saved))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]


def test_failure_swapping_in_restores_the_old_model(saved, monkeypatch):
    before = load_model(saved)
    # rename 1 moves the old model aside, rename 2 (new into place) fails, rename 3 restores
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(artifacts.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_model(saved, make_artifact(seed=1), overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3 and calls[2][1] == "model"
    assert_same(before, load_model(saved))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]
