"""Shared fixtures for the numeric core: factories of small seeded problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp


@dataclass
class RowProblem:
    """Rows to solve (CSR over confidences s) against fixed factors Y."""

    indptr: np.ndarray  # int64 [m + 1]
    indices: np.ndarray  # int32 [nnz]
    conf: np.ndarray  # float32 [nnz], s = alpha * f(r)
    Y: np.ndarray  # float32 [n, k]
    X0: np.ndarray  # float32 [m, k], a warm start for CG
    regularization: float

    @property
    def m(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def n_items(self) -> int:
        return self.Y.shape[0]

    @property
    def k(self) -> int:
        return self.Y.shape[1]

    def args(self):
        return self.indptr, self.indices, self.conf


@pytest.fixture
def make_rows():
    """Factory of row problems whose first rows are the edge cases.

    Row 0 is empty, row 1 has a single entry, row 2 repeats one item three times (plus
    another item), row 3 mixes unknown indices (-1, n, n + 5) with one known item, row 4
    has only unknown indices, row 5 has entries with s == 0, row 6 is longer than k, row 7
    has only entries with s == 0; the remaining rows are random with lengths from 1 to 2k.
    """

    def make(
        m: int = 24,
        n_items: int = 40,
        k: int = 8,
        seed: int = 0,
        regularization: float = 0.1,
        scale: float = 0.5,
        max_conf: float = 20.0,
    ) -> RowProblem:
        rng = np.random.default_rng(seed)
        rows: list[list[int]] = [
            [],
            [int(rng.integers(n_items))],
            [3, 3, 7, 3],
            [-1, n_items, 5, n_items + 5],
            [-2, n_items],
            [1, 2, 9, 11],
            list(rng.integers(0, n_items, 2 * k + 3)),
            [8, 12],
        ]
        while len(rows) < m:
            rows.append(list(rng.integers(0, n_items, int(rng.integers(1, 2 * k + 1)))))
        rows = rows[:m]
        indptr = np.zeros(m + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in rows])
        indices = np.array([j for r in rows for j in r], dtype=np.int32)
        conf = (rng.random(indices.shape[0]) * max_conf).astype(np.float32)
        conf[indptr[5] : indptr[5] + 2] = 0.0  # row 5: two entries with s == 0
        conf[indptr[7] : indptr[8]] = 0.0  # row 7: nothing but s == 0
        Y = (rng.standard_normal((n_items, k)) * scale).astype(np.float32)
        X0 = (rng.standard_normal((m, k)) * scale).astype(np.float32)
        return RowProblem(indptr, indices, conf, Y, X0, regularization)

    return make


@pytest.fixture
def make_ratings():
    """Factory of users x items CSR matrices of raw weights (float32), seeded.

    Includes an empty user (row 0) and an item nobody touched (the last column).
    """

    def make(
        users: int = 50, items: int = 30, density: float = 0.15, seed: int = 0,
        max_weight: float = 5.0,
    ):
        rng = np.random.default_rng(seed)
        mask = rng.random((users, items)) < density
        mask[0] = False
        mask[:, -1] = False
        mask[1:, 0] |= rng.random(users - 1) < 0.5  # a popular item
        weights = np.where(mask, rng.integers(1, int(max_weight) + 1, (users, items)), 0)
        return sp.csr_matrix(weights.astype(np.float32))

    return make
