"""Synthetic implicit-feedback events with a known ground truth.

The model behind the data, in the order the generator builds it:

1. **Latent tastes.** Item vectors ``v_i`` and each user's starting vector ``u_0`` are
   Gaussian (rank ``factors``), scaled so that ``u . v`` has unit variance.
2. **Popularity and activity.** Items get Zipf weights ``rank ** -popularity_exponent``,
   users ``rank ** -activity_exponent``, over random permutations of the ranks.
3. **New items.** A ``new_item_fraction`` of items is released at a uniform time in the
   span; the rest exist from ``start_ts``. An item is never chosen before its release.
4. **Drift.** Each user's vector rotates in the plane of ``u_0`` and a direction ``d``
   (a mix of one population-wide trend and a personal random direction, orthogonal to
   ``u_0``, of the same norm): ``u(tau) = cos(theta tau) u_0 + sin(theta tau) d`` with
   ``tau`` the fraction of the span elapsed and ``theta = drift * pi / 2`` (``drift=1``:
   by the end tastes are orthogonal to where they started). The shared trend makes the
   popular items change over time, not only each user's favourites.
5. **Events.** Times are uniform over the span (sorted); each event's user follows the
   activity weights; its item follows ``softmax(u(tau) . v / temperature + log popularity)``
   over the items released by the event's time. Sampling is by importance resampling:
   ``candidates`` items are drawn by popularity (alias method; unreleased ones discarded),
   then one of them by Gumbel-max over ``u . v / temperature``. This approaches the exact
   softmax as ``candidates`` grows; with few candidates tastes are a little flattened.
6. **Weights.** 1.0 for a view; with small probabilities 3.0 (click) or 10.0 (purchase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from factors.data import IdIndex, Interactions
from factors.errors import ConfigError

__all__ = ["SynthParams", "SynthTruth", "generate", "generate_with_truth"]

#: Event weights and the probabilities of the stronger kinds (view is the rest).
VIEW_WEIGHT, CLICK_WEIGHT, PURCHASE_WEIGHT = 1.0, 3.0, 10.0
CLICK_PROBABILITY, PURCHASE_PROBABILITY = 0.08, 0.02
#: Share of the population-wide trend in each user's drift direction.
_TREND_SHARE = 0.7
#: Events handled per vectorised step (bounds the (events, candidates, factors) gather).
_BLOCK = 16_384


@dataclass(frozen=True)
class SynthParams:
    """Size and shape of a synthetic event log (see the module docstring for the model).

    ``temperature`` (> 0) sharpens (small) or flattens (large) tastes relative to
    popularity; ``candidates`` (>= 1) is the importance-resampling pool per event.
    """

    users: int = 2000
    items: int = 1000
    events: int = 50_000
    seed: int = 0
    factors: int = 16
    popularity_exponent: float = 1.1
    activity_exponent: float = 1.2
    drift: float = 0.3
    new_item_fraction: float = 0.2
    start_ts: float = 1_700_000_000.0
    span_seconds: float = 30 * 86400
    temperature: float = 0.5
    candidates: int = 64

    def __post_init__(self) -> None:
        for name in ("users", "items", "factors", "candidates"):
            _check(name, getattr(self, name), ">= 1", lambda v: v >= 1, integer=True)
        _check("events", self.events, ">= 0", lambda v: v >= 0, integer=True)
        _check("seed", self.seed, ">= 0", lambda v: v >= 0, integer=True)
        for name in ("popularity_exponent", "activity_exponent", "drift"):
            _check(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        _check("new_item_fraction", self.new_item_fraction, "in [0, 1)", lambda v: 0 <= v < 1)
        _check("span_seconds", self.span_seconds, "> 0", lambda v: v > 0)
        _check("temperature", self.temperature, "> 0", lambda v: v > 0)
        _check("start_ts", self.start_ts, "finite", lambda v: True)


def _check(name: str, value, expected: str, ok, integer: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {expected}, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True, eq=False)
class SynthTruth:
    """The ground truth behind a generated log; row ``i`` is index ``i`` of the IdIndex.

    Attributes
    ----------
    user_start : float32 [users, factors]
        Tastes at ``start_ts``.
    user_drift : float32 [users, factors]
        Drift direction ``d`` (orthogonal to the start, same norm).
    item_factors : float32 [items, factors]
    item_popularity, user_activity : float64
        Normalised Zipf weights.
    release_ts : float64 [items]
        When each item becomes available (``start_ts`` for the original catalogue).
    theta : float
        Total rotation over the span, radians.
    """

    params: SynthParams
    user_start: np.ndarray
    user_drift: np.ndarray
    item_factors: np.ndarray
    item_popularity: np.ndarray
    user_activity: np.ndarray
    release_ts: np.ndarray
    theta: float

    def user_factors_at(self, ts: float) -> np.ndarray:
        """Every user's taste vector at time ``ts`` (clamped to the span), float32."""
        p = self.params
        tau = min(max((float(ts) - p.start_ts) / p.span_seconds, 0.0), 1.0)
        angle = self.theta * tau
        return (math.cos(angle) * self.user_start + math.sin(angle) * self.user_drift).astype(
            np.float32
        )


