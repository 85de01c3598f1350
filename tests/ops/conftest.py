"""A real Prometheus (the Debian package's binary) for the ops tests, and the ops files' parsers.

``make_prometheus(targets)`` starts ``prometheus`` on a free loopback port with a temporary
config that scrapes ``targets`` (``["host:port", ...]``) every second as job ``foldstream``,
storage under ``tmp_path``; it returns once ``/-/ready`` answers and stops the process at
teardown. ``ops/install-prometheus.sh`` installs the binary.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from streamer.metrics import Metrics
from tests.paths import REPO
# The consumer fixtures (a trained model registry, app configs on the test broker).
from tests.streamer.conftest import make_app_config, synthetic_log, trained_registry  # noqa: F401

OPS = REPO / "ops"
PROMETHEUS_DIR = OPS / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DATASOURCE = OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "foldstream.json"
RUNBOOK = OPS / "RUNBOOK.md"

INSTALL_HINT = "install it with `bash ops/install-prometheus.sh` (Debian package prometheus)"
SCRAPE_JOB = "foldstream"
METRIC_NAME = re.compile(r"foldstream_[a-z0-9_]+")


def binary(name: str) -> str:
    """Path of ``prometheus``/``promtool``; fails the test (no skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusProcess:
    """One ``prometheus`` server process; ``query(expr)`` evaluates PromQL at the current time."""

    def __init__(self, workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = (),
                 scrape_interval_s: int = 1) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True)
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config_path.write_text(scrape_config(targets, rule_files, scrape_interval_s))
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> "PrometheusProcess":
        exe = binary("prometheus")
        for _ in range(attempts):  # the free port may be taken between choosing and binding it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [exe, f"--config.file={self.config_path}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(timeout_s):
                return self
            self.stop()
        raise AssertionError(f"prometheus did not become ready; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        return False

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise with the server's error text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The series ``expr`` returns now: ``[{"metric": {...}, "value": [ts, "v"]}, ...]``."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a single-series ``expr`` now, or None while it returns nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, predicate: Callable[["PrometheusProcess"], bool], timeout_s: float,
                 what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; "
                                     f"targets: {self.api('targets')['activeTargets']}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def scrape_config(targets: Sequence[str], rule_files: Sequence[Path], interval_s: int) -> str:
    """A Prometheus config (JSON is valid YAML) scraping ``targets`` as job ``foldstream``."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": f"{interval_s}s", "scrape_timeout": f"{interval_s}s",
                   "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [],
    }
    if targets:
        config["scrape_configs"].append(
            {"job_name": SCRAPE_JOB, "static_configs": [{"targets": list(targets)}]})
    return json.dumps(config, indent=2)


@pytest.fixture
def make_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusProcess]]:
    """``make_prometheus(targets, rule_files=())`` -> a ready :class:`PrometheusProcess`."""
    started: list[PrometheusProcess] = []

    def make(targets: Sequence[str], rule_files: Sequence[Path] = ()) -> PrometheusProcess:
        prometheus = PrometheusProcess(tmp_path / f"prometheus-{len(started)}", targets, rule_files)
        started.append(prometheus)
        return prometheus.start()
    yield make
    for prometheus in started:
        prometheus.stop()


# --- The ops files -----------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def pinned_datasource_uid() -> str:
    """The uid the provisioned datasource pins (read without a YAML parser: one datasource)."""
    uids = re.findall(r"^\s*uid:\s*(\S+)\s*$", DATASOURCE.read_text(), re.MULTILINE)
    assert len(uids) == 1, f"expected one datasource uid in {DATASOURCE}, got {uids}"
    return uids[0]


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query target of every panel."""
    return [(panel["title"], target["expr"])
            for panel in dashboard_panels(dashboard) for target in panel.get("targets", [])]


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_samples(metrics: Metrics) -> dict[str, set[str]]:
    """Metric name (as in streamer/metrics.py, counters with ``_total``) -> the sample names it
    can expose, whether or not a labelled child exists yet."""
    out = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return out


def exported_names(metrics: Metrics) -> set[str]:
    return set().union(*exported_samples(metrics).values())


def referenced_names(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))
