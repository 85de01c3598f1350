"""compile_kernels: the consumer's whole kernel path, on nothing but a scratch directory."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numba

from streamer import warmup
from streamer.config import ProcessingConfig
from streamer.model import LoadedModel
from streamer.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
# The kernels of a consumer's every turn: record batches, decode, histories, fold-in.
HOT = ("streamer.record_batches._scan", "streamer.event_kernels._scan",
       "streamer.history_kernels.merge_new_events", "streamer.history_kernels._parse",
       "streamer.history_kernels._encode", "factors.gram_cache.solve_rows_cached",
       "factors.kernels.solve_rows_exact_serial", "factors.kernels.sum_rows_by_item",
       # a large batch's (more than SERIAL_MAX_ROWS users): on numba's thread pool
       "factors.gram_cache.solve_rows_cached_parallel", "factors.kernels.solve_rows_exact")


def _consumer_kernels() -> dict:
    """Every numba dispatcher of the streamer's and the fold-in's modules, by name."""
    import factors.gram_cache
    import factors.kernels
    import streamer.event_kernels
    import streamer.history_kernels
    import streamer.item_table
    import streamer.record_batches

    out = {}
    for module in (factors.gram_cache, factors.kernels, streamer.event_kernels,
                   streamer.history_kernels, streamer.item_table, streamer.record_batches):
        for name, value in vars(module).items():
            if isinstance(value, numba.core.registry.CPUDispatcher):
                out[f"{module.__name__}.{name}"] = value
    return out


def test_compiling_runs_the_gram_cache_and_leaves_no_scratch_state(trained_registry, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = LoadedModel(ModelRegistry(trained_registry).load())
    seen: list = []
    original = warmup.PartitionProcessor.apply

    def spy(self, store, decoded, outcome, model, **kw):
        result = original(self, store, decoded, outcome, model, **kw)
        grams = self.gram_cache(store)
        seen.append((result, None if grams is None else (grams.hits, grams.misses)))
        return result

    monkeypatch.setattr(warmup.PartitionProcessor, "apply", spy)
    assert warmup.compile_kernels(model, ProcessingConfig()) >= 0
    assert list(tmp_path.iterdir()) == []  # the scratch store is gone
    outcomes = [o for o, _ in seen]
    assert len(outcomes) == 5
    assert [len(o.rejected) for o in outcomes] == [0, 0, 0, 1, 0]
    assert outcomes[2].duplicates == 1  # a re-sent event id: the dedupe path
    hits, misses = seen[-1][1]
    assert misses >= 1 and hits >= 1  # the long history was cached, then updated


def test_after_compiling_the_hot_kernels_have_their_signatures(trained_registry):
    """In a fresh interpreter (in this one, earlier tests have run the kernels already)."""
    script = textwrap.dedent(f"""
        import sys
        from streamer.config import ProcessingConfig
        from streamer.model import LoadedModel
        from streamer.registry import ModelRegistry
        from streamer.warmup import compile_kernels
        from tests.streamer.test_warmup import HOT, _consumer_kernels

        before = {{n for n, k in _consumer_kernels().items() if k.signatures}}
        assert not before & set(HOT), before & set(HOT)
        compile_kernels(LoadedModel(ModelRegistry({str(trained_registry)!r}).load()), ProcessingConfig())
        missing = [n for n in HOT if not _consumer_kernels()[n].signatures]
        assert not missing, missing
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_compile_kernels_once_runs_once_per_process(trained_registry, monkeypatch):
    calls = []
    monkeypatch.setattr(warmup, "_compiled", False)  # restored after the test
    monkeypatch.setattr(warmup, "compile_kernels", lambda model, config: calls.append(1) or 0.5)
    model = LoadedModel(ModelRegistry(trained_registry).load())
    assert warmup.compile_kernels_once(model, ProcessingConfig()) == 0.5
    assert warmup.compile_kernels_once(model, ProcessingConfig()) is None
    assert calls == [1]

