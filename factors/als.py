"""Implicit-feedback ALS (Hu, Koren and Volinsky 2008) as a scikit-learn style estimator.

This module validates and holds state; the numerics live in :mod:`factors.kernels`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import numba
import numpy as np
import scipy.sparse as sp

from factors import kernels
from factors.errors import ConfigError, DataError, ModelFitError
from factors.foldin import FoldIn, _check_int, confidence, validate_confidence_params

__all__ = ["SOLVERS", "ImplicitALS"]

#: Names accepted for ``ImplicitALS(solver=...)``.
SOLVERS = ("cg", "cholesky")


class ImplicitALS:
    """Implicit ALS over a users x items matrix of aggregated raw weights.

    Minimises ``sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (||X||^2 + ||Y||^2)`` where an
    observed weight ``r`` gives ``p = 1`` and ``c = 1 + alpha * f(r)``, and every other
    cell ``p = 0, c = 1``. Each iteration solves all users against fixed items, then all
    items against the new users.

    Parameters
    ----------
    factors : int, >= 1
        Latent dimension k.
    regularization : float, >= 0
    alpha : float, >= 0
        Confidence scale.
    scaling : "identity" or "log"
        ``f(r) = r`` or ``f(r) = log1p(r / epsilon)``.
    epsilon : float, > 0
    iterations : int, >= 1
    solver : "cg" or "cholesky"
        ``"cg"``: ``cg_steps`` conjugate-gradient steps per row, warm-started (as implicit's
        ``use_cg=True``). ``"cholesky"``: exact solves, through the Woodbury identity for
        rows with at most k entries when that is cheaper than whitening the fixed side.
    cg_steps : int, >= 1
    seed : int >= 0 or None
        Seeds the initial factors (uniform in [0, 0.01), float32, users then items, as
        implicit does). ``None`` draws fresh entropy.
    num_threads : int, >= 0
        Threads for the numba kernels during each call, 0 for all of numba's pool;
        numba's setting is restored afterwards. Larger values are capped at the pool size.
    callback : callable or None
        ``callback(iteration, loss, seconds)`` after each iteration, with the iteration
        number from 0, the training loss (:func:`factors.kernels.weighted_loss`) and the
        wall-clock seconds of that iteration.

    Attributes
    ----------
    user_factors_ : float32 [n_users, k]
    item_factors_ : float32 [n_items, k]
    loss_history_ : list of float, the loss after each iteration
    fit_seconds_ : float, wall-clock seconds of the whole fit

    Notes
    -----
    The fit is deterministic: the same seed and data give bit-identical factors for any
    ``num_threads``, because every row is solved independently and the sums spanning rows
    (Gram matrices, the loss) add fixed blocks in a fixed order.

    ``fit`` sums duplicate (user, item) entries of ``R`` (its definition is aggregated
    weights); explicitly stored zeros are kept as observations with ``c = 1, p = 1``.
    """

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 10.0,
        scaling: str = "identity",
        epsilon: float = 1.0,
        iterations: int = 15,
        solver: str = "cg",
        cg_steps: int = 3,
        seed: int | None = 0,
        num_threads: int = 0,
        callback: Callable[[int, float, float], None] | None = None,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.scaling = scaling
        self.epsilon = epsilon
        self.iterations = iterations
        self.solver = solver
        self.cg_steps = cg_steps
        self.seed = seed
        self.num_threads = num_threads
        self.callback = callback

    def get_params(self) -> dict:
        """The constructor parameters, by name (scikit-learn convention)."""
        return {
            name: getattr(self, name)
            for name in (
                "factors", "regularization", "alpha", "scaling", "epsilon", "iterations",
                "solver", "cg_steps", "seed", "num_threads", "callback",
            )
        }

    # ------------------------------------------------------------------ fitting

    def fit(self, R) -> ImplicitALS:
        """Learn user and item factors from ``R`` (users x items, aggregated raw weights).

        Parameters
        ----------
        R : scipy.sparse matrix, CSR preferred
            Non-negative finite weights ``r``; other sparse formats are converted.

        Returns
        -------
        self

        Raises
        ------
        ConfigError
            A parameter is out of range.
        DataError
            ``R`` is not a non-empty sparse matrix of finite non-negative weights.
        ModelFitError
            Confidences overflow float32, or the factors became NaN or inf.
        """
        self._check_params()
        R = _check_matrix(R)
        n_users, n_items = R.shape
        k = self.factors
        conf = confidence(R.data, self.alpha, self.scaling, self.epsilon)
        if not np.isfinite(conf).all():
            bad = R.data[~np.isfinite(conf)][0]
            raise ModelFitError(
                f"confidence alpha * f(r) overflows float32 for r = {bad} "
                f"(alpha={self.alpha}, scaling={self.scaling!r}): lower alpha or use scaling='log'"
            )
        users = _Rows(R.indptr.astype(np.int64), R.indices.astype(np.int32), conf)
        t = sp.csr_matrix((conf, R.indices, R.indptr), shape=R.shape).T.tocsr()
        items = _Rows(t.indptr.astype(np.int64), t.indices.astype(np.int32), t.data)

        rng = np.random.default_rng(self.seed)
        X = rng.random((n_users, k), dtype=np.float32) * np.float32(0.01)
        Y = rng.random((n_items, k), dtype=np.float32) * np.float32(0.01)

        history: list[float] = []
        start = time.perf_counter()
        with _numba_threads(self.num_threads):
            YtY = kernels.gram(Y, 0.0)
            for iteration in range(self.iterations):
                t0 = time.perf_counter()
                self._half_step(users, Y, YtY, X, iteration, "user")
                XtX = kernels.gram(X, 0.0)
                _check_finite(XtX, iteration, "user")
                self._half_step(items, X, XtX, Y, iteration, "item")
                YtY = kernels.gram(Y, 0.0)
                _check_finite(YtY, iteration, "item")
                loss = float(
                    kernels.loss_from_grams(
                        users.indptr, users.indices, users.conf, X, Y, XtX, YtY, self.regularization
                    )
                )
                history.append(loss)
                if self.callback is not None:
                    self.callback(iteration, loss, time.perf_counter() - t0)

        self.user_factors_ = X
        self.item_factors_ = Y
        self.loss_history_ = history
        self.fit_seconds_ = time.perf_counter() - start
        self._foldin_cache = {}
        return self

    def _half_step(self, rows, Y, YtY, X, iteration, side) -> None:
        """Solve every row of ``rows`` against fixed ``Y`` (``YtY = Y^T Y``), into ``X``."""
        k = Y.shape[1]
        G = YtY.copy()
        G[np.diag_indices(k)] += self.regularization  # bit-identical to gram(Y, reg)
        if self.solver == "cg":
            kernels.solve_rows_cg(rows.indptr, rows.indices, rows.conf, Y, G, X, self.cg_steps)
            return
        woodbury_max = kernels.default_woodbury_max(k)
        # Woodbury needs the fixed side whitened (n k^2 / 2) and saves about k^3 / 6 per
        # short row: worth it when short rows outnumber fixed rows by k / 3 or so.
        n_short = int(np.count_nonzero(np.diff(rows.indptr) <= woodbury_max))
        if n_short * k < 3 * Y.shape[0]:
            woodbury_max = 0
        if woodbury_max:
            Linv = kernels.inverse_cholesky(G)
            if not np.isfinite(Linv).all():
                raise ModelFitError(
                    f"iteration {iteration}: the {side} half-step's Gram matrix is not positive "
                    f"definite (regularization={self.regularization}): raise regularization"
                )
            Z = np.empty(Y.shape, dtype=np.float32)
            kernels.whiten(Y, Linv, Z)
        else:
            Linv, Z = np.empty((k, k)), np.empty((0, k), dtype=np.float32)
        unknown = np.empty(X.shape[0], dtype=np.int64)
        kernels.solve_rows_exact(
            rows.indptr, rows.indices, rows.conf, Y, G, Z, Linv, X, unknown, woodbury_max
        )

    def _check_params(self) -> None:
        _check_int("factors", self.factors, minimum=1)
        validate_confidence_params(self.regularization, self.alpha, self.scaling, self.epsilon)
        _check_int("iterations", self.iterations, minimum=1)
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS!r}, got {self.solver!r}")
        _check_int("cg_steps", self.cg_steps, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_int("num_threads", self.num_threads, minimum=0)
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback must be callable or None, got {self.callback!r}")

    # ------------------------------------------------------------------ fold-in

    def recalculate_user(self, items, weights) -> np.ndarray:
        """The exact vector of a user with these (item, raw weight) pairs; the model is unchanged.

        Parameters
        ----------
        items : int array [n], indices into ``item_factors_``
        weights : float array [n], raw weights ``r >= 0``

        Returns
        -------
        float32 [k]

        Raises
        ------
        DataError
            An item index is out of range, or the weights are malformed.
        """
        return self._solve_one("users", items, weights)

    def recalculate_item(self, users, weights) -> np.ndarray:
        """The exact vector of an item with these (user, raw weight) pairs; model unchanged."""
        return self._solve_one("items", users, weights)

    def fold_in(self, indptr, indices, weights) -> tuple[np.ndarray, np.ndarray]:
        """Exact vectors for a batch of users given as CSR rows over items (raw weights).

        Returns ``(vectors float32 [m, k], unknown int64 [m])``; see :meth:`FoldIn.solve`.
        """
        foldin = self._foldin("users")
        with _numba_threads(self.num_threads):
            return foldin.solve(indptr, indices, weights)

    def fold_in_items(self, indptr, indices, weights) -> tuple[np.ndarray, np.ndarray]:
        """Exact vectors for a batch of items given as CSR rows over users (raw weights)."""
        foldin = self._foldin("items")
        with _numba_threads(self.num_threads):
            return foldin.solve(indptr, indices, weights)

    def _solve_one(self, side, indices, weights) -> np.ndarray:
        foldin = self._foldin(side)
        with _numba_threads(self.num_threads):
            vector, unknown = foldin.solve_one(indices, weights)
        if unknown:
            kind = "item" if side == "users" else "user"
            raise DataError(
                f"{unknown} {kind} indices are outside [0, {foldin.n_items}): "
                f"recalculate_{side[:-1]} needs known {kind}s (fold_in skips and counts them)"
            )
        return vector

    def _foldin(self, side: str) -> FoldIn:
        """The :class:`FoldIn` for one side, built once per fitted factor matrix."""
        fixed = getattr(self, "item_factors_" if side == "users" else "user_factors_", None)
        if fixed is None:
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(R) before folding in")
        key = (side, id(fixed), self.regularization, self.alpha, self.scaling, self.epsilon)
        cache = self.__dict__.setdefault("_foldin_cache", {})
        if side not in cache or cache[side][0] != key:
            with _numba_threads(self.num_threads):
                cache[side] = (key, FoldIn.from_model(self, side))
        return cache[side][1]


class _Rows:
    """One side of the training matrix as kernel-ready CSR arrays."""

    __slots__ = ("indptr", "indices", "conf")

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, conf: np.ndarray) -> None:
        self.indptr = indptr
        self.indices = indices
        self.conf = np.ascontiguousarray(conf, dtype=np.float32)


def _check_matrix(R) -> sp.csr_matrix:
    """A canonical float32 CSR copy of ``R``, or :class:`DataError`."""
    if not sp.issparse(R):
        raise DataError(
            f"R must be a scipy.sparse matrix (users x items), got {type(R).__name__}; "
            "build one with factors.data.weight_matrix or scipy.sparse.csr_matrix"
        )
    if R.ndim != 2 or R.shape[0] < 1 or R.shape[1] < 1:
        raise DataError(f"R must have at least one user and one item, got shape {R.shape}")
    if not np.issubdtype(R.dtype, np.number) or np.issubdtype(R.dtype, np.complexfloating):
        raise DataError(f"R must hold real weights, got dtype {R.dtype}")
    with np.errstate(over="ignore"):  # overflow to inf is reported below
        R = sp.csr_matrix(R, dtype=np.float32, copy=True)
    R.sum_duplicates()
    if R.nnz:
        bad = ~np.isfinite(R.data)
        if bad.any():
            row, col = _position(R, int(np.argmax(bad)))
            raise DataError(
                f"R weights must be finite in float32, got {R.data[bad][0]} "
                f"at (user {row}, item {col})"
            )
        if R.data.min() < 0:
            pos = int(np.argmin(R.data))
            row, col = _position(R, pos)
            raise DataError(
                f"R weights must be >= 0, got {R.data[pos]} at (user {row}, item {col})"
            )
    return R


def _position(R: sp.csr_matrix, pos: int) -> tuple[int, int]:
    row = int(np.searchsorted(R.indptr, pos, side="right")) - 1
    return row, int(R.indices[pos])


def _check_finite(gram: np.ndarray, iteration: int, side: str) -> None:
    # A NaN or inf anywhere in the factors shows on the diagonal of their Gram matrix.
    if not np.isfinite(np.diag(gram)).all():
        raise ModelFitError(
            f"iteration {iteration}: {side} factors became NaN or inf: "
            "lower alpha, raise regularization, or check the weights"
        )


@contextmanager
def _numba_threads(num_threads: int):
    """Run the numba kernels on ``num_threads`` threads (0: the whole pool), then restore."""
    previous = numba.get_num_threads()
    pool = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(pool if num_threads == 0 else min(num_threads, pool))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
