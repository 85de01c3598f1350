"""Streaming commands: ``broker``, ``produce``, ``run``, ``verify``, ``vectors get``, ``warmup``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from factors.data import read_interactions
from streamer.broker import serve_forever
from streamer.config import AppConfig, load_config
from prometheus_client import start_http_server

from streamer.kafka_io import make_producer
from streamer.metrics import Metrics
from streamer.monitor import ServiceMonitor
from streamer.observer import ServiceObserver
from streamer.progress import ProgressLine
from streamer.publisher import vector_message
from streamer.reader import StoreReader
from streamer.replay import event_messages, log_fingerprint, produce
from streamer.scheduler import RetrainScheduler
from streamer.service import FoldService
from streamer.topics import ensure_topics
from streamer.verify import CsvSource, verify


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (development)",
                       description="Run a local Tansu broker (in-memory storage) until Ctrl-C.")
    p.add_argument("--port", type=int, default=9092, help="listen port (default 9092; 0 = any)")
    p.add_argument("--log-dir", type=Path, default=Path("broker-logs"))
    p.set_defaults(run=cmd_broker)

    p = sub.add_parser("produce", help="replay a CSV of interactions into the input topic",
                       description="Send every event of a CSV, in time order, keyed by user.")
    add_config_option(p)
    p.add_argument("--interactions", required=True, type=Path)
    p.add_argument("--rate", type=float, default=None, help="events per second (default: max)")
    p.add_argument("--no-event-ids", action="store_true",
                   help="send events without event_id (re-sending then applies them again)")
    p.set_defaults(run=cmd_produce)

    p = sub.add_parser("run", help="run the consumer service",
                       description="Consume interactions, fold them into user vectors, store "
                       "and publish them, until SIGTERM/SIGINT.")
    add_config_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("verify", help="audit the store and output topic against the input topic",
                       description="Re-read the input topic (or the CSV given to produce), "
                       "recompute every user's history and vector, compare with the state store "
                       "and the newest message per user on the output topic. Exit status 1 on "
                       "any mismatch. Safe while consumers run.")
    add_config_option(p)
    p.add_argument("--interactions", type=Path, default=None, metavar="CSV",
                   help="audit against this CSV instead of the input topic: rows are "
                   "partitioned as produce sends them and all count as applied")
    p.add_argument("--no-event-ids", action="store_true",
                   help="with --interactions: the CSV was produced with --no-event-ids")
    p.add_argument("--no-output", action="store_true", help="skip the output-topic comparison")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the report")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("vectors", help="read stored user vectors",
                       description="Read vectors from the state store (safe while the consumer runs).")
    vsub = p.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)
    g = vsub.add_parser("get", help="print one user's vector as JSON (the published format)")
    add_config_option(g)
    g.add_argument("user")
    g.add_argument("--state-dir", type=Path, default=None, help="overrides store.state_dir")
    g.set_defaults(run=cmd_vectors_get)

    p = sub.add_parser("warmup", help="compile the consumer's numba kernels into numba's cache",
                       description="Run the consumer's kernel path once on synthetic events "
                       "against a model, in a scratch store, so that numba's cache "
                       "(NUMBA_CACHE_DIR) holds the compiled kernels and `foldstream run` starts "
                       "without compiling them (about a minute on 2 cores). The kernels depend on "
                       "the model's data types, not its size: any trained model fills the cache "
                       "for every other (an image build uses a tiny one).")
    p.add_argument("--model", required=True, type=Path, help="model directory (from `foldstream train`)")
    p.set_defaults(run=cmd_warmup)

def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file; FOLDSTREAM_SECTION__KEY variables override it")


def config_from_args(args: argparse.Namespace) -> AppConfig:
    return load_config(args.config, env=os.environ)


def cmd_broker(args: argparse.Namespace) -> int:
    def ready(broker) -> None:
        print(f"broker ready on {broker.bootstrap} (in-memory; Ctrl-C stops it)", flush=True)
    serve_forever(args.port or None, args.log_dir, on_ready=ready)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    inter, report = read_interactions(args.interactions)
    ensure_topics(config.kafka)
    producer = make_producer(config.kafka.bootstrap_servers)
    bar = ProgressLine("produce", total=len(inter))
    prefix = None if args.no_event_ids else log_fingerprint(inter)
    try:
        sent = produce(producer, config.kafka.input_topic, event_messages(inter, prefix),
                       rate=args.rate, on_progress=bar.update)
    finally:
        bar.close()
        producer.close()
    print(f"sent {sent} events to {config.kafka.input_topic} on {config.kafka.bootstrap_servers}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Stop signals are honoured from here on: one that arrives while topics are checked and
    # the model loads ends the command with exit 0 before it joins the group.
    service: FoldService | None = None
    stop_requested = False

    def request_stop(signum, _frame) -> None:
        nonlocal stop_requested
        stop_requested = True
        if service is not None:
            service.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    ensure_topics(config.kafka)
    bar = ProgressLine("run", stream=sys.stderr)
    metrics = Metrics()
    observer = ServiceObserver(metrics)
    if config.metrics.port:
        start_http_server(config.metrics.port, addr=config.metrics.host, registry=metrics.registry)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics",
                                         config.metrics.host, config.metrics.port)
    monitor = ServiceMonitor(observer)
    scheduler = RetrainScheduler(config, observer)  # [retrain] triggers; retrain metrics

    def on_batch(service: FoldService, outcomes) -> None:
        monitor.after_batch(service, outcomes)
        scheduler.tick()
        if not args.quiet:
            s = service.stats
            bar.update(s.applied, f"applied; published={s.published} "
                       f"dead-lettered={s.dead_lettered} partitions={len(service.stores)}")

    service = FoldService(config, on_batch=on_batch)
    monitor.model_loaded(service)
    if stop_requested:
        scheduler.close()
        print("stopped before start: applied 0, published 0, dead-lettered 0")
        return 0
    logging.getLogger(__name__).info("consumer %d starting; SIGTERM/SIGINT finish the batch, "
                                     "commit and exit", os.getpid())
    try:
        stats = service.run()
    finally:
        scheduler.close()
    bar.close()
    print(f"stopped: applied {stats.applied}, published {stats.published}, "
          f"dead-lettered {stats.dead_lettered}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.no_event_ids and args.interactions is None:
        print("foldstream verify: --no-event-ids needs --interactions", file=sys.stderr)
        return 2
    source = None if args.interactions is None else CsvSource(args.interactions,
                                                               event_ids=not args.no_event_ids)
    report = verify(config_from_args(args), check_output=not args.no_output, source=source)
    for line in report.lines():
        print(line)
    if args.json:
        print(json.dumps(report.summary(), sort_keys=True))
    return 0 if report.ok else 1


def cmd_vectors_get(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    state_dir = args.state_dir or config.store.state_dir
    with StoreReader(state_dir, topic=config.kafka.input_topic) as reader:
        record = reader.get_vector(args.user)
    if record is None:
        print(f"foldstream vectors get: no vector for user {args.user!r} in {state_dir}",
              file=sys.stderr)
        return 1
    print(vector_message(args.user, record).decode("utf-8"))
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from factors.artifacts import load_model
    from streamer.config import ProcessingConfig
    from streamer.model import LoadedModel
    from streamer.registry import ActiveModel
    from streamer.warmup import compile_kernels

    model = LoadedModel(ActiveModel(args.model.name, load_model(args.model), args.model))
    seconds = compile_kernels(model, ProcessingConfig())
    print(f"consumer kernels compiled or loaded from numba's cache in {seconds:.1f}s")
    return 0