def generate(params: SynthParams) -> Interactions:
    """A time-ordered synthetic event log; the same params (seed included) give the same log.

    User ids are ``"u0".."u{users-1}"`` and item ids ``"i0".."i{items-1}"``, indexed in
    that order (so index == ground-truth row); some may have no events.
    """
    return generate_with_truth(params)[0]


def generate_with_truth(params: SynthParams) -> tuple[Interactions, SynthTruth]:
    """:func:`generate` plus the :class:`SynthTruth` it sampled from."""
    p = params
    rng = np.random.default_rng(p.seed)
    truth = _ground_truth(p, rng)

    n = p.events
    tau = np.sort(rng.random(n))  # fraction of the span elapsed, per event
    users = _sample_discrete(truth.user_activity, rng.random(n)).astype(np.int32)
    items = np.empty(n, dtype=np.int32)
    sampler = _ItemSampler(truth, p, rng)
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        items[lo:hi] = sampler.choose(users[lo:hi], tau[lo:hi])

    draw = rng.random(n)
    weights = np.where(
        draw < PURCHASE_PROBABILITY,
        PURCHASE_WEIGHT,
        np.where(draw < PURCHASE_PROBABILITY + CLICK_PROBABILITY, CLICK_WEIGHT, VIEW_WEIGHT),
    )
    inter = Interactions(
        users=users,
        items=items,
        weights=weights.astype(np.float32),
        timestamps=p.start_ts + tau * p.span_seconds,
        user_ids=IdIndex.from_ids(f"u{i}" for i in range(p.users)),
        item_ids=IdIndex.from_ids(f"i{i}" for i in range(p.items)),
    )
    return inter, truth


def _ground_truth(p: SynthParams, rng: np.random.Generator) -> SynthTruth:
    scale = p.factors ** -0.25  # so that u . v has unit variance
    item_factors = rng.standard_normal((p.items, p.factors)) * scale
    start = rng.standard_normal((p.users, p.factors)) * scale
    trend = rng.standard_normal(p.factors)
    trend /= np.linalg.norm(trend)
    personal = rng.standard_normal((p.users, p.factors))
    personal /= np.linalg.norm(personal, axis=1, keepdims=True)
    direction = _TREND_SHARE * trend + (1.0 - _TREND_SHARE) * personal
    # Keep only the part orthogonal to the start, then give it the start's norm.
    norms2 = np.einsum("uk,uk->u", start, start)
    direction -= (np.einsum("uk,uk->u", direction, start) / norms2)[:, None] * start
    direction *= np.sqrt(norms2 / np.einsum("uk,uk->u", direction, direction))[:, None]

    popularity = _zipf(p.items, p.popularity_exponent, rng)
    activity = _zipf(p.users, p.activity_exponent, rng)
    release = np.full(p.items, p.start_ts)
    new = rng.permutation(p.items)[: int(round(p.new_item_fraction * p.items))]
    release[new] = p.start_ts + rng.random(len(new)) * p.span_seconds
    return SynthTruth(
        params=p,
        user_start=start.astype(np.float32),
        user_drift=direction.astype(np.float32),
        item_factors=item_factors.astype(np.float32),
        item_popularity=popularity,
        user_activity=activity,
        release_ts=release,
        theta=p.drift * math.pi / 2,
    )


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised weights ``rank ** -exponent`` assigned to a random permutation of 0..n-1."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    out = np.empty(n)
    out[rng.permutation(n)] = weights / weights.sum()
    return out


