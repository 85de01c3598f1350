"""Factories for streaming tests: a trained model in a registry, and app configs on the test broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from factors.data import Interactions
from factors.pipeline import TrainParams, fold_in_users, train
from factors.synth import SynthParams, generate
from streamer.config import AppConfig, ProcessingConfig
from streamer.model import LoadedModel
from streamer.registry import ModelRegistry
from streamer.service import FoldService
from streamer.topics import ensure_topics
from streamer.warmup import compile_kernels_once
from tests.conftest import FAST_GROUP_CONFIG

TEST_PARAMS = TrainParams(factors=8, iterations=4, regularization=0.1, alpha=5.0, seed=3)


@pytest.fixture(scope="session")
def synthetic_log() -> Interactions:
    """A small drifting synthetic log: the first half trains the model, the rest streams."""
    return generate(SynthParams(users=300, items=120, events=6000, seed=11))


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory, synthetic_log) -> Path:
    """A registry whose active version was trained on the first half of ``synthetic_log``.

    The consumer's kernels are compiled here too, in this process, so that numba's on-disk
    cache holds them before any test starts a consumer process: on a cold cache (a fresh
    clone, as CI runs) the first child consumer would otherwise spend half a minute of its
    test's deadlines compiling them before it joins its group.
    """
    root = tmp_path_factory.mktemp("registry")
    half = synthetic_log.subset(np.arange(len(synthetic_log) // 2))
    result = train(half, TEST_PARAMS)
    registry = ModelRegistry(root)
    registry.promote(registry.add(result.artifact(half)))
    compile_kernels_once(LoadedModel(registry.load()), ProcessingConfig())
    return root


@pytest.fixture
def make_app_config(kafka_broker, unique_name, tmp_path, trained_registry) -> Callable[..., AppConfig]:
    """``make_app_config(partitions=2, **section_overrides)``: fresh topics, group and state dir."""

    def make(partitions: int = 2, state_dir: Path | None = None, **sections) -> AppConfig:
        base = AppConfig().replace(
            kafka={
                "bootstrap_servers": kafka_broker.bootstrap,
                "input_topic": unique_name("in"),
                "output_topic": unique_name("vectors"),
                "dead_letter_topic": unique_name("dead"),
                "group_id": unique_name("group"),
                "input_partitions": partitions,
                **FAST_GROUP_CONFIG,
            },
            processing={"batch_max_ms": 20, "batch_max_records": 500},
            store={"state_dir": state_dir or tmp_path / "state", "lock_timeout_s": 20.0},
            model={"registry_dir": trained_registry},
            metrics={"port": 0},
        )
        config = base.replace(**sections) if sections else base
        ensure_topics(config.kafka)
        return config

    return make


def run_until(service: FoldService, done: Callable[[FoldService], bool], timeout_s: float = 60.0) -> None:
    """Drive ``service`` turn by turn until ``done(service)`` or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done(service):
        if time.monotonic() > deadline:
            raise AssertionError(f"service did not get there in {timeout_s}s: {service.stats}")
        service.run_once()
    service.settle()  # a turn polled after the one that got there may still be in flight


def offline_vectors(registry_dir: Path, events: list[dict]) -> dict[str, np.ndarray]:
    """The oracle: each user's vector from ALL of that user's events, computed offline."""
    from factors.data import IdIndex

    registry = ModelRegistry(registry_dir)
    artifact = registry.load().artifact
    users, items = IdIndex(), IdIndex()
    u = np.array([users.add(e["user"]) for e in events], dtype=np.int32)
    i = np.array([items.add(e["item"]) for e in events], dtype=np.int32)
    inter = Interactions(
        users=u, items=i,
        weights=np.array([e.get("weight", 1.0) for e in events], dtype=np.float32),
        timestamps=np.array([e["ts"] for e in events], dtype=np.float64),
        user_ids=users, item_ids=items,
    )
    params = TrainParams.from_dict(artifact.params)
    vectors, _ = fold_in_users(artifact.item_factors, artifact.item_ids, params, inter)
    return {users.id_of(row): vectors[row] for row in range(len(users))}


def encode_event(event: dict) -> tuple[bytes, bytes]:
    return event["user"].encode(), json.dumps(event).encode()


def write_config(config: AppConfig, path: Path) -> Path:
    """Write ``config`` as the TOML file ``foldstream run --config`` reads."""
    import dataclasses

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, Path):
            return json.dumps(str(v))
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(config, section.name)):
            lines.append(f"{f.name} = {value(getattr(getattr(config, section.name), f.name))}")
    path.write_text("\n".join(lines) + "\n")
    return path
