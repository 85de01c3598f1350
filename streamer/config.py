"""Configuration: frozen dataclasses, one per component, combined in :class:`AppConfig`.

Loaded once at start-up from a TOML file plus ``FOLDSTREAM_<SECTION>__<KEY>`` environment
overrides (for example ``FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``) and validated
there. Components receive these objects; none of them reads ``os.environ``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from streamer.errors import ConfigError

ENV_PREFIX = "FOLDSTREAM_"
_MAPPINGS = (collections.abc.Mapping, dict)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class KafkaConfig:
    """Where the topics are and how the consumer group behaves."""

    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "interactions"
    output_topic: str = "user-vectors"
    dead_letter_topic: str = "interactions-dead-letter"
    group_id: str = "foldstream"
    client_id: str = "foldstream"
    input_partitions: int = 4
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    fetch_max_wait_ms: int = 20

    def __post_init__(self) -> None:
        _require(bool(self.bootstrap_servers), "kafka.bootstrap_servers must not be empty")
        for name in ("input_topic", "output_topic", "dead_letter_topic", "group_id"):
            _require(bool(getattr(self, name)), f"kafka.{name} must not be empty")
        _require(self.input_partitions >= 1,
                 f"kafka.input_partitions must be >= 1, got {self.input_partitions}")
        _require(0 <= self.fetch_max_wait_ms <= 10_000,
                 f"kafka.fetch_max_wait_ms must be in 0..10000, got {self.fetch_max_wait_ms}")
        _require(self.heartbeat_interval_ms < self.session_timeout_ms,
                 "kafka.heartbeat_interval_ms must be < kafka.session_timeout_ms, got "
                 f"{self.heartbeat_interval_ms} >= {self.session_timeout_ms}")


@dataclass(frozen=True)
class ProcessingConfig:
    """Micro-batching and event validation."""

    batch_max_records: int = 40_000
    batch_max_ms: int = 50
    history_cap: int = 1_000
    history_cache_events: int = 2_000_000
    gram_cache_bytes: int = 64 * 2**20
    apply_threads: int = 2
    poll_while_applying: bool = True
    max_id_bytes: int = 256
    default_weight: float = 1.0
    event_weights: Mapping[str, float] = field(
        default_factory=lambda: {"view": 1.0, "click": 3.0, "cart": 5.0, "purchase": 10.0}
    )

    def __post_init__(self) -> None:
        _require(self.batch_max_records >= 1,
                 f"processing.batch_max_records must be >= 1, got {self.batch_max_records}")
        _require(self.batch_max_ms >= 1,
                 f"processing.batch_max_ms must be >= 1, got {self.batch_max_ms}")
        _require(self.history_cap >= 1,
                 f"processing.history_cap must be >= 1, got {self.history_cap}")
        _require(self.history_cache_events >= 0,
                 f"processing.history_cache_events must be >= 0, got {self.history_cache_events}")
        _require(self.gram_cache_bytes >= 0,
                 f"processing.gram_cache_bytes must be >= 0, got {self.gram_cache_bytes}")
        _require(1 <= self.apply_threads <= 64,
                 f"processing.apply_threads must be in 1..64, got {self.apply_threads}")
        _require(self.max_id_bytes >= 1,
                 f"processing.max_id_bytes must be >= 1, got {self.max_id_bytes}")
        _require(self.default_weight >= 0,
                 f"processing.default_weight must be >= 0, got {self.default_weight}")
        for name, weight in self.event_weights.items():
            _require(isinstance(weight, (int, float)) and weight >= 0,
                     f"processing.event_weights[{name!r}] must be a number >= 0, got {weight!r}")


@dataclass(frozen=True)
class StoreConfig:
    """The RocksDB state directory (one database per input partition)."""

    state_dir: Path = Path("state")
    sync_writes: bool = False
    lock_timeout_s: float = 30.0
    block_cache_bytes: int = 64 * 2**20
    memtable_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        _require(self.lock_timeout_s >= 0,
                 f"store.lock_timeout_s must be >= 0, got {self.lock_timeout_s}")
        for name in ("block_cache_bytes", "memtable_bytes"):
            _require(getattr(self, name) >= 2**20,
                     f"store.{name} must be >= 1048576 (1 MiB), got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """Where model versions live, and how often the consumer looks for a new active one."""

    registry_dir: Path = Path("models")
    check_interval_s: float = 5.0

    def __post_init__(self) -> None:
        _require(self.check_interval_s > 0,
                 f"model.check_interval_s must be > 0, got {self.check_interval_s}")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint of the consumer process (port 0 disables it)."""

    host: str = "0.0.0.0"
    port: int = 9108

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"metrics.port must be in 0..65535, got {self.port}")


