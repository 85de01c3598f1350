"""Offline evaluation: a temporal split, top-k ranking metrics, and a prequential replay.

Conventions shared by every function here:

- **Known items.** An item is known to the model when its index is below
  ``item_factors.shape[0]`` *and* it has at least one training interaction. Items that
  first appear after the split keep an all-zero factor row when the model is fitted on
  the full id space; they are never recommended, and a held-out event on one is a
  relevant item the model cannot recommend (it costs recall and nDCG, see below).
- **Warm users.** A user is warm when its index is below ``user_factors.shape[0]`` and it
  has at least one training interaction; everyone else in the held-out data is *cold*
  and reported apart.
- **Ties.** Scores are compared exactly (float32); equal scores are ordered by the lower
  item index first, so every result is deterministic and independent of block size.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from factors.data import ConfidenceParams, Interactions, decay_weights
from factors.errors import ConfigError, DataError

__all__ = ["PREQUENTIAL_MODES", "prequential", "ranking_metrics", "temporal_split"]

PREQUENTIAL_MODES = ("foldin", "stale")

# Scores computed per block of users: at most this many float32 scores in memory at once.
_BLOCK_ELEMENTS = 1 << 21


def temporal_split(inter: Interactions, cutoff: float = 0.8) -> tuple[Interactions, Interactions]:
    """Split an event log at one global point in time.

    The cut time ``t`` is the timestamp of the event at 0-based position
    ``floor(cutoff * n)`` of the time-ordered log. Train holds every event strictly
    before ``t``, test every event at or after it, so no timestamp is on both sides and
    the split does not depend on file order. When many events share the cut time the
    train fraction is below ``cutoff``.

    Parameters
    ----------
    inter : Interactions
        The event log; every event needs a timestamp.
    cutoff : float
        Fraction of the events, in ``(0, 1)``, that marks the cut.

    Returns
    -------
    (train, test) : tuple of Interactions
        Both in time order (stable, so equal timestamps keep file order), sharing the
        ``IdIndex`` objects of ``inter``.

    Raises
    ------
    ConfigError
        ``cutoff`` outside ``(0, 1)``.
    DataError
        The log is empty, some timestamp is missing (NaN), or no event precedes the cut.
    """
    if not 0.0 < cutoff < 1.0:
        raise ConfigError(f"cutoff must be in (0, 1), got {cutoff}")
    n = len(inter)
    if n == 0:
        raise DataError("cannot split an empty interaction log")
    ts = np.asarray(inter.timestamps, dtype=np.float64)
    missing = int(np.count_nonzero(np.isnan(ts)))
    if missing:
        raise DataError(
            f"temporal split needs a timestamp on every event, {missing} of {n} events have none"
        )
    order = np.argsort(ts, kind="stable")
    sorted_ts = ts[order]
    cut_time = sorted_ts[int(math.floor(cutoff * n))]
    n_train = int(np.searchsorted(sorted_ts, cut_time, side="left"))
    if n_train == 0:
        raise DataError(
            f"temporal split at cutoff {cutoff} leaves no training events: the cut time "
            f"{cut_time} is the earliest timestamp; raise cutoff"
        )
    return inter.subset(order[:n_train]), inter.subset(order[n_train:])


def ranking_metrics(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    train: sp.spmatrix,
    test: Interactions,
    k: int = 10,
    *,
    cold_user_factors: np.ndarray | None = None,
    block_size: int | None = None,
) -> dict:
    """Top-k ranking quality of a factor model on held-out events.

    Each warm test user's items are ranked by ``user . item`` among the known items it
    did not have in training. Its relevant set is the distinct test items it did not
    have in training, *including* items unknown to the model, which can never be hit.
    Per user, with ``h`` hits in the top ``k`` and ``R`` relevant items:

    - precision = ``h / k``;
    - recall = ``h / R`` (the plain definition, not ``h / min(k, R)``);
    - ndcg = DCG / IDCG with binary gains, DCG = sum over hits at 0-based rank ``p``
      of ``1 / log2(p + 2)``, IDCG the DCG of ``min(k, R)`` hits at the top;
    - map = average precision at k: sum of precision@(p+1) over hit ranks ``p``,
      divided by ``min(k, R)``;
    - hit_rate = 1 if ``h > 0``.

    Each is the mean over evaluated users. ``coverage`` is the number of distinct items
    recommended to evaluated users divided by the number of known items
    (``catalog_items``). Means are 0.0 when no user is evaluated (see ``users``).

    Parameters
    ----------
    user_factors, item_factors : ndarray, shape (n_users, f) and (n_items, f)
    train : scipy.sparse matrix, users x items
        The training interactions (any stored entry counts, whatever its value).
    test : Interactions
        Held-out events, indexed like ``train``; duplicates count once.
    k : int
        Cut-off rank, >= 1.
    cold_user_factors : ndarray, optional
        Vectors for cold users, indexed by user index (e.g. folded in from data outside
        ``test``). When given, their metrics are reported under ``"cold_metrics"``;
        cold users whose index is beyond its rows are counted as ``"unscored"`` there.
    block_size : int, optional
        Users scored per matrix multiply; by default about 2M scores (8 MB) per block.

    Returns
    -------
    dict
        ``k, users, precision, recall, ndcg, map, hit_rate, coverage, catalog_items,
        relevant, unrecommendable, cold_users, skipped_users`` and optionally
        ``cold_metrics``. ``relevant`` counts (user, item) pairs of evaluated users,
        ``unrecommendable`` those on unknown items. ``cold_users`` counts cold users
        with a relevant item; ``skipped_users`` counts test users all of whose test
        items were already in training (nothing to find).
    """
    _check_k(k)
    if block_size is not None and block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    U = _factors("user_factors", user_factors)
    Y = _factors("item_factors", item_factors)
    if U.shape[1] != Y.shape[1]:
        raise ConfigError(
            f"user and item factors must have the same width, got {U.shape[1]} and {Y.shape[1]}"
        )
    train = sp.csr_matrix(train)
    n_items = Y.shape[0]
    known = _known_items(train.indices, n_items)
    candidates = np.flatnonzero(known)

    # Relevant (user, item) pairs: distinct test pairs that are not training pairs.
    t_users = np.asarray(test.users, dtype=np.int64)
    t_items = np.asarray(test.items, dtype=np.int64)
    width = max(n_items, train.shape[1], int(t_items.max(initial=-1)) + 1)
    test_keys = np.unique(t_users * width + t_items)
    train_rows = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    train_keys = train_rows * width + train.indices.astype(np.int64)
    relevant_keys = test_keys[~np.isin(test_keys, train_keys)]
    rel_users, rel_items = np.divmod(relevant_keys, width)

    test_users = np.unique(t_users)
    n_rel = np.bincount(rel_users, minlength=int(t_users.max(initial=-1)) + 1)
    train_nnz = np.diff(train.indptr)
    warm = (test_users < U.shape[0]) & (test_users < train.shape[0])
    warm[warm] = train_nnz[test_users[warm]] > 0
    has_relevant = n_rel[test_users] > 0
    evaluated = test_users[warm & has_relevant]
    cold = test_users[~warm & has_relevant]

    pairs = (rel_users, rel_items, n_rel)
    scoring = (Y, candidates, train, k, block_size)
    out = {"k": int(k)}
    out.update(_score_users(U[evaluated], evaluated, pairs, scoring))
    out["cold_users"] = int(len(cold))
    out["skipped_users"] = int(np.count_nonzero(~has_relevant))
    if cold_user_factors is not None:
        C = _factors("cold_user_factors", cold_user_factors)
        if C.shape[1] != Y.shape[1]:
            raise ConfigError(
                f"cold_user_factors must have width {Y.shape[1]}, got {C.shape[1]}"
            )
        scored = cold[cold < C.shape[0]]
        cold_out = _score_users(C[scored], scored, pairs, scoring)
        cold_out["unscored"] = int(len(cold) - len(scored))
        out["cold_metrics"] = cold_out
    return out


def _score_users(vectors, users, pairs, scoring) -> dict:
    """Blocked top-k scoring of ``users`` (sorted, unique) and the mean of each metric."""
    rel_users, rel_items, n_rel = pairs
    Y, candidates, train, k, block_size = scoring
    n_cand = len(candidates)
    compressed = np.full(Y.shape[0], -1, dtype=np.int64)
    compressed[candidates] = np.arange(n_cand)
    Yc = np.ascontiguousarray(Y[candidates].T)
    kk = min(k, n_cand)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = np.cumsum(discount)
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // max(n_cand, 1))

    # Relevant pairs of these users, as (row in ``users``, compressed item) for lookups.
    mine = np.isin(rel_users, users)
    rel_row = np.searchsorted(users, rel_users[mine])
    mine_items = rel_items[mine]
    rel_col = np.full(len(mine_items), -1, dtype=np.int64)
    inside = mine_items < len(compressed)
    rel_col[inside] = compressed[mine_items[inside]]
    recommendable = rel_col >= 0
    rel_row, rel_col = rel_row[recommendable], rel_col[recommendable]

    sums = np.zeros(5, dtype=np.float64)  # precision, recall, ndcg, map, hit_rate
    recommended = np.zeros(n_cand, dtype=bool)
    for start in range(0, len(users) if kk > 0 else 0, block_size):
        stop = min(start + block_size, len(users))
        block = users[start:stop]
        scores = vectors[start:stop] @ Yc
        _mask_training(scores, block, train, compressed)
        top = _top_k(scores, kk)
        valid = np.take_along_axis(scores, top, axis=1) > -np.inf
        recommended[top[valid]] = True

        relevant = np.zeros(scores.shape, dtype=bool)
        lo, hi = np.searchsorted(rel_row, [start, stop])
        relevant[rel_row[lo:hi] - start, rel_col[lo:hi]] = True
        hits = np.take_along_axis(relevant, top, axis=1) & valid
        R = n_rel[block].astype(np.float64)
        h = hits.sum(axis=1)
        ideal_hits = np.minimum(R, k).astype(np.int64)
        precision_at = np.cumsum(hits, axis=1) / np.arange(1, kk + 1)
        sums += [
            (h / k).sum(),
            (h / R).sum(),
            ((hits @ discount[:kk]) / ideal[ideal_hits - 1]).sum(),
            ((precision_at * hits).sum(axis=1) / ideal_hits).sum(),
            np.count_nonzero(h),
        ]
    n = len(users)
    means = sums / n if n else np.zeros(5)
    total_relevant = int(n_rel[users].sum()) if n else 0
    return {
        "users": int(n),
        "precision": float(means[0]),
        "recall": float(means[1]),
        "ndcg": float(means[2]),
        "map": float(means[3]),
        "hit_rate": float(means[4]),
        "coverage": float(np.count_nonzero(recommended) / n_cand) if n_cand else 0.0,
        "catalog_items": int(n_cand),
        "relevant": total_relevant,
        "unrecommendable": int(total_relevant - len(rel_row)),
    }


def _mask_training(scores: np.ndarray, users: np.ndarray, train: sp.csr_matrix,
                   compressed: np.ndarray) -> None:
    """Set the score of every training item of each user (a row of ``scores``) to -inf."""
    rows = np.flatnonzero(users < train.shape[0])
    sub = train[users[rows]]
    which = np.repeat(rows, np.diff(sub.indptr))
    items = sub.indices
    inside = items < len(compressed)
    cols = compressed[items[inside]]
    which = which[inside]
    keep = cols >= 0
    scores[which[keep], cols[keep]] = -np.inf


def _top_k(scores: np.ndarray, kk: int) -> np.ndarray:
    """Column indices of the ``kk`` best scores per row, best first, ties to the lower index."""
    n = scores.shape[1]
    top = np.argpartition(scores, n - kk, axis=1)[:, n - kk:]
    threshold = np.take_along_axis(scores, top, axis=1).min(axis=1)
    # argpartition picks arbitrarily among scores equal to the kk-th best: redo those rows.
    crowded = np.flatnonzero(np.count_nonzero(scores >= threshold[:, None], axis=1) > kk)
    for r in crowded:
        above = np.flatnonzero(scores[r] > threshold[r])
        tied = np.flatnonzero(scores[r] == threshold[r])
        top[r] = np.concatenate([above, tied[: kk - len(above)]])
    top.sort(axis=1)
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def prequential(
    foldin,
    user_factors: np.ndarray,
    train: Interactions,
    test: Interactions,
    k: int = 10,
    mode: str = "foldin",
    params: ConfidenceParams | None = None,
) -> dict:
    """Replay held-out events in time order, scoring each one before learning from it.

    For each event ``(u, i)``, in this order of precedence:

    1. ``i`` is already in ``u``'s history (training plus replayed events): a *repeat*,
       not scored and left out of the means;
    2. ``u`` has no vector yet (cold: unknown at training time and, in ``"foldin"``
       mode, not yet folded in with a known item): a miss, counted in ``cold``;
    3. ``i`` is unknown to the model: a miss, counted in ``unknown_items``;
    4. otherwise ``i`` is ranked against every known item not in ``u``'s history
       (ties to the lower index); a hit when its 0-based rank ``p < k``, with
       nDCG ``1 / log2(p + 2)``.

    Then the event joins ``u``'s history. In ``"foldin"`` mode ``u``'s vector is
    re-solved exactly with ``foldin.solve`` over its whole history, weights of the same
    item summed (after decay to the event's time when ``params.half_life_seconds`` is
    set), as :func:`factors.data.weight_matrix` does. In ``"stale"`` mode vectors never
    change; only the history used for exclusion grows.

    Parameters
    ----------
    foldin : FoldIn
        Exact fold-in against fixed item factors; those factors (``foldin.item_factors``,
        or ``foldin.Y`` of :class:`factors.foldin.FoldIn`) are also the ones scored.
    user_factors : ndarray, shape (n_users, f)
        Vectors of the users at training time.
    train, test : Interactions
        The two halves of a :func:`temporal_split`, sharing id indices.
    k : int
        Cut-off rank, >= 1.
    mode : {"foldin", "stale"}
    params : ConfidenceParams, optional
        Only ``half_life_seconds`` is used here; confidence scaling lives in ``foldin``.

    Returns
    -------
    dict
        ``mode, k, events, scored, repeats, unknown_items, cold, hits, hit_rate, ndcg``;
        ``hit_rate`` and ``ndcg`` are means over ``events - repeats`` (0.0 when none).
    """
    if mode not in PREQUENTIAL_MODES:
        raise ConfigError(f"mode must be one of {PREQUENTIAL_MODES}, got {mode!r}")
    _check_k(k)
    params = params if params is not None else ConfidenceParams()
    Y = _factors("foldin item factors", _fixed_factors(foldin))
    U = _factors("user_factors", user_factors)
    if U.shape[1] != Y.shape[1]:
        raise ConfigError(
            f"user and item factors must have the same width, got {U.shape[1]} and {Y.shape[1]}"
        )
    n_items = Y.shape[0]
    train_items = np.asarray(train.items, dtype=np.int64)
    known = _known_items(train_items, n_items)
    compressed = np.full(n_items, -1, dtype=np.int64)
    compressed[known] = np.arange(np.count_nonzero(known))
    Yc = np.ascontiguousarray(Y[known])
    histories = _Histories(train, compressed, U, params.half_life_seconds)

    test = test.sorted_by_time()
    counts = dict(events=len(test), scored=0, repeats=0, unknown_items=0, cold=0, hits=0)
    ndcg = 0.0
    last_now = np.nan
    for u, i, w, t in zip(test.users.tolist(), test.items.tolist(),
                          test.weights.tolist(), test.timestamps.tolist()):
        h = histories.get(u)
        if i in h.slot:
            counts["repeats"] += 1
        elif h.vector is None:
            counts["cold"] += 1
        elif i >= n_items or compressed[i] < 0:
            counts["unknown_items"] += 1
        else:
            counts["scored"] += 1
            rank = h.rank(Yc, int(compressed[i]))
            if rank < k:
                counts["hits"] += 1
                ndcg += 1.0 / math.log2(rank + 2)
        h.append(i, w, t, compressed)
        if mode == "foldin":
            last_now = t if not math.isnan(t) else last_now
            h.refit(foldin, last_now)
    judged = counts["events"] - counts["repeats"]
    return {
        "mode": mode,
        "k": int(k),
        **counts,
        "hit_rate": counts["hits"] / judged if judged else 0.0,
        "ndcg": ndcg / judged if judged else 0.0,
    }


class _History:
    """One user's history during a replay: distinct items, their raw events, its vector."""

    def __init__(self, items, weights, timestamps, compressed, vector, half_life):
        items = np.asarray(items, dtype=np.int64)
        distinct, inverse = np.unique(items, return_inverse=True)
        self.items = distinct.tolist()
        self.slot = {item: s for s, item in enumerate(self.items)}
        inside = distinct[distinct < len(compressed)]
        cols = compressed[inside]
        self.excluded = cols[cols >= 0].tolist()  # compressed indices, for ranking
        self.half_life = half_life
        self.event_slots = inverse.tolist()
        self.event_weights = np.asarray(weights, dtype=np.float64).tolist()
        self.event_times = np.asarray(timestamps, dtype=np.float64).tolist()
        summed = np.bincount(inverse, weights=self.event_weights, minlength=len(distinct))
        self.summed = summed.tolist()  # raw weight per distinct item, float64
        self.vector = vector

    def rank(self, Yc: np.ndarray, target: int) -> int:
        """0-based rank of ``target`` among the non-excluded columns, ties to lower index."""
        scores = Yc @ self.vector
        s = scores[target]
        above = int(np.count_nonzero(scores > s)) + int(np.count_nonzero(scores[:target] == s))
        if self.excluded:
            ex = np.asarray(self.excluded, dtype=np.int64)
            es = scores[ex]
            above -= int(np.count_nonzero(es > s))
            above -= int(np.count_nonzero((es == s) & (ex < target)))
        return above

    def append(self, item: int, weight: float, ts: float, compressed: np.ndarray) -> None:
        s = self.slot.get(item)
        if s is None:
            s = self.slot[item] = len(self.items)
            self.items.append(item)
            self.summed.append(0.0)
            if item < len(compressed) and compressed[item] >= 0:
                self.excluded.append(int(compressed[item]))
        self.summed[s] += weight
        self.event_slots.append(s)
        self.event_weights.append(weight)
        self.event_times.append(ts)

    def refit(self, foldin, now: float) -> None:
        """Exact fold-in over the whole history; no vector while no item is known."""
        if self.half_life is None:
            summed = np.asarray(self.summed, dtype=np.float32)
        else:
            decayed = decay_weights(
                np.asarray(self.event_weights, dtype=np.float32),
                np.asarray(self.event_times, dtype=np.float64),
                self.half_life,
                now,
            )
            summed = np.bincount(self.event_slots, weights=decayed, minlength=len(self.items))
            summed = summed.astype(np.float32)
        if not self.excluded:
            self.vector = None
            return
        indptr = np.array([0, len(self.items)], dtype=np.int64)
        indices = np.asarray(self.items, dtype=np.int32)
        vectors, _ = foldin.solve(indptr, indices, summed)
        self.vector = np.asarray(vectors[0], dtype=np.float32)


