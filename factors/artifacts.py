"""Model artifacts: one directory per model, written atomically, validated on load.

Layout of a model directory::

    model.json          format_version, params, k, n_users, n_items, created (ISO-8601 UTC),
                        input_sha256, metrics, foldstream_version
    item_factors.npy    float32, n_items x k
    user_factors.npy    float32, n_users x k
    item_ids.json       JSON array of strings, row i is item_ids[i]
    user_ids.json       JSON array of strings, row u is user_ids[u]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from factors.errors import ArtifactError

__all__ = ["FORMAT_VERSION", "ModelArtifact", "load_model", "save_model", "sha256_file"]

FORMAT_VERSION = 1

MODEL_JSON = "model.json"
ITEM_FACTORS = "item_factors.npy"
USER_FACTORS = "user_factors.npy"
ITEM_IDS = "item_ids.json"
USER_IDS = "user_ids.json"
FILES = (MODEL_JSON, ITEM_FACTORS, USER_FACTORS, ITEM_IDS, USER_IDS)


def foldstream_version() -> str:
    """The installed foldstream version, or ``"0+unknown"`` when it is not installed."""
    try:
        return importlib.metadata.version("foldstream")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def utc_now() -> str:
    """The current time as ISO-8601 UTC, to the second: ``2024-05-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelArtifact:
    """A trained model as stored: factors, the ids of their rows, and provenance.

    ``params`` and ``metrics`` must be JSON-serialisable (NumPy scalars are accepted;
    NaN and infinity are not). ``created`` and ``version`` default to now and the
    installed foldstream version.
    """

    item_factors: np.ndarray
    user_factors: np.ndarray
    item_ids: list[str]
    user_ids: list[str]
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    input_sha256: str | None = None
    created: str = field(default_factory=utc_now)
    version: str = field(default_factory=foldstream_version)

    @property
    def k(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_factors.shape[0])


