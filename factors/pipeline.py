"""Offline workflows built from the numeric pieces: train, fold in, evaluate.

These are what ``foldstream train|foldin|evaluate`` and the retrainer call. They only
compose :mod:`factors.data`, :mod:`factors.als`, :mod:`factors.foldin` and
:mod:`factors.evaluate`; no numeric loop lives here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np

from factors.als import ImplicitALS
from factors.artifacts import ModelArtifact
from factors.data import ConfidenceParams, IdIndex, Interactions, weight_matrix
from factors.errors import ConfigError
from factors.evaluate import prequential, ranking_metrics, temporal_split
from factors.foldin import FoldIn
from factors.rows import aggregate_rows

SOLVERS = ("cg", "cholesky")


@dataclass(frozen=True)
class TrainParams:
    """Hyperparameters of one ALS training run (the options of ``foldstream train``)."""

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 10.0
    scaling: str = "identity"
    epsilon: float = 1.0
    half_life_seconds: float | None = None
    iterations: int = 15
    solver: str = "cg"
    cg_steps: int = 3
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.factors < 1:
            raise ConfigError(f"factors must be >= 1, got {self.factors}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if not self.regularization >= 0:
            raise ConfigError(f"regularization must be >= 0, got {self.regularization}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cg_steps < 1:
            raise ConfigError(f"cg_steps must be >= 1, got {self.cg_steps}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = all cores), got {self.threads}")
        self.confidence  # validates alpha, scaling, epsilon and half-life

    @property
    def confidence(self) -> ConfidenceParams:
        return ConfidenceParams(
            alpha=self.alpha,
            scaling=self.scaling,
            epsilon=self.epsilon,
            half_life_seconds=self.half_life_seconds,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, params: dict) -> "TrainParams":
        """The parameters a model was trained with, from its ``model.json`` ``params``.

        Keys this version does not know (written by a newer one) are ignored.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})


@dataclass
class TrainResult:
    """A fitted model together with the training data layout it was fitted on."""

    model: ImplicitALS
    params: TrainParams
    weights: object  # scipy.sparse.csr_matrix of aggregated raw weights, users x items
    seconds: float
    metrics: dict = field(default_factory=dict)

    def artifact(self, inter: Interactions, input_sha256: str | None = None) -> ModelArtifact:
        """The model directory contents, keeping only users and items seen in training.

        Ids that exist in ``inter``'s index but have no training event (say, items first
        seen after a temporal cutoff) get no factor row: to the model they are unknown,
        not all-zero vectors that would look known.
        """
        users_seen = np.diff(self.weights.indptr) > 0
        items_seen = np.bincount(self.weights.indices, minlength=self.weights.shape[1]) > 0
        user_ids, item_ids = inter.user_ids.ids, inter.item_ids.ids
        # Training events per kept item: the popularity baseline drift is measured against.
        events_per_item = np.bincount(inter.items, minlength=self.weights.shape[1])[items_seen]
        return ModelArtifact(
            item_factors=self.model.item_factors_[items_seen],
            user_factors=self.model.user_factors_[users_seen],
            item_ids=[item_ids[i] for i in np.flatnonzero(items_seen)],
            user_ids=[user_ids[u] for u in np.flatnonzero(users_seen)],
            params=self.params.as_dict(),
            metrics={**self.metrics, "item_counts": events_per_item.tolist()},
            input_sha256=input_sha256,
        )


def make_model(params: TrainParams, callback: Callable | None = None) -> ImplicitALS:
    return ImplicitALS(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        scaling=params.scaling,
        epsilon=params.epsilon,
        iterations=params.iterations,
        solver=params.solver,
        cg_steps=params.cg_steps,
        seed=params.seed,
        num_threads=params.threads,
        callback=callback,
    )


def train(inter: Interactions, params: TrainParams, callback: Callable | None = None) -> TrainResult:
    """Fit ALS on every event of ``inter`` (duplicates summed, optional decay)."""
    weights = weight_matrix(
        inter, params.confidence, shape=(len(inter.user_ids), len(inter.item_ids))
    )
    started = time.perf_counter()
    model = make_model(params, callback).fit(weights)
    seconds = time.perf_counter() - started
    metrics = {
        "train_seconds": round(seconds, 3),
        "train_loss": float(model.loss_history_[-1]) if model.loss_history_ else None,
        "events": int(len(inter)),
        "users": int(weights.shape[0]),
        "items": int(weights.shape[1]),
        "nnz": int(weights.nnz),
    }
    return TrainResult(model=model, params=params, weights=weights, seconds=seconds, metrics=metrics)


def fold_in_users(
    item_factors: np.ndarray,
    item_ids: list[str],
    params: TrainParams,
    inter: Interactions,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact vectors for every user of ``inter`` from that user's events in ``inter``.

    Returns ``(vectors, unknown_events)`` with rows in ``inter.user_ids`` order. Events on
    items the model does not know are left out of the solve and counted per user. With a
    half-life, each user's events decay relative to that user's newest event (the same
    rule as the streaming consumer, through :func:`factors.rows.aggregate_rows`).
    """
    model_items = IdIndex.from_ids(item_ids)
    order = np.argsort(inter.users, kind="stable")
    n_users = len(inter.user_ids)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(inter.users, minlength=n_users), out=indptr[1:])
    events_items = model_items.lookup(inter.item_ids.ids)[inter.items[order]]
    return fold_in_rows(
        FoldIn(item_factors, params.regularization, params.alpha,
               scaling=params.scaling, epsilon=params.epsilon),
        indptr, events_items, inter.weights[order], inter.timestamps[order],
        params.half_life_seconds,
    )


def fold_in_rows(solver: FoldIn, indptr, indices, weights, times=None,
                 half_life_seconds: float | None = None, *,
                 serial: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row event lists (item index -1 = unknown) -> exact vectors and unknown counts.

    ``serial``: as :meth:`FoldIn.solve`.
    """
    agg_indptr, agg_indices, agg_weights, unknown = aggregate_rows(
        indptr, indices, weights, times, half_life_seconds
    )
    vectors, _ = solver.solve(agg_indptr, agg_indices, agg_weights, serial=serial)
    return vectors, unknown


def evaluate(
    inter: Interactions,
    params: TrainParams,
    cutoff: float = 0.8,
    k: int = 10,
    mode: str = "batch",
    callback: Callable | None = None,
) -> dict:
    """Temporal-split evaluation: train before the cutoff, score what comes after.

    ``mode`` is ``"batch"`` (ranking metrics on all held-out events) or
    ``"prequential"`` (replay held-out events in time order, with and without fold-in).
    """
    if mode not in ("batch", "prequential"):
        raise ConfigError(f"mode must be 'batch' or 'prequential', got {mode!r}")
    train_part, test_part = temporal_split(inter, cutoff)
    result = train(train_part, params, callback=callback)
    model = result.model
    out: dict = {
        "mode": mode,
        "k": k,
        "cutoff": cutoff,
        "train_events": int(len(train_part)),
        "test_events": int(len(test_part)),
        "train_seconds": round(result.seconds, 3),
    }
    if mode == "batch":
        out.update(
            ranking_metrics(model.user_factors_, model.item_factors_, result.weights, test_part, k=k)
        )
    else:
        solver = FoldIn.from_model(model)
        for replay in ("foldin", "stale"):
            stats = prequential(
                solver, model.user_factors_, train_part, test_part, k=k, mode=replay,
                params=params.confidence,
            )
            out[replay] = stats
    return out