class _Histories:
    """Per-user histories built lazily from the training log (users sorted once)."""

    def __init__(self, train: Interactions, compressed, user_factors, half_life):
        users = np.asarray(train.users, dtype=np.int64)
        order = np.argsort(users, kind="stable")
        self.sorted_users = users[order]
        self.items = np.asarray(train.items, dtype=np.int64)[order]
        self.weights = np.asarray(train.weights, dtype=np.float64)[order]
        self.timestamps = np.asarray(train.timestamps, dtype=np.float64)[order]
        self.compressed = compressed
        self.user_factors = user_factors
        self.half_life = half_life
        self.by_user: dict[int, _History] = {}

    def get(self, u: int) -> _History:
        h = self.by_user.get(u)
        if h is None:
            lo, hi = np.searchsorted(self.sorted_users, [u, u + 1])
            items = self.items[lo:hi]
            vector = None
            if u < self.user_factors.shape[0] and np.any(items < len(self.compressed)):
                vector = self.user_factors[u]
            h = self.by_user[u] = _History(
                items, self.weights[lo:hi], self.timestamps[lo:hi], self.compressed, vector,
                self.half_life,
            )
        return h


def _fixed_factors(foldin) -> np.ndarray:
    """The item factors a fold-in solves against (``item_factors``, or ``Y`` of FoldIn)."""
    factors = getattr(foldin, "item_factors", None)
    return factors if factors is not None else foldin.Y


def _known_items(train_items: np.ndarray, n_items: int) -> np.ndarray:
    """Boolean mask over the model's items: True where the item has training data."""
    known = np.zeros(n_items, dtype=bool)
    known[train_items[train_items < n_items]] = True
    return known


def _factors(name: str, array) -> np.ndarray:
    a = np.ascontiguousarray(array, dtype=np.float32)
    if a.ndim != 2:
        raise ConfigError(f"{name} must be 2-D, got shape {a.shape}")
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise ConfigError(f"{name} must be finite, got {bad} NaN or infinite values")
    return a


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
