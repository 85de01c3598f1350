from pathlib import Path

import pytest

from streamer.config import AppConfig, load_config
from streamer.errors import ConfigError


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == AppConfig()
    assert cfg.kafka.input_topic == "interactions"


def test_toml_then_environment_overrides(tmp_path):
    path = tmp_path / "fs.toml"
    path.write_text(
        '[kafka]\nbootstrap_servers = "k:9092"\ngroup_id = "g1"\n'
        '[processing]\nhistory_cap = 50\nevent_weights = { view = 1.0, buy = 7.5 }\n'
        '[store]\nstate_dir = "/var/lib/fs"\n'
    )
    cfg = load_config(path, env={
        "FOLDSTREAM_KAFKA__GROUP_ID": "g2",
        "FOLDSTREAM_PROCESSING__BATCH_MAX_MS": "20",
        "FOLDSTREAM_STORE__SYNC_WRITES": "true",
        "FOLDSTREAM_PROCESSING__EVENT_WEIGHTS": '{"like": 2}',
        "OTHER": "ignored",
    })
    assert cfg.kafka.bootstrap_servers == "k:9092"
    assert cfg.kafka.group_id == "g2"
    assert cfg.processing.history_cap == 50
    assert cfg.processing.batch_max_ms == 20
    assert cfg.processing.event_weights == {"like": 2}
    assert cfg.store.state_dir == Path("/var/lib/fs")
    assert cfg.store.sync_writes is True


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FOLDSTREAM_PROCESSING__BATCH_MAX_RECORDS": "0"}, "batch_max_records must be >= 1, got 0"),
        ({"FOLDSTREAM_PROCESSING__BATCH_MAX_RECORDS": "many"}, "must be int, got 'many'"),
        ({"FOLDSTREAM_KAFKA__NOPE": "1"}, "unknown option(s) kafka.nope"),
        ({"FOLDSTREAM_KAFKA": "1"}, "SECTION__KEY"),
        ({"FOLDSTREAM_STORE__SYNC_WRITES": "maybe"}, "must be a boolean"),
        ({"FOLDSTREAM_METRICS__PORT": "70000"}, "metrics.port must be in 0..65535, got 70000"),
        ({"FOLDSTREAM_PROCESSING__EVENT_WEIGHTS": '{"view": -1}'}, "event_weights['view']"),
    ],
)
def test_invalid_values_are_clear_errors(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert message in str(err.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    typed = tmp_path / "typed.toml"
    typed.write_text("[processing]\nhistory_cap = \"ten\"\n")
    with pytest.raises(ConfigError, match="processing.history_cap must be an integer"):
        load_config(typed)


def test_replace_keeps_validation():
    cfg = AppConfig().replace(kafka={"group_id": "x"})
    assert cfg.kafka.group_id == "x"
    with pytest.raises(ConfigError):
        AppConfig().replace(processing={"history_cap": 0})
