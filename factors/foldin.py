"""Batched exact fold-in: new user (or item) vectors against fixed factors of the other side.

A row of raw weights ``r`` over items becomes confidences ``s = alpha * f(r)`` and the
vector ``x = (G + sum s y y^T)^-1 sum (1 + s) y`` with ``G = Y^T Y + reg * I``: exactly the
user half-step of implicit ALS, for rows the model has never seen. :class:`FoldIn` does
the per-model work once (the Gram matrix, its inverse Cholesky factor, the whitened item
vectors) so that every batch pays only for its own rows, and checks the batch before a
kernel sees it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from factors import kernels
from factors.data import ConfidenceParams, scale_weights
from factors.errors import ConfigError, DataError

__all__ = ["SCALINGS", "FoldIn", "confidence", "validate_confidence_params"]

#: Names accepted for the scaling ``f`` in ``s = alpha * f(r)``.
SCALINGS = ("identity", "log")
# Batches of at most this many rows are solved on the calling thread (see
# kernels.solve_rows_exact_serial); larger ones use the thread pool.
SERIAL_MAX_ROWS = 16


def validate_confidence_params(regularization, alpha, scaling, epsilon) -> None:
    """Raise :class:`ConfigError` unless the parameters of ``c = 1 + alpha * f(r)`` are usable.

    ``regularization >= 0``, ``alpha >= 0`` (both finite), ``scaling`` one of
    :data:`SCALINGS` and ``epsilon > 0`` (finite).
    """
    _check_real("regularization", regularization, minimum=0.0)
    _check_real("alpha", alpha, minimum=0.0)
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ConfigError(f"scaling must be one of {SCALINGS!r}, got {scaling!r}")
    _check_real("epsilon", epsilon, minimum=0.0, strict=True)


def confidence(
    weights, alpha: float, scaling: str = "identity", epsilon: float = 1.0
) -> np.ndarray:
    """Return ``s = alpha * f(r)`` as float32, with ``f(r) = r`` or ``log1p(r / epsilon)``.

    Computed in float64 and rounded once. The kernels take ``s = c - 1`` as their
    "confidence", so the confidence of an observed entry is ``c = 1 + s``.

    Parameters
    ----------
    weights : array of float, raw aggregated weights ``r >= 0``.
    alpha, scaling, epsilon : see :func:`validate_confidence_params`.

    Returns
    -------
    float32 array of the shape of ``weights``. Entries that overflow float32 come back
    as inf; callers decide whether that is a data or a fitting error.
    """
    return scale_weights(weights, ConfidenceParams(alpha=alpha, scaling=scaling, epsilon=epsilon))


class FoldIn:
    """Exact batched fold-in of new rows against fixed factors.

    Holds the fixed factors ``Y`` (float32), the Gram matrix ``G = Y^T Y + reg * I``,
    ``Ginv = G^-1`` (both float64), and what makes short rows cheap: the inverse Cholesky
    factor ``Linv`` of ``G`` and the whitened vectors ``Z = Y Linv^T`` (float32, as much
    memory as ``Y``). Rows with at most ``woodbury_max`` entries are solved through
    the Woodbury identity in O(n^2 k + k^2), longer ones through a k x k Cholesky
    factorisation; both are exact (see :func:`factors.kernels.solve_rows_exact`).

    The same class folds in new items against fixed user factors: pass the user factors
    as ``item_factors`` (or use :meth:`for_items`) and rows of weights over users.

    Parameters
    ----------
    item_factors : float array [n, k]
        The fixed side. Kept by reference when it is already C-contiguous float32; do not
        modify it afterwards.
    regularization : float, >= 0 (and ``G`` must be positive definite)
    alpha : float, >= 0
    scaling : "identity" or "log"
    epsilon : float, > 0
    woodbury_max : int or None
        Longest row solved through Woodbury; ``None`` for
        :func:`factors.kernels.default_woodbury_max`, 0 for Cholesky everywhere.
    """

    def __init__(
        self,
        item_factors: np.ndarray,
        regularization: float,
        alpha: float,
        scaling: str = "identity",
        epsilon: float = 1.0,
        *,
        woodbury_max: int | None = None,
    ) -> None:
        validate_confidence_params(regularization, alpha, scaling, epsilon)
        Y = np.asarray(item_factors)
        if Y.ndim != 2 or Y.shape[1] < 1:
            raise ConfigError(
                f"item_factors must be a 2-D array [n, k] with k >= 1, got shape {Y.shape}"
            )
        if not _is_real_dtype(Y.dtype):
            raise ConfigError(f"item_factors must be real numbers, got dtype {Y.dtype}")
        Y = np.ascontiguousarray(Y, dtype=np.float32)
        if not np.isfinite(Y).all():
            raise ConfigError("item_factors must be finite, got NaN or inf")
        k = Y.shape[1]
        if woodbury_max is None:
            woodbury_max = kernels.default_woodbury_max(k)
        _check_int("woodbury_max", woodbury_max, minimum=0)

        self.Y = Y
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.scaling = scaling
        self.epsilon = float(epsilon)
        self.woodbury_max = int(woodbury_max)
        self.G = kernels.gram(Y, self.regularization)
        self.Linv = kernels.inverse_cholesky(self.G)
        if not np.isfinite(self.Linv).all():
            raise ConfigError(
                "the Gram matrix Y^T Y + regularization * I is not positive definite: "
                f"regularization must be > 0 for these factors, got {regularization}"
            )
        self.Ginv = self.Linv.T @ self.Linv
        self.Z = np.empty((Y.shape[0] if self.woodbury_max > 0 else 0, k), dtype=np.float32)
        if self.woodbury_max > 0:
            kernels.whiten(Y, self.Linv, self.Z)

    @classmethod
    def from_model(cls, model, side: str = "users", **kwargs) -> FoldIn:
        """Build from a fitted :class:`factors.als.ImplicitALS` (or any object with its attributes).

        ``side="users"`` folds in new users against ``model.item_factors_``;
        ``side="items"`` folds in new items against ``model.user_factors_``.
        Keyword arguments go to the constructor (``woodbury_max``).
        """
        if side not in ("users", "items"):
            raise ConfigError(f"side must be 'users' or 'items', got {side!r}")
        name = "item_factors_" if side == "users" else "user_factors_"
        fixed = getattr(model, name, None)
        if fixed is None:
            raise ConfigError(
                f"{type(model).__name__} is not fitted: call fit(R) before folding in"
            )
        return cls(fixed, model.regularization, model.alpha, model.scaling, model.epsilon, **kwargs)

    @classmethod
    def for_items(
        cls,
        user_factors: np.ndarray,
        regularization: float,
        alpha: float,
        scaling: str = "identity",
        epsilon: float = 1.0,
        **kwargs,
    ) -> FoldIn:
        """Fold in new items (rows of weights over users) against fixed user factors."""
        return cls(user_factors, regularization, alpha, scaling, epsilon, **kwargs)

    @property
    def item_factors(self) -> np.ndarray:
        """The fixed factors (float32 [n, k]); the same array as ``Y``."""
        return self.Y

    @property
    def factors(self) -> int:
        """Number of latent factors k."""
        return self.Y.shape[1]

    @property
    def n_items(self) -> int:
        """Number of rows of the fixed side (valid column indices are 0..n_items-1)."""
        return self.Y.shape[0]

    def solve(self, indptr, indices, weights, *, serial: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fold in a batch of rows given in CSR form over raw weights.

        Parameters
        ----------
        indptr : int array [m + 1], starting at 0, non-decreasing, ending at nnz
        indices : int array [nnz]
            Column (item) indices; those outside ``[0, n_items)`` are skipped and counted.
        weights : float array [nnz]
            Raw weights ``r >= 0``, aggregated per (row, item) by the caller or not:
            repeated items in a row add up as separate terms.
        serial : bool, optional
            Solve on the calling thread (True) or numba's thread pool (False); by default
            the pool takes batches of more than ``SERIAL_MAX_ROWS`` rows. Same results.

        Returns
        -------
        vectors : float32 [m, k]
            Exactly 0 for rows without known items.
        unknown : int64 [m]
            Number of skipped entries per row.

        Raises
        ------
        DataError
            Malformed input, negative or non-finite weights, or confidences that overflow
            float32.
        """
        indptr, indices, conf = self._check_batch(indptr, indices, weights)
        m = indptr.shape[0] - 1
        out = np.empty((m, self.factors), dtype=np.float32)
        unknown = np.empty(m, dtype=np.int64)
        if serial is None:
            serial = m <= SERIAL_MAX_ROWS
        kernel = kernels.solve_rows_exact_serial if serial else kernels.solve_rows_exact
        kernel(indptr, indices, conf, self.Y, self.G, self.Z, self.Linv, out, unknown,
               self.woodbury_max)
        return out, unknown

    def solve_one(self, items, weights) -> tuple[np.ndarray, int]:
        """Fold in one row: returns ``(vector float32 [k], number of unknown items)``."""
        items = np.asarray(items)
        if items.ndim != 1:
            raise DataError(f"items must be 1-D, got shape {items.shape}")
        indptr = np.array([0, items.shape[0]], dtype=np.int64)
        vectors, unknown = self.solve(indptr, items, weights)
        return vectors[0], int(unknown[0])

    def _check_batch(self, indptr, indices, weights):
        indptr = _as_index_array("indptr", indptr)
        indices = _as_index_array("indices", indices)
        weights = np.asarray(weights)
        if weights.ndim != 1:
            raise DataError(f"weights must be 1-D, got shape {weights.shape}")
        if not _is_real_dtype(weights.dtype):
            raise DataError(f"weights must be real numbers, got dtype {weights.dtype}")
        if indptr.shape[0] < 1:
            raise DataError("indptr must have at least one element (m + 1 for m rows), got 0")
        if indptr[0] != 0:
            raise DataError(f"indptr must start at 0, got {indptr[0]}")
        steps = np.diff(indptr)
        if steps.size and steps.min() < 0:
            row = int(np.argmax(steps < 0))
            raise DataError(
                f"indptr must be non-decreasing, got indptr[{row}]={indptr[row]} > "
                f"indptr[{row + 1}]={indptr[row + 1]}"
            )
        nnz = indices.shape[0]
        if indptr[-1] != nnz:
            raise DataError(f"indptr must end at len(indices)={nnz}, got {indptr[-1]}")
        if weights.shape[0] != nnz:
            raise DataError(f"weights must have len(indices)={nnz} entries, got {weights.shape[0]}")
        if nnz:
            if not np.isfinite(weights).all():
                raise DataError(f"weights must be finite, got {weights[~np.isfinite(weights)][0]}")
            low = weights.min()
            if low < 0:
                raise DataError(f"weights must be >= 0, got {low}")
        conf = confidence(weights, self.alpha, self.scaling, self.epsilon)
        if nnz and not np.isfinite(conf).all():
            bad = weights[~np.isfinite(conf)][0]
            raise DataError(
                f"confidence alpha * f(weight) overflows float32 for weight {bad} "
                f"(alpha={self.alpha}, scaling={self.scaling!r})"
            )
        # anything that is not a valid item stays invalid after the int32 cast
        if indices.dtype != np.int32:
            valid = (indices >= 0) & (indices < self.n_items)
            indices = np.where(valid, indices, -1).astype(np.int32)
        return indptr.astype(np.int64, copy=False), indices, conf


def _is_real_dtype(dtype) -> bool:
    return (
        dtype != np.bool_
        and np.issubdtype(dtype, np.number)
        and not np.issubdtype(dtype, np.complexfloating)
    )


def _as_index_array(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0 and array.dtype == np.float64:
        return array.astype(np.int64)  # np.asarray([]) is float64
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _check_real(name: str, value, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if strict and not value > minimum:
        raise ConfigError(f"{name} must be > {minimum:g}, got {value}")
    if not strict and not value >= minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
