"""``foldstream demo`` end to end (the README's main-job command), at a small size."""

from __future__ import annotations

import io
import json

import numpy as np

from factors.evaluate import temporal_split
from factors.synth import SynthParams, generate
from streamer.demo import MALFORMED, DemoParams, run_demo
from tests.streamer.conftest import TEST_PARAMS


def test_the_demo_applies_every_event_once_and_its_vectors_match_the_offline_fold_in(tmp_path):
    # Replayed at a rate the consumer outpaces, so that users are folded again and again.
    params = DemoParams(workdir=tmp_path / "demo", users=400, items=150, events=8000, partitions=2,
                        rate=2000.0, verify_sample=400, prequential_sample=1000)
    out = io.StringIO()
    summary = run_demo(params, TEST_PARAMS, out=out)

    assert summary["records_consumed"] == params.events + len(MALFORMED)
    assert summary["events_applied"] == params.events  # every event id is distinct
    assert summary["dead_lettered"] == len(MALFORMED)
    assert summary["verified_users"] > 300 and summary["verify_max_abs_diff"] < 1e-5
    # Counted once per event on an item the first model never saw (the replay holds the
    # whole log, the model the items of its first half), whatever the batching.
    log = generate(SynthParams(users=params.users, items=params.items, events=params.events,
                               seed=params.seed, activity_exponent=0.8))
    train_part, _ = temporal_split(log, params.train_fraction)
    known = {train_part.item_ids.id_of(int(i)) for i in np.unique(train_part.items)}
    unknown = sum(log.item_ids.id_of(int(i)) not in known for i in log.items.tolist())
    assert unknown > 0 and summary["unknown_item_events"] == unknown
    assert json.loads((params.workdir / "summary.json").read_text()) == summary
    assert "[5/5] summary" in out.getvalue()
