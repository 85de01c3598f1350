"""The synthetic event files the streaming benchmarks hand to their producer processes.

``build`` steps write ``events.npz`` (users, items, weights, timestamps as index columns)
beside ``events.ids.json`` (the id strings); producers read a slice back as
:class:`factors.data.Interactions`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from factors.data import IdIndex, Interactions


def load_events(path: Path, rows: slice = slice(None)) -> Interactions:
    """Rows ``rows`` of the events written at ``path`` (``.npz`` plus ``.ids.json``)."""
    data = np.load(path)
    ids = json.loads(Path(path).with_suffix(".ids.json").read_text())
    return Interactions(users=data["users"][rows], items=data["items"][rows],
                        weights=data["weights"][rows], timestamps=data["timestamps"][rows],
                        user_ids=IdIndex.from_ids(ids["users"]),
                        item_ids=IdIndex.from_ids(ids["items"]))


def save_events(path: Path, inter: Interactions) -> Path:
    """Write ``inter`` for :func:`load_events`; returns ``path``."""
    np.savez(path, users=inter.users, items=inter.items, weights=inter.weights,
             timestamps=inter.timestamps)
    Path(path).with_suffix(".ids.json").write_text(
        json.dumps({"users": inter.user_ids.ids, "items": inter.item_ids.ids}))
    return path
