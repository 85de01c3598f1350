"""The offline CLI: the contract other tools rely on."""

import json
import subprocess
import sys

import numpy as np
import pytest

from factors.artifacts import load_model
from streamer.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def test_synth_train_foldin_evaluate(tmp_path, capsys):
    data, model, vectors = tmp_path / "e.csv", tmp_path / "model", tmp_path / "vectors"
    assert run_cli("synth", "--out", data, "--users", 150, "--items", 60, "--events", 3000,
                   "--seed", 2) == 0
    assert run_cli("train", "--interactions", data, "--out", model, "--factors", 8,
                   "--iterations", 15, "--solver", "cholesky") == 0
    art = load_model(model)
    assert art.item_factors.shape[1] == 8 and art.params["solver"] == "cholesky"
    assert art.input_sha256 and len(art.input_sha256) == 64

    assert run_cli("foldin", "--model", model, "--interactions", data, "--out", vectors) == 0
    folded = load_model(vectors)
    assert folded.user_factors.shape == (len(folded.user_ids), 8)
    # Training users folded in from the same events land close to their fitted rows.
    rows = {u: i for i, u in enumerate(art.user_ids)}
    both = [u for u in folded.user_ids if u in rows]
    fitted = art.user_factors[[rows[u] for u in both]]
    again = folded.user_factors[[folded.user_ids.index(u) for u in both]]
    assert np.linalg.norm(fitted - again) / np.linalg.norm(fitted) < 0.05

    capsys.readouterr()
    assert run_cli("evaluate", "--interactions", data, "--cutoff", 0.8, "--k", 5, "--json",
                   "--factors", 8, "--iterations", 3) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert metrics["k"] == 5 and "ndcg" in metrics and "recall" in metrics


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,weight\nu1,i1,1\nu2,i2,-5\n")
    assert run_cli("train", "--interactions", bad, "--out", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "bad.csv:3" in err and "Traceback" not in err
    assert run_cli("train", "--interactions", tmp_path / "missing.csv", "--out", tmp_path / "m") == 2
    assert "missing.csv" in capsys.readouterr().err
    assert run_cli("train", "--interactions", bad, "--out", tmp_path / "m", "--skip-bad",
                   "--factors", 4, "--iterations", 1) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().err
    assert run_cli("train", "--interactions", bad, "--out", tmp_path / "m", "--factors", 0) == 2
    assert "factors must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["demo"], ["run"], ["produce"],
                                     ["broker"], ["vectors", "get"], ["synth"], ["foldin"],
                                     ["model", "list"], ["model", "promote"], ["warmup"]])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "streamer.cli", *command, "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: foldstream" in out.stdout


def test_model_commands(tmp_path, capsys):
    data, model = tmp_path / "e.csv", tmp_path / "m"
    run_cli("synth", "--out", data, "--users", 50, "--items", 20, "--events", 500)
    run_cli("train", "--interactions", data, "--out", model, "--factors", 4, "--iterations", 2)
    reg = tmp_path / "models"
    assert run_cli("model", "add", model, "--registry", reg, "--promote") == 0
    assert run_cli("model", "add", model, "--registry", reg) == 0
    assert run_cli("model", "promote", "v000002", "--registry", reg) == 0
    capsys.readouterr()
    assert run_cli("model", "list", "--registry", reg) == 0
    listing = capsys.readouterr().out
    assert "* v000002" in listing and "  v000001" in listing
    assert run_cli("model", "rollback", "--registry", reg) == 0
    capsys.readouterr()
    assert run_cli("model", "show", "--registry", reg) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v000001" and shown["active"] and shown["k"] == 4
    assert run_cli("model", "promote", "v000009", "--registry", reg) == 2
    assert "v000009 not found" in capsys.readouterr().err


def test_run_stopped_while_starting_exits_0_without_joining(make_app_config, tmp_path, monkeypatch,
                                                            capsys):
    # SIGTERM lands while the topics are checked: the command ends before the consumer exists.
    import os
    import signal

    from streamer.commands import stream
    from streamer.service import FoldService
    from tests.streamer.conftest import write_config

    path = write_config(make_app_config(partitions=1), tmp_path / "fs.toml")
    monkeypatch.setattr(stream, "ensure_topics", lambda _k: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(FoldService, "start", lambda self: pytest.fail("joined the group"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["run", "--config", str(path), "--quiet"]) == 0
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert "stopped before start" in capsys.readouterr().out
