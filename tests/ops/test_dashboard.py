"""A real Prometheus scrapes a running consumer, and every PromQL expression in the dashboard
JSON returns data from it (and every alert rule evaluates without error)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streamer.metrics import Metrics
from tests.ops.conftest import ALERTS, PrometheusProcess, dashboard_exprs, free_port, load_dashboard
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess

# Grafana fills in its variables before a query reaches Prometheus; the test stands in for it.
# $__rate_interval: Grafana uses max(4 x scrape interval, step + scrape interval); at the
# test's 1 s scrapes 10 s holds about ten samples. $instance: the variable's "All" value.
RATE_INTERVAL = "10s"
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

# Records that the consumer must dead-letter, one per reason we can produce from outside.
MALFORMED = [
    (b"bad-json", b"not json"),
    (b"bad-array", b"[1, 2]"),
    (b"bad-missing", b'{"user": "bad-missing"}'),
    (b"bad-utf8", b"\xff\xfe"),
    (None, b'{"user": "no-key", "item": "i1"}'),
]


def grafana_values(dashboard: dict) -> dict[str, str]:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"instance"}, \
        f"dashboard variables {sorted(variables)}: decide here what the test substitutes for each"
    return {"__rate_interval": RATE_INTERVAL, "instance": variables["instance"]["allValue"]}


def render(expr: str, values: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        assert name in values, f"unhandled Grafana variable ${name} in {expr}"
        return values[name]
    return VARIABLE.sub(substitute, expr)


def assert_every_dashboard_query_returns_data(prometheus: PrometheusProcess) -> None:
    dashboard = load_dashboard()
    values = grafana_values(dashboard)
    empty = []
    for title, expr in dashboard_exprs(dashboard):
        if not prometheus.query(render(expr, values)):
            empty.append(f"  {title}: {expr}")
    scraped = sorted(n for n in prometheus.api("label/__name__/values") if n.startswith("foldstream_"))
    assert not empty, ("dashboard queries that return no series:\n" + "\n".join(empty)
                       + f"\nfoldstream series Prometheus has: {scraped}")


def assert_every_rule_evaluates(prometheus: PrometheusProcess) -> None:
    def rules():
        return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    prometheus.wait_for(lambda p: all(r["health"] != "unknown" for r in rules()), 10,
                        "every rule evaluated once")
    broken = [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"]
    assert not broken, broken


def wait_for(predicate, timeout_s: float, what: str, consumer: ConsumerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if consumer.proc.poll() is not None:
            raise AssertionError(f"consumer exited ({consumer.proc.returncode}) while waiting for "
                                 f"{what}; log:\n{consumer.text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; consumer log:\n"
                                 f"{consumer.text()[-4000:]}")
        time.sleep(0.1)


def serves_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            return resp.status == 200 and b"foldstream_interactions_consumed_total" in resp.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_every_dashboard_query_returns_data_from_a_running_consumer(
        make_app_config, make_kafka_producer, make_prometheus, synthetic_log, tmp_path):
    port = free_port()
    config = make_app_config(partitions=2, processing={"batch_max_records": 200, "batch_max_ms": 10},
                             metrics={"host": "127.0.0.1", "port": port})
    config_path = write_config(config, tmp_path / "fs.toml")
    prometheus = make_prometheus([f"127.0.0.1:{port}"], rule_files=[ALERTS])
    consumer = ConsumerProcess(config_path, tmp_path / "consumer.log")
    try:
        wait_for(lambda: serves_metrics(port), 30,
                 f"the consumer's metrics endpoint on 127.0.0.1:{port} (metrics.port)", consumer)
        # The later, drifted part of the log (new items and users), a few re-sent event ids,
        # malformed records and one tombstone.
        events = stream_events(synthetic_log, 3000, 2000)
        producer = make_kafka_producer()
        send_all(producer, config.kafka.input_topic, events + events[:10])
        for key, value in MALFORMED + [(events[0]["user"].encode(), None)]:
            producer.send(config.kafka.input_topic, key=key, value=value)
        producer.flush()
        records = len(events) + 10 + len(MALFORMED) + 1

        consumed = "sum(foldstream_interactions_consumed_total)"
        wait_for(lambda: (prometheus.value(consumed) or 0) >= records, 60,
                 f"Prometheus to see {records} records consumed", consumer)
        # Enough scrapes after the last record for every [10s] window to hold several samples.
        scrapes = f"min(count_over_time(foldstream_interactions_consumed_total[{RATE_INTERVAL}]))"
        wait_for(lambda: (prometheus.value(scrapes) or 0) >= 5, 15, "five scrapes in the last 10 s",
                 consumer)

        assert prometheus.value(consumed) == records
        assert prometheus.value("sum(foldstream_interactions_dead_lettered_total)") == len(MALFORMED)
        assert_every_dashboard_query_returns_data(prometheus)
        assert_every_rule_evaluates(prometheus)
    finally:
        code = consumer.terminate()
    assert code == 0, consumer.text()[-4000:]


def touch_every_metric(metrics: Metrics) -> None:
    """Give every metric a sample: one child per labelled metric, one observation per histogram."""
    for metric in vars(metrics).values():
        if not isinstance(metric, (Counter, Gauge, Histogram)):
            continue
        labelnames = metric._labelnames  # prometheus_client keeps no public accessor
        child = metric.labels(*["test"] * len(labelnames)) if labelnames else metric
        if isinstance(metric, Counter):
            child.inc()
        elif isinstance(metric, Gauge):
            child.set(time.time() if "timestamp" in metric._name else 0.5)
        else:
            child.observe(0.1)


def test_every_dashboard_query_evaluates_on_a_scraped_metrics_registry(make_prometheus):
    # Independent of the consumer's wiring: the same Metrics class, every series present.
    metrics = Metrics(CollectorRegistry())
    touch_every_metric(metrics)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        prometheus = make_prometheus([f"127.0.0.1:{server.server_port}"], rule_files=[ALERTS])
        prometheus.wait_for(
            lambda p: (p.value('count_over_time(up{job="foldstream"}[10s])') or 0) >= 3, 20,
            "three scrapes")
        assert_every_dashboard_query_returns_data(prometheus)
        assert_every_rule_evaluates(prometheus)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
