"""Item ids (UTF-8 bytes) -> rows of the item factors, looked up in numba.

The consumer looks up the item of every new event, and of every event of a history it
reads back from the store: through a Python dict of ``str`` that costs a ``bytes`` ->
``str`` decode and a dict probe per event. :class:`ItemTable` is the same mapping as an
open-addressing hash table over the ids' UTF-8 bytes (FNV-1a, linear probing), so a
batch's ids, as they lie in one buffer (:class:`streamer.history_kernels.HistoryColumns`),
are looked up in one kernel call.

Reference: ``{item: row for row, item in enumerate(item_ids)}`` (what
:meth:`streamer.model.LoadedModel.item_indices` uses): same rows, -1 for ids it lacks, the
last row for an id listed twice.
"""

from __future__ import annotations

from typing import Sequence

import numba as nb
import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@nb.njit(cache=True, nogil=True)
def _hash(buf, pos, length):
    h = _FNV_OFFSET
    for i in range(pos, pos + length):
        h = (h ^ np.uint64(buf[i])) * _FNV_PRIME
    return h


@nb.njit(cache=True, nogil=True)
def _equal(a, a_pos, a_len, b, b_pos, b_len):
    if a_len != b_len:
        return False
    for i in range(a_len):
        if a[a_pos + i] != b[b_pos + i]:
            return False
    return True


@nb.njit(cache=True, nogil=True)
def _build(keys, key_pos, key_len, table):
    mask = np.uint64(table.shape[0] - 1)
    for i in range(key_pos.shape[0]):
        slot = _hash(keys, key_pos[i], key_len[i]) & mask
        while True:
            j = table[slot]
            if j < 0:
                table[slot] = i
                break
            if _equal(keys, key_pos[j], key_len[j], keys, key_pos[i], key_len[i]):
                table[slot] = i  # a repeated id maps to its last row, as in a dict
                break
            slot = (slot + np.uint64(1)) & mask


@nb.njit(cache=True, nogil=True)
def _lookup(buf, pos, length, keys, key_pos, key_len, table, out):
    mask = np.uint64(table.shape[0] - 1)
    for e in range(pos.shape[0]):
        slot = _hash(buf, pos[e], length[e]) & mask
        row = -1
        while True:
            j = table[slot]
            if j < 0:
                break
            if _equal(keys, key_pos[j], key_len[j], buf, pos[e], length[e]):
                row = j
                break
            slot = (slot + np.uint64(1)) & mask
        out[e] = row


class ItemTable:
    """The rows of a model's item ids, for ids given as bytes in a buffer."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        encoded = [item.encode("utf-8", "surrogatepass") for item in item_ids]
        self._keys = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._key_len = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self._key_pos = np.zeros(len(encoded), np.int64)
        np.cumsum(self._key_len[:-1], out=self._key_pos[1:])
        size = 1 << max(3, (2 * len(encoded) - 1).bit_length())  # at most half full
        self._table = np.full(size, -1, np.int64)
        _build(self._keys, self._key_pos, self._key_len, self._table)

    def rows(self, buf: np.ndarray, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Row of each id ``buf[pos[e]:pos[e] + length[e]]`` (uint8 buffer), -1 if unknown.

        Returns int32 [len(pos)].
        """
        out = np.empty(len(pos), np.int64)
        _lookup(buf, np.asarray(pos, np.int64), np.asarray(length, np.int64), self._keys,
                self._key_pos, self._key_len, self._table, out)
        return out.astype(np.int32)
