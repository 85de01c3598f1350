"""The retrain quality gate: score models on the most recent events, the same way for each.

Each model is judged by what it would have served: every user's vector is folded in
from that user's events before the holdout cut (against the model's own item factors),
then the held-out events are ranked (:func:`factors.evaluate.ranking_metrics`). So the
current model and a candidate trained on the pre-cut events are compared on equal terms,
without either having seen the holdout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from factors.data import IdIndex, Interactions
from factors.errors import ConfigError
from factors.evaluate import ranking_metrics
from factors.pipeline import TrainParams, fold_in_users


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    current: dict
    candidate: dict


def score_model(item_factors: np.ndarray, item_ids: list[str], params: TrainParams,
                history: Interactions, holdout: Interactions, k: int = 10) -> dict:
    """Ranking metrics of a model on ``holdout``, users folded in from ``history``.

    ``history`` and ``holdout`` share their user and item indexes (e.g. both halves of
    :func:`factors.evaluate.temporal_split`). Holdout items the model does not know count
    as relevant but unrecommendable.
    """
    model_items = IdIndex.from_ids(item_ids)
    vectors, _ = fold_in_users(item_factors, item_ids, params, history)
    # Re-index items into the model's space; unknown items go past its last row.
    to_model = model_items.lookup(history.item_ids.ids).astype(np.int64)
    unknown = to_model < 0
    to_model[unknown] = len(model_items) + np.arange(int(unknown.sum()))
    # Every history item, known or not, is excluded from the user's relevant set.
    train = sp.csr_matrix(
        (np.ones(len(history), np.float32), (history.users, to_model[history.items])),
        shape=(len(history.user_ids), len(model_items) + int(unknown.sum())),
    )
    test = Interactions(
        users=holdout.users, items=to_model[holdout.items].astype(np.int32),
        weights=holdout.weights, timestamps=holdout.timestamps,
        user_ids=holdout.user_ids, item_ids=_extended(model_items, history.item_ids, unknown),
    )
    return ranking_metrics(vectors, item_factors, train, test, k=k)


def _extended(model_items: IdIndex, data_items: IdIndex, unknown: np.ndarray) -> IdIndex:
    ids = list(model_items.ids) + [data_items.id_of(int(i)) for i in np.flatnonzero(unknown)]
    return IdIndex.from_ids(ids)


def decide(current: dict, candidate: dict, tolerance: float = 0.02) -> GateDecision:
    """Promote unless the candidate's ndcg or recall is worse by more than ``tolerance``.

    ``tolerance`` is relative: 0.02 accepts a candidate whose ndcg and recall are at least
    98% of the current model's.
    """
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
    for metric in ("ndcg", "recall"):
        floor = current[metric] * (1 - tolerance)
        if candidate[metric] < floor:
            return GateDecision(False, f"candidate {metric} {candidate[metric]:.4f} < "
                                f"{floor:.4f} (current {current[metric]:.4f} - {tolerance:.0%})",
                                current, candidate)
    return GateDecision(True, f"candidate ndcg {candidate['ndcg']:.4f} vs current "
                        f"{current['ndcg']:.4f}, recall {candidate['recall']:.4f} vs "
                        f"{current['recall']:.4f}", current, candidate)