@dataclass(frozen=True)
class RetrainConfig:
    """When to retrain (any trigger; 0 disables one) and how to judge the candidate.

    Triggers (checked every ``check_interval_s`` by :mod:`streamer.scheduler`):
    ``interval_s`` since the last retrain attempt or change of the active model;
    ``every_events`` input records consumed by the group since the last attempt;
    ``max_psi`` / ``max_js`` / ``max_unknown_item_ratio`` exceeded by the drift window once
    it holds ``min_events`` interactions. ``cooldown_s``: no automatic attempt starts
    within this many seconds of the end of the previous one (a drift that a rejected
    candidate did not cure would otherwise retrain back to back).
    """

    interval_s: float = 0.0
    every_events: int = 0
    max_psi: float = 0.0
    max_js: float = 0.0
    max_unknown_item_ratio: float = 0.0
    check_interval_s: float = 10.0
    cooldown_s: float = 600.0
    min_events: int = 1_000
    holdout_fraction: float = 0.1
    tolerance: float = 0.02
    k: int = 10

    def __post_init__(self) -> None:
        for name in ("interval_s", "max_psi", "max_js", "max_unknown_item_ratio"):
            _require(getattr(self, name) >= 0, f"retrain.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.every_events >= 0, f"retrain.every_events must be >= 0, got {self.every_events}")
        _require(self.check_interval_s > 0,
                 f"retrain.check_interval_s must be > 0, got {self.check_interval_s}")
        _require(self.cooldown_s >= 0, f"retrain.cooldown_s must be >= 0, got {self.cooldown_s}")
        _require(self.min_events >= 0, f"retrain.min_events must be >= 0, got {self.min_events}")
        _require(0 < self.holdout_fraction < 1,
                 f"retrain.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        _require(0 <= self.tolerance < 1, f"retrain.tolerance must be in [0, 1), got {self.tolerance}")
        _require(self.k >= 1, f"retrain.k must be >= 1, got {self.k}")

    @property
    def automatic(self) -> bool:
        return bool(self.interval_s or self.every_events or self.max_psi or self.max_js
                    or self.max_unknown_item_ratio)


@dataclass(frozen=True)
class AppConfig:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def replace(self, **sections: Any) -> "AppConfig":
        """A copy with some sections' fields replaced: ``cfg.replace(kafka={"group_id": "g"})``."""
        changes = {}
        for name, values in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **values)
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> AppConfig:
    """Read ``path`` (TOML; optional) then apply ``FOLDSTREAM_SECTION__KEY`` overrides from ``env``."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in (env or {}).items():
        if not key.startswith(ENV_PREFIX):
            continue
        section, sep, name = key[len(ENV_PREFIX):].lower().partition("__")
        if not sep:
            raise ConfigError(f"environment override {key} must look like "
                              f"{ENV_PREFIX}SECTION__KEY")
        raw.setdefault(section, {})[name] = _EnvValue(value)
    return _build(AppConfig, raw, "")


class _EnvValue(str):
    """A string from the environment, to be converted to the field's declared type."""


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(where + k for k in unknown)}; "
                          f"expected one of {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        label = f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{label}.")
        else:
            kwargs[name] = _coerce(value, hint, label)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where.rstrip('.') or 'config'}: {exc}") from None


def _coerce(value: Any, hint: Any, label: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(value, _EnvValue):
        text = str(value)
        if hint is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{label} must be a boolean, got {text!r}")
        if hint in (int, float):
            try:
                return hint(text)
            except ValueError:
                raise ConfigError(f"{label} must be {hint.__name__}, got {text!r}") from None
        if hint is Path:
            return Path(text)
        if origin is not None and origin in _MAPPINGS:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{label} must be a JSON object, got {text!r}") from None
        else:
            return text
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a path string, got {value!r}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
        return value
    if origin is not None and origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label} must be a table, got {value!r}")
        return dict(value)
    return value