def _sample_discrete(weights: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from unnormalised ``weights`` for each ``uniform`` in [0, 1)."""
    cumulative = np.cumsum(weights)
    picks = np.searchsorted(cumulative, uniform * cumulative[-1], side="right")
    return np.minimum(picks, len(weights) - 1)


class _ItemSampler:
    """Draws each event's item: popularity candidates, then Gumbel-max over taste / T.

    Candidates come from one alias table over the whole catalogue (O(1) per draw); a
    candidate not yet released at the event's time is discarded, which leaves the others
    distributed by popularity over the released items. An event whose candidates are all
    discarded draws again; after a few rounds it falls back to exact inverse-CDF draws
    from its released set.
    """

    _ROUNDS = 4

    def __init__(self, truth: SynthTruth, p: SynthParams, rng: np.random.Generator) -> None:
        self.truth, self.p, self.rng = truth, p, rng
        self.release_tau = (truth.release_ts - p.start_ts) / p.span_seconds
        self.last_release = float(self.release_tau.max())
        self.threshold, self.alias = _alias_table(truth.item_popularity)

    def choose(self, users: np.ndarray, tau: np.ndarray) -> np.ndarray:
        truth, p = self.truth, self.p
        n, k = len(users), p.factors
        angle = (truth.theta * tau)[:, None]
        taste = np.cos(angle) * truth.user_start[users] + np.sin(angle) * truth.user_drift[users]
        taste = taste.astype(np.float32)
        chosen = np.full(n, -1, dtype=np.int64)
        pending = np.arange(n)
        for _ in range(self._ROUNDS):
            candidates = self._draw((len(pending), p.candidates))
            if tau[pending[0]] < self.last_release:  # tau is sorted: later blocks skip this
                released = self.release_tau[candidates] <= tau[pending, None]
            else:
                released = None
            vectors = np.take(truth.item_factors, candidates.ravel(), axis=0)
            scores = np.matmul(
                vectors.reshape(len(pending), p.candidates, k), taste[pending, :, None]
            )[:, :, 0]
            scores = scores / np.float32(p.temperature) + self._gumbel(scores.shape)
            if released is not None:
                scores[~released] = -np.inf
            best = np.argmax(scores, axis=1)
            chosen[pending] = candidates[np.arange(len(pending)), best]
            if released is not None:
                chosen[pending[~released[np.arange(len(pending)), best]]] = -1
            pending = np.flatnonzero(chosen < 0)
            if len(pending) == 0:
                return chosen
        for e in pending:  # pathological: almost all popularity mass is not released yet
            chosen[e] = self._exact(taste[e], tau[e])
        return chosen

    def _draw(self, shape) -> np.ndarray:
        """Alias-method draws of item indices by popularity."""
        x = self.rng.random(shape) * len(self.alias)
        slot = np.minimum(x.astype(np.int64), len(self.alias) - 1)  # guard float rounding
        return np.where(x - slot < self.threshold[slot], slot, self.alias[slot])

    def _gumbel(self, shape) -> np.ndarray:
        u = self.rng.random(shape, dtype=np.float32)
        with np.errstate(divide="ignore"):
            return -np.log(-np.log(u))

    def _exact(self, taste: np.ndarray, tau: float) -> int:
        released = np.flatnonzero(self.release_tau <= tau)
        picks = released[_sample_discrete(
            self.truth.item_popularity[released], self.rng.random(self.p.candidates)
        )]
        scores = self.truth.item_factors[picks] @ taste / self.p.temperature
        return int(picks[np.argmax(scores + self._gumbel(scores.shape))])


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table: slot ``j`` keeps itself with probability ``threshold[j]``."""
    m = len(weights)
    scaled = weights * (m / weights.sum())
    threshold = np.ones(m)
    alias = np.arange(m)
    small = [j for j in range(m) if scaled[j] < 1.0]
    large = [j for j in range(m) if scaled[j] >= 1.0]
    scaled = scaled.tolist()
    while small and large:
        s, g = small.pop(), large[-1]
        threshold[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        if scaled[g] < 1.0:
            small.append(large.pop())
    return threshold, alias
