"""ItemTable: the rows a dict of the model's item ids gives, looked up from bytes."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.item_table import ItemTable

ids = st.text(max_size=5)  # short: collisions of prefixes, the empty id, non-ASCII


@settings(max_examples=300, deadline=None)
@given(st.lists(ids, max_size=40), st.lists(ids, max_size=30))
def test_rows_are_the_dicts(model_ids, queries):
    reference = {item: row for row, item in enumerate(model_ids)}  # a repeated id: its last row
    table = ItemTable(model_ids)
    asked = [*queries, *model_ids[:10]]
    encoded = [q.encode("utf-8", "surrogatepass") for q in asked]
    length = np.array([len(e) for e in encoded], np.int64)
    pos = np.zeros(len(encoded), np.int64)
    np.cumsum(length[:-1], out=pos[1:])
    buf = np.frombuffer(b"prefix" + b"".join(encoded), np.uint8)
    rows = table.rows(buf, pos + 6, length)
    assert rows.dtype == np.int32
    assert rows.tolist() == [reference.get(q, -1) for q in asked]


def test_a_large_vocabulary_and_near_misses():
    model_ids = [f"item-{i}" for i in range(50_000)]
    table = ItemTable(model_ids)
    asked = ["item-0", "item-49999", "item-50000", "item-", "item-1234", "Item-1234", "item-12345"]
    encoded = [a.encode() for a in asked]
    length = np.array([len(e) for e in encoded], np.int64)
    pos = np.concatenate([[0], np.cumsum(length[:-1])])
    rows = table.rows(np.frombuffer(b"".join(encoded), np.uint8), pos, length)
    assert rows.tolist() == [0, 49999, -1, -1, 1234, -1, 12345]