def save_model(path, artifact: ModelArtifact, overwrite: bool = False) -> Path:
    """Write ``artifact`` as the model directory ``path``, all or nothing.

    Steps:

    1. Validate the artifact (the same checks as :func:`load_model`) and refuse an
       existing ``path`` unless ``overwrite``.
    2. Write every file into a fresh temporary directory in ``path``'s parent,
       fsync each file and the directory.
    3. Without an existing ``path``: rename the temporary directory to ``path``.
       With ``overwrite``: rename the old directory aside, rename the new one in,
       then delete the old one. If the second rename fails the old one is put back.
    4. Fsync the parent. On any failure the temporary directory is removed.

    Readers therefore see the old model or the new one, never a mix. A crash between
    the two renames of step 3 leaves no ``path`` and the old model in
    ``.<name>.old-*`` beside it.

    Parameters
    ----------
    path : str or Path
        The model directory to create; its parent is created if missing.
    artifact : ModelArtifact
    overwrite : bool
        Replace an existing model directory (one holding ``model.json``, or empty).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ArtifactError
        Invalid artifact, or ``path`` exists and may not be replaced.
    """
    path = Path(path)
    item_factors = _as_float32("item_factors", artifact.item_factors)
    user_factors = _as_float32("user_factors", artifact.user_factors)
    _check_factors(item_factors, user_factors, artifact.item_ids, artifact.user_ids, "artifact")
    for name, ids in (("item_ids", artifact.item_ids), ("user_ids", artifact.user_ids)):
        _check_ids(name, ids, f"artifact {name}")
    meta = {
        "format_version": FORMAT_VERSION,
        "params": artifact.params,
        "k": int(item_factors.shape[1]),
        "n_users": int(user_factors.shape[0]),
        "n_items": int(item_factors.shape[0]),
        "created": artifact.created,
        "input_sha256": artifact.input_sha256,
        "metrics": artifact.metrics,
        "foldstream_version": artifact.version,
    }
    _check_meta(meta, "artifact")
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False,
                               default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"params and metrics must be JSON-serialisable and finite: {exc}"
        ) from exc
    _check_replaceable(path, overwrite)

    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, which makes it 0700) so the model gets umask permissions
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    os.mkdir(tmp)
    try:
        _write_text(tmp / MODEL_JSON, meta_text + "\n")
        _write_array(tmp / ITEM_FACTORS, item_factors)
        _write_array(tmp / USER_FACTORS, user_factors)
        _write_text(tmp / ITEM_IDS, json.dumps(list(artifact.item_ids), ensure_ascii=False))
        _write_text(tmp / USER_IDS, json.dumps(list(artifact.user_ids), ensure_ascii=False))
        _fsync_dir(tmp)
        _check_replaceable(path, overwrite)
        if path.exists():
            aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)
                raise
            _fsync_dir(path.parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path) -> ModelArtifact:
    """Read and validate a model directory written by :func:`save_model`.

    Raises
    ------
    ArtifactError
        The directory or a file is missing or unreadable, the format version is not
        :data:`FORMAT_VERSION`, factors are not finite 2-D float32 arrays of the shapes
        ``model.json`` states, or the id lists do not match the factor rows.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model directory not found: {path}")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"model directory {path} is missing {', '.join(missing)}")

    meta = _read_json(path / MODEL_JSON)
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"{path / MODEL_JSON} must hold a JSON object, got {type(meta).__name__}"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"model format version {version} is not supported, expected {FORMAT_VERSION} "
            f"(in {path / MODEL_JSON})"
        )
    _check_meta(meta, str(path / MODEL_JSON))

    item_factors = _read_array(path / ITEM_FACTORS)
    user_factors = _read_array(path / USER_FACTORS)
    item_ids = _read_json(path / ITEM_IDS)
    user_ids = _read_json(path / USER_IDS)
    _check_ids("item_ids", item_ids, str(path / ITEM_IDS))
    _check_ids("user_ids", user_ids, str(path / USER_IDS))
    for name, array in (("item_factors", item_factors), ("user_factors", user_factors)):
        if array.dtype != np.float32:
            raise ArtifactError(
                f"{path / (name + '.npy')} has dtype {array.dtype}, expected float32"
            )
    _check_factors(item_factors, user_factors, item_ids, user_ids, str(path))
    stated = (meta["n_items"], meta["n_users"], meta["k"])
    actual = (item_factors.shape[0], user_factors.shape[0], item_factors.shape[1])
    if stated != actual:
        raise ArtifactError(
            f"{path / MODEL_JSON} states n_items, n_users, k = {stated}, the arrays have {actual}"
        )
    return ModelArtifact(
        item_factors=item_factors,
        user_factors=user_factors,
        item_ids=item_ids,
        user_ids=user_ids,
        params=meta["params"],
        metrics=meta["metrics"],
        input_sha256=meta["input_sha256"],
        created=meta["created"],
        version=meta["foldstream_version"],
    )


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (the training-input fingerprint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


_META_TYPES = {"params": dict, "metrics": dict, "k": int, "n_users": int, "n_items": int,
               "created": str, "input_sha256": (str, type(None)), "foldstream_version": str}


def _check_meta(meta: dict, where: str) -> None:
    for key, kind in _META_TYPES.items():
        if key not in meta:
            raise ArtifactError(f"{where} is missing key {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise ArtifactError(f"{where}: {key} has an invalid value {value!r}")


def _check_factors(item_factors, user_factors, item_ids, user_ids, where: str) -> None:
    for name, array in (("item_factors", item_factors), ("user_factors", user_factors)):
        if array.ndim != 2:
            raise ArtifactError(f"{where}: {name} must be 2-D, got shape {array.shape}")
        if not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise ArtifactError(f"{where}: {name} has {bad} NaN or infinite values")
    if item_factors.shape[1] != user_factors.shape[1]:
        raise ArtifactError(
            f"{where}: item_factors have k={item_factors.shape[1]}, "
            f"user_factors k={user_factors.shape[1]}"
        )
    for name, ids, array in (("item_ids", item_ids, item_factors),
                             ("user_ids", user_ids, user_factors)):
        if len(ids) != array.shape[0]:
            raise ArtifactError(
                f"{where}: {name} has {len(ids)} ids for {array.shape[0]} factor rows"
            )


def _check_ids(name: str, ids, where: str) -> None:
    if not isinstance(ids, (list, tuple)):
        raise ArtifactError(
            f"{where}: {name} must be a JSON array of strings, got {type(ids).__name__}"
        )
    seen = set()
    for position, id_ in enumerate(ids):
        if not isinstance(id_, str):
            raise ArtifactError(f"{where}: {name}[{position}] is {id_!r}, expected a string")
        try:
            id_.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ArtifactError(f"{where}: {name}[{position}] {id_!r} is not valid UTF-8") from exc
        if id_ in seen:
            raise ArtifactError(f"{where}: {name} has the id {id_!r} twice")
        seen.add(id_)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"{path} already exists; pass overwrite=True to replace it")
    if path.is_symlink() or not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; refusing to replace it")
    if not (path / MODEL_JSON).is_file() and any(path.iterdir()):
        raise ArtifactError(
            f"{path} is not a model directory (no {MODEL_JSON}); refusing to replace it"
        )


def _as_float32(name: str, array) -> np.ndarray:
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating):
        raise ArtifactError(f"artifact: {name} must be floating point, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _read_json(file: Path):
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {file}: {exc}") from exc


def _read_array(file: Path) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"cannot read {file}: {exc}") from exc
    if not isinstance(array, np.ndarray):
        array.close()
        raise ArtifactError(f"cannot read {file}: not a single .npy array")
    return array


def _write_text(file: Path, text: str) -> None:
    with open(file, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _write_array(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
