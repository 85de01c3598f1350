"""The model as the consumer uses it: a version, an item-id lookup, and a fold-in solver."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from factors.data import scale_weights
from factors.drift import foldin_losses, item_regularization_share
from factors.foldin import FoldIn
from factors.gram_cache import GramCache
from factors.pipeline import TrainParams, fold_in_rows
from factors.rows import aggregate_rows
from streamer.codec import UserHistory
from streamer.item_table import ItemTable
from streamer.registry import ActiveModel


class LoadedModel:
    """Item factors of one model version, ready to fold histories in against."""

    def __init__(self, active: ActiveModel) -> None:
        artifact = active.artifact
        self.version = active.version
        # Rows of the training matrix (the loss's item-penalty share is per training user).
        self._training_users = int((artifact.metrics or {}).get("users") or artifact.n_users or 1)
        self.params = TrainParams.from_dict(artifact.params)
        self.item_index = {item: i for i, item in enumerate(artifact.item_ids)}
        self.item_factors = artifact.item_factors
        self.solver = FoldIn(artifact.item_factors, self.params.regularization, self.params.alpha,
                             scaling=self.params.scaling, epsilon=self.params.epsilon)
        self._loss_terms: tuple[np.ndarray, float] | None = None
        self._item_ids = artifact.item_ids
        self._item_table: ItemTable | None = None

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def item_table(self) -> ItemTable:
        """:meth:`item_indices` for ids given as UTF-8 bytes in a buffer (built on first use)."""
        if self._item_table is None:
            self._item_table = ItemTable(self._item_ids)
        return self._item_table

    def item_indices(self, item_ids: Iterable[str]) -> np.ndarray:
        """Row of each item in the item factors, -1 for items the model does not know."""
        get = self.item_index.get
        return np.fromiter((get(item, -1) for item in item_ids), dtype=np.int32)

    def fold(self, histories: Iterable[UserHistory]) -> tuple[np.ndarray, np.ndarray]:
        """Exact vectors for many histories in one solve; also the unknown-item event counts."""
        return fold_in_rows(self.solver, *self._rows(list(histories)), self.params.half_life_seconds)

    def fold_rows(self, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                  times: np.ndarray, *, keys: Sequence[str] | None = None,
                  grams: GramCache | None = None, serial: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`fold` of histories given as columns: row ``r`` owns events
        ``indptr[r]:indptr[r+1]``, ``indices`` their :meth:`item_indices`.

        With ``grams`` (from :meth:`gram_cache`) and ``keys`` (the users, one per row), long
        histories are solved from their cached normal equations, updated by what changed;
        ``serial`` goes to :meth:`GramCache.solve` (None: only a batch of thousands of
        users wakes numba's thread pool). Without ``grams`` the rows are solved on the
        calling thread: a micro-batch is a few hundred users, for which waking the pool
        costs more than it saves, and its spinning threads take the CPU the Kafka clients'
        threads (and, on a small host, the broker) need.
        """
        if grams is None:
            return fold_in_rows(self.solver, indptr, indices, weights, times,
                                self.params.half_life_seconds, serial=True)
        if grams.solver is not self.solver:
            raise ValueError(f"the Gram cache belongs to another model than {self.version}")
        agg_indptr, agg_indices, agg_weights, unknown = aggregate_rows(
            indptr, indices, weights, times, self.params.half_life_seconds)
        return grams.solve(keys, agg_indptr, agg_indices, agg_weights, serial=serial), unknown

    def gram_cache(self, max_bytes: int) -> GramCache | None:
        """A :class:`GramCache` for :meth:`fold_rows` of at most ``max_bytes``; None when it
        cannot help: no memory, or time decay, which re-weights a user's every event at each
        new one (an update would cost a rebuild)."""
        if max_bytes <= 0 or self.params.half_life_seconds is not None:
            return None
        return GramCache(self.solver, max_bytes)

    def losses(self, histories: Sequence[UserHistory],
               vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold-in loss of each history at its vector, on the training loss's scale.

        :func:`factors.drift.foldin_losses` of the rows the fold-in solved (same aggregation,
        decay and confidence), with this model's share of the item penalty, so that the
        weighted mean ``sum loss w / sum w`` compares with ``metrics["train_loss"]``.

        Returns
        -------
        loss, weight : float64 [len(histories)]
        """
        agg_indptr, agg_items, agg_weights, _ = aggregate_rows(
            *self._rows(list(histories)), self.params.half_life_seconds)
        yty, share = self._loss_constants()
        return foldin_losses(agg_indptr, agg_items, scale_weights(agg_weights, self.params.confidence),
                             np.asarray(vectors, dtype=np.float64), self.item_factors,
                             self.params.regularization, YtY=yty, item_share=share)

    def _rows(self, histories: Sequence[UserHistory]):
        """Histories as per-row event lists: (indptr, item rows, weights, times)."""
        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        indptr = np.zeros(len(histories) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if not histories:
            return indptr, np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float64)
        return (indptr, np.concatenate([self.item_indices(h.item_ids) for h in histories]),
                np.concatenate([h.weights for h in histories]),
                np.concatenate([h.times for h in histories]))

    def _loss_constants(self) -> tuple[np.ndarray, float]:
        """``Y^T Y`` and one training user's share of the item penalty (computed once)."""
        if self._loss_terms is None:
            yty = self.solver.G - self.params.regularization * np.eye(self.factors)
            share = item_regularization_share(self.item_factors, self.params.regularization,
                                              self._training_users)
            self._loss_terms = (yty, share)
        return self._loss_terms

