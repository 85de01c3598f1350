"""The fault tests use the streaming fixtures: a trained registry and app configs on the test broker."""

from tests.streamer.conftest import make_app_config, synthetic_log, trained_registry  # noqa: F401
