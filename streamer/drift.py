"""Drift of the live stream away from what the active model was trained on.

:class:`DriftMonitor` sees every micro-batch the consumer applies and keeps a rolling
window of the most recent interactions; :meth:`DriftMonitor.snapshot` compares that window
with the training-time :class:`DriftReference` of the active model. Every number comes
from :mod:`factors.drift`; this module only keeps the windows.

The window is a ring of per-batch summaries (bucket counts, event counts, the sum of the
updated vectors, loss sums), not exponentially decayed counts: a snapshot then describes
exactly "the last batches holding at least ``window_events`` interactions", which is what
an operator reading a PSI alert expects, and its values can be checked by hand. The
window is the shortest run of most recent batches with at least ``window_events``
interactions (all batches while fewer have been seen), so it holds between
``window_events`` and ``window_events + batch size - 1`` of them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from factors import drift
from streamer.errors import ConfigError

#: Key of ``ModelArtifact.metrics`` holding training interactions per model item index.
ITEM_COUNTS_KEY = "item_counts"
#: Key of ``ModelArtifact.metrics`` holding the final training loss.
TRAIN_LOSS_KEY = "train_loss"


@dataclass(frozen=True, eq=False)
class DriftReference:
    """What the active model saw in training; the baseline every snapshot compares with.

    Parameters
    ----------
    item_counts : array [n_items]
        Training interactions (events, not distinct users) per model item index:
        ``factors.drift.item_counts(train_item_indices, n_items)``.
    user_centroid : array [k]
        Mean of the training user factors.
    train_loss : float or None
        The training loss per unit of confidence (``ImplicitALS.loss_history_[-1]``);
        ``None`` leaves ``loss_ratio`` NaN.
    version : str
        The model version, carried into snapshots.
    """

    item_counts: np.ndarray
    user_centroid: np.ndarray
    train_loss: float | None = None
    version: str = ""

    def __post_init__(self) -> None:
        counts = np.array(self.item_counts, dtype=np.float64).reshape(-1)
        if counts.size and (not np.isfinite(counts).all() or counts.min() < 0):
            raise ConfigError(f"item_counts must be finite and >= 0, got min {counts.min()}")
        centroid = np.array(self.user_centroid, dtype=np.float64)
        if centroid.ndim != 1 or centroid.size == 0 or not np.isfinite(centroid).all():
            raise ConfigError(
                f"user_centroid must be a finite vector [k], got shape {centroid.shape}"
            )
        loss = self.train_loss
        if loss is not None and not (math.isfinite(loss) and loss > 0):
            raise ConfigError(f"train_loss must be a finite number > 0 or None, got {loss!r}")
        counts.flags.writeable = False
        centroid.flags.writeable = False
        object.__setattr__(self, "item_counts", counts)
        object.__setattr__(self, "user_centroid", centroid)
        object.__setattr__(self, "train_loss", None if loss is None else float(loss))

    @property
    def n_items(self) -> int:
        return int(self.item_counts.shape[0])

    @property
    def factors(self) -> int:
        return int(self.user_centroid.shape[0])

    @classmethod
    def from_artifact(cls, artifact, *, version: str = "", item_counts=None,
                      train_loss: float | None = None) -> DriftReference:
        """The reference of a :class:`factors.artifacts.ModelArtifact`.

        ``item_counts`` (aligned with ``artifact.item_ids``) defaults to
        ``artifact.metrics["item_counts"]`` and ``train_loss`` to
        ``artifact.metrics["train_loss"]``; the centroid is the mean of
        ``artifact.user_factors``.

        Raises
        ------
        ConfigError
            No item counts given and none in the artifact's metrics, or counts of the
            wrong length.
        """
        metrics = artifact.metrics or {}
        if item_counts is None:
            item_counts = metrics.get(ITEM_COUNTS_KEY)
        if item_counts is None:
            raise ConfigError(
                f"the model's metrics hold no {ITEM_COUNTS_KEY!r}: pass item_counts "
                f"(training interactions per item, {artifact.n_items} entries)"
            )
        item_counts = np.asarray(item_counts, dtype=np.float64)
        if item_counts.shape != (artifact.n_items,):
            raise ConfigError(
                f"item_counts must have one entry per model item ({artifact.n_items}), "
                f"got shape {item_counts.shape}"
            )
        if train_loss is None:
            train_loss = metrics.get(TRAIN_LOSS_KEY)
        users = np.asarray(artifact.user_factors, dtype=np.float64)
        centroid = users.mean(axis=0) if users.shape[0] else np.zeros(artifact.k)
        return cls(item_counts, centroid, train_loss, version)


@dataclass(frozen=True, eq=False)
class DriftSnapshot:
    """Drift of the recent window against the reference (NaN where there is no data).

    Attributes
    ----------
    version : str, the reference's model version
    events : int, interactions in the window
    batches : int, batches in the window
    unknown_item_ratio : float, events on items the model does not know / events
    new_user_ratio : float, events of users new to the store / events
    psi : float, PSI of item popularity (top items + other), recent vs training
    js : float, Jensen-Shannon divergence (bits) of the same distributions
    centroid_distance : float
        ``||mean of updated vectors in the window - training centroid|| / ||centroid||``
    loss_ratio : float
        Weighted fold-in loss of the window (``sum loss w / sum w``) / training loss.
        Its no-drift level is near 1 but not exactly 1: fold-in solves each row exactly
        (at or below the fitted row's loss) and streaming users have shorter histories
        than the training average. Alert on its trend since the model was promoted.
    expected, actual : float64 [top + 1], the two popularity distributions
    cosine_shift : float64 [u], ``1 - cos(old, new)`` of the last batch's users that had
        a previous vector
    vector_norm : float64 [m], L2 norms of the last batch's new vectors
    """

    version: str
    events: int
    batches: int
    unknown_item_ratio: float
    new_user_ratio: float
    psi: float
    js: float
    centroid_distance: float
    loss_ratio: float
    expected: np.ndarray
    actual: np.ndarray
    cosine_shift: np.ndarray = field(repr=False)
    vector_norm: np.ndarray = field(repr=False)


@dataclass(slots=True)
class _Batch:
    """One batch's contribution to the window."""

    events: int
    unknown: int
    new_user: int
    buckets: np.ndarray  # int64 [top + 1]
    vector_sum: np.ndarray  # float64 [k]
    vectors: int
    loss_sum: float  # sum of loss * weight
    loss_weight: float  # sum of weight


class DriftMonitor:
    """Rolling drift statistics of the applied stream, against one model's reference.

    Parameters
    ----------
    reference : DriftReference
    window_events : int, >= 1
        Interactions the window spans (at batch granularity, see the module docstring).
    top_items : int, >= 0
        Popularity buckets: the ``top_items`` most popular training items, plus "other".
    eps : float, > 0
        Floor of an empty bucket's share in PSI (:func:`factors.drift.psi`).
    """

    def __init__(self, reference: DriftReference, *, window_events: int = 50_000,
                 top_items: int = 100, eps: float = drift.PSI_EPS) -> None:
        _require_int("window_events", window_events, 1)
        _require_int("top_items", top_items, 0)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
        self.window_events = int(window_events)
        self.top_items = int(top_items)
        self.eps = float(eps)
        self.reset(reference)

    @property
    def reference(self) -> DriftReference:
        return self._reference

    def reset(self, reference: DriftReference | None = None) -> None:
        """Empty the window; with ``reference``, compare against that model from now on.

        Call it when the active model changes: item indices, vectors and losses of the
        old model mean nothing against the new one.
        """
        if reference is not None:
            if not isinstance(reference, DriftReference):
                raise ConfigError(f"reference must be a DriftReference, got {type(reference).__name__}")
            self._reference = reference
            self._top = drift.top_items(reference.item_counts, self.top_items)
            self._buckets = drift.bucket_of_items(self._top, reference.n_items)
            self._expected = drift.popularity_distribution(reference.item_counts, self._top)
            self._expected.flags.writeable = False
        k = self._reference.factors
        self._ring: deque[_Batch] = deque()
        self._events = 0
        self._unknown = 0
        self._new_user = 0
        self._bucket_totals = np.zeros(self._top.shape[0] + 1, dtype=np.int64)
        self._vector_sum = np.zeros(k)
        self._vectors = 0
        self._loss_sum = 0.0
        self._loss_weight = 0.0
        self._evicted_since_resum = 0
        self._last_shift = _EMPTY
        self._last_norm = _EMPTY

    def observe_batch(
        self,
        item_indices,
        new_user_events: int,
        old_vectors: np.ndarray | Sequence[np.ndarray | None] | None,
        new_vectors,
        losses=None,
        loss_weights=None,
    ) -> None:
        """Add one applied micro-batch to the window.

        Parameters
        ----------
        item_indices : int array [e]
            The model item index of every interaction applied in this batch, -1 (or any
            index outside the model) for items the model does not know.
        new_user_events : int, 0 <= ... <= e
            How many of those interactions came from users with no stored history.
        old_vectors : float array [m, k], or a sequence of m vectors or None, or None
            Each updated user's previous vector under the *same* model version; None for
            a user without one (new users, vectors of another model version). ``None``
            for the whole argument means no user had one.
        new_vectors : float array [m, k]
            The updated vectors, in the same order.
        losses, loss_weights : float arrays [m], optional
            ``factors.drift.foldin_losses`` of the updated users (loss and weight). Without
            weights every loss counts once.
        """
        idx = np.asarray(item_indices)
        if idx.ndim != 1:
            raise ConfigError(f"item_indices must be 1-D, got shape {idx.shape}")
        events = int(idx.shape[0])
        _require_int("new_user_events", new_user_events, 0)
        if new_user_events > events:
            raise ConfigError(
                f"new_user_events must be <= the batch's {events} interactions, got {new_user_events}"
            )
        new = np.asarray(new_vectors, dtype=np.float64)
        k = self._reference.factors
        if new.ndim != 2 or new.shape[1] != k:
            raise ConfigError(f"new_vectors must have shape (m, {k}), got {new.shape}")
        m = new.shape[0]
        old, has_old = _old_vectors(old_vectors, m, k)

        buckets, unknown = drift.bucket_counts(idx, self._buckets)
        self._last_norm = np.linalg.norm(new, axis=1)
        self._last_shift = drift.cosine_shift(old, new[has_old]) if old.shape[0] else _EMPTY
        loss_sum, loss_weight = _loss_sums(losses, loss_weights, m)
        if events == 0 and m == 0:
            return
        batch = _Batch(events, unknown, int(new_user_events), buckets, new.sum(axis=0), m,
                       loss_sum, loss_weight)
        self._ring.append(batch)
        self._add(batch, 1)
        while len(self._ring) > 1 and self._events - self._ring[0].events >= self.window_events:
            self._add(self._ring.popleft(), -1)
            self._evicted_since_resum += 1
        if self._evicted_since_resum >= max(len(self._ring), 64):
            self._resum()

    def snapshot(self) -> DriftSnapshot:
        """The window against the reference."""
        events = self._events
        known = events - self._unknown
        actual = self._bucket_totals / known if known else np.zeros_like(self._expected)
        if self._vectors:
            mean = self._vector_sum / self._vectors
            distance = drift.centroid_distance(mean[None, :], self._reference.user_centroid)
        else:
            distance = math.nan
        train_loss = self._reference.train_loss
        loss_ratio = (self._loss_sum / self._loss_weight / train_loss
                      if train_loss and self._loss_weight > 0 else math.nan)
        actual.flags.writeable = False
        return DriftSnapshot(
            version=self._reference.version,
            events=events,
            batches=len(self._ring),
            unknown_item_ratio=self._unknown / events if events else math.nan,
            new_user_ratio=self._new_user / events if events else math.nan,
            psi=drift.psi(self._expected, self._bucket_totals, self.eps) if known else math.nan,
            js=drift.js_divergence(self._expected, self._bucket_totals) if known else math.nan,
            centroid_distance=distance,
            loss_ratio=loss_ratio,
            expected=self._expected,
            actual=actual,
            cosine_shift=self._last_shift,
            vector_norm=self._last_norm,
        )

    # -- running totals ----------------------------------------------------------------
    def _add(self, b: _Batch, sign: int) -> None:
        self._events += sign * b.events
        self._unknown += sign * b.unknown
        self._new_user += sign * b.new_user
        self._bucket_totals += sign * b.buckets
        self._vector_sum += sign * b.vector_sum
        self._vectors += sign * b.vectors
        self._loss_sum += sign * b.loss_sum
        self._loss_weight += sign * b.loss_weight

    def _resum(self) -> None:
        """Recompute the float totals from the ring, dropping add/subtract rounding."""
        ring = self._ring
        self._vector_sum = np.sum([b.vector_sum for b in ring], axis=0) if ring \
            else np.zeros_like(self._vector_sum)
        self._loss_sum = math.fsum(b.loss_sum for b in ring)
        self._loss_weight = math.fsum(b.loss_weight for b in ring)
        self._evicted_since_resum = 0


def publish(metrics, snapshot: DriftSnapshot) -> None:
    """Set the drift gauges of a :class:`streamer.metrics.Metrics` from ``snapshot``.

    Also observes the last batch's cosine shifts and vector norms in their histograms,
    so call it once per :meth:`DriftMonitor.observe_batch`. Counters (unknown-item
    events, new users) are the consumer's to increment.
    """
    metrics.unknown_item_ratio.set(snapshot.unknown_item_ratio)
    metrics.new_user_ratio.set(snapshot.new_user_ratio)
    metrics.popularity_psi.set(snapshot.psi)
    metrics.popularity_js.set(snapshot.js)
    metrics.centroid_distance.set(snapshot.centroid_distance)
    metrics.loss_ratio.set(snapshot.loss_ratio)
    observe = metrics.cosine_shift.observe
    for value in snapshot.cosine_shift.tolist():
        observe(value)
    observe = metrics.vector_norm.observe
    for value in snapshot.vector_norm.tolist():
        observe(value)


_EMPTY = np.zeros(0)
_EMPTY.flags.writeable = False


def _old_vectors(old_vectors, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the previous vectors that exist [u, k], which rows have one: bool [m])."""
    if old_vectors is None:
        return np.zeros((0, k)), np.zeros(m, dtype=bool)
    if isinstance(old_vectors, np.ndarray):
        if old_vectors.shape != (m, k):
            raise ConfigError(f"old_vectors must have shape ({m}, {k}), got {old_vectors.shape}")
        return old_vectors.astype(np.float64, copy=False), np.ones(m, dtype=bool)
    if len(old_vectors) != m:
        raise ConfigError(f"old_vectors must have one entry per new vector ({m}), got {len(old_vectors)}")
    has_old = np.fromiter((v is not None for v in old_vectors), dtype=bool, count=m)
    present = [v for v in old_vectors if v is not None]
    if not present:
        return np.zeros((0, k)), has_old
    old = np.asarray(present, dtype=np.float64)
    if old.shape != (len(present), k):
        raise ConfigError(f"old vectors must have {k} entries each, got shape {old.shape}")
    return old, has_old


def _loss_sums(losses, weights, m: int) -> tuple[float, float]:
    if losses is None:
        return 0.0, 0.0
    loss = np.asarray(losses, dtype=np.float64)
    if loss.shape != (m,):
        raise ConfigError(f"losses must have one entry per new vector ({m}), got shape {loss.shape}")
    if weights is None:
        w = np.ones(m)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (m,):
            raise ConfigError(f"loss_weights must have shape ({m},), got {w.shape}")
    finite = np.isfinite(loss) & np.isfinite(w)
    return float(np.dot(loss[finite], w[finite])), float(w[finite].sum())


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
