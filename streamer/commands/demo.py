"""``foldstream demo``: the main job end to end on the embedded broker."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from streamer.commands.offline import add_training_options, params_from_args
from streamer.demo import DemoParams, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoParams()
    p = sub.add_parser(
        "demo", help="run the whole pipeline locally (embedded broker, RocksDB in ./demo-run)",
        description="Synthesise (or read) interactions, train the first model, start the "
        "embedded broker, replay every event through the consumer, and print a summary.")
    p.add_argument("--workdir", type=Path, default=d.workdir, help=f"default {d.workdir}")
    p.add_argument("--interactions", type=Path, default=None,
                   help="CSV to replay instead of synthetic data (needs timestamps)")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--events", type=int, default=d.events)
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="share of the time-ordered events the first model is trained on")
    p.add_argument("--partitions", type=int, default=d.partitions)
    p.add_argument("--rate", type=float, default=None, help="replay rate, events/s (default: max)")
    add_training_options(p)
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # kafka-python warns when a client task runs > 100 ms, which the demo's two clients in
    # one busy process do routinely; the summary reports what matters.
    logging.getLogger("kafka").setLevel(logging.ERROR)
    params = DemoParams(workdir=args.workdir, interactions=args.interactions, users=args.users,
                        items=args.items, events=args.events, seed=args.seed,
                        train_fraction=args.train_fraction, partitions=args.partitions,
                        rate=args.rate)
    run_demo(params, params_from_args(args))
    return 0
