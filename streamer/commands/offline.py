"""Offline commands: ``synth``, ``train``, ``foldin``, ``evaluate``.

They read and write files only (no broker, no state store) and are thin wrappers
around :mod:`factors.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from factors.artifacts import ModelArtifact, load_model, save_model, sha256_file
from factors.data import CsvColumns, Interactions, read_interactions, write_interactions
from factors.pipeline import SOLVERS, TrainParams, evaluate, fold_in_users, train
from factors.synth import SynthParams, generate
from streamer.progress import ProgressLine


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic interaction log (CSV)",
                       description="Write a deterministic synthetic interaction log: power-law "
                       "popularity and activity, drifting tastes, new items over time.")
    p.add_argument("--out", required=True, type=Path, help="CSV file to write")
    defaults = SynthParams()
    p.add_argument("--users", type=int, default=defaults.users)
    p.add_argument("--items", type=int, default=defaults.items)
    p.add_argument("--events", type=int, default=defaults.events)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("train", help="train an implicit-ALS model from a CSV",
                       description="Train implicit ALS (Hu, Koren & Volinsky) on every event "
                       "of a CSV and write a model directory.")
    add_input_options(p)
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    add_training_options(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("foldin", help="compute user vectors against a trained model",
                       description="Fold every user of a CSV into a trained model's item "
                       "factors (exact single-row ALS solve from that user's history in the CSV).")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    add_input_options(p)
    p.add_argument("--out", required=True, type=Path,
                   help="directory for user_factors.npy, user_ids.json and foldin.json")
    p.set_defaults(run=cmd_foldin)

    p = sub.add_parser("evaluate", help="temporal-split evaluation (batch or prequential)",
                       description="Train on the events before a time cutoff and score the rest.")
    add_input_options(p)
    p.add_argument("--cutoff", type=float, default=0.8,
                   help="fraction of the time-ordered events used for training (default 0.8)")
    p.add_argument("--k", type=int, default=10, help="cut-off rank (default 10)")
    p.add_argument("--mode", choices=("batch", "prequential"), default="batch")
    p.add_argument("--json", action="store_true", help="end with one JSON line of all metrics")
    add_training_options(p)
    p.set_defaults(run=cmd_evaluate)


def add_input_options(p: argparse.ArgumentParser) -> None:
    c = CsvColumns()
    p.add_argument("--interactions", required=True, type=Path, help="CSV with a header row")
    p.add_argument("--user-col", default=c.user, help=f"user id column (default {c.user})")
    p.add_argument("--item-col", default=c.item, help=f"item id column (default {c.item})")
    p.add_argument("--ts-col", default=c.ts, help=f"timestamp column (default {c.ts})")
    p.add_argument("--weight-col", default=c.weight, help=f"weight column (default {c.weight})")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed rows (and report how many) instead of failing")


def add_training_options(p: argparse.ArgumentParser) -> None:
    d = TrainParams()
    g = p.add_argument_group("training")
    g.add_argument("--factors", type=int, default=d.factors)
    g.add_argument("--regularization", type=float, default=d.regularization)
    g.add_argument("--alpha", type=float, default=d.alpha, help="confidence c = 1 + alpha * f(r)")
    g.add_argument("--scaling", choices=("identity", "log"), default=d.scaling,
                   help="f(r) = r, or log1p(r / epsilon)")
    g.add_argument("--epsilon", type=float, default=d.epsilon)
    g.add_argument("--half-life", type=float, default=None, metavar="SECONDS",
                   help="exponential time decay of event weights")
    g.add_argument("--iterations", type=int, default=d.iterations)
    g.add_argument("--solver", choices=SOLVERS, default=d.solver)
    g.add_argument("--cg-steps", type=int, default=d.cg_steps)
    g.add_argument("--threads", type=int, default=d.threads, help="0 = all cores")
    g.add_argument("--seed", type=int, default=d.seed)


def params_from_args(args: argparse.Namespace) -> TrainParams:
    return TrainParams(
        factors=args.factors, regularization=args.regularization, alpha=args.alpha,
        scaling=args.scaling, epsilon=args.epsilon, half_life_seconds=args.half_life,
        iterations=args.iterations, solver=args.solver, cg_steps=args.cg_steps,
        seed=args.seed, threads=args.threads,
    )


def load_input(args: argparse.Namespace) -> Interactions:
    columns = CsvColumns(user=args.user_col, item=args.item_col, ts=args.ts_col,
                         weight=args.weight_col)
    inter, report = read_interactions(args.interactions, columns=columns, skip_bad=args.skip_bad)
    if report.skipped:
        print(f"skipped {report.skipped} bad rows of {report.rows} in {args.interactions}",
              file=sys.stderr)
        for message in report.errors:
            print(f"  {message}", file=sys.stderr)
    return inter


def iteration_progress(params: TrainParams, label: str = "train") -> tuple[ProgressLine, object]:
    bar = ProgressLine(label, total=params.iterations)

    def callback(iteration: int, loss: float, seconds: float) -> None:
        bar.update(iteration + 1, f"loss={loss:.5g} {seconds:.2f}s/it")

    return bar, callback


def cmd_synth(args: argparse.Namespace) -> int:
    params = SynthParams(users=args.users, items=args.items, events=args.events, seed=args.seed)
    inter = generate(params)
    write_interactions(args.out, inter)
    print(f"wrote {len(inter)} events, {len(inter.user_ids)} users, "
          f"{len(inter.item_ids)} items to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    inter = load_input(args)
    bar, callback = iteration_progress(params)
    result = train(inter, params, callback=callback)
    bar.close()
    path = save_model(args.out, result.artifact(inter, sha256_file(args.interactions)),
                      overwrite=args.overwrite)
    m = result.metrics
    print(f"trained {m['users']} users x {m['items']} items ({m['nnz']} pairs, "
          f"{m['events']} events) in {m['train_seconds']:.2f}s; loss {m['train_loss']:.5g}; "
          f"model written to {path}")
    return 0


def cmd_foldin(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    params = TrainParams.from_dict(model.params)
    inter = load_input(args)
    vectors, unknown = fold_in_users(model.item_factors, model.item_ids, params, inter)
    out = ModelArtifact(
        item_factors=model.item_factors, user_factors=vectors,
        item_ids=model.item_ids, user_ids=list(inter.user_ids.ids),
        params=model.params, metrics={"unknown_item_events": int(unknown.sum())},
        input_sha256=sha256_file(args.interactions),
    )
    save_model(args.out, out, overwrite=True)
    print(f"folded in {len(vectors)} users from {len(inter)} events "
          f"({int(unknown.sum())} events on items unknown to the model); wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    inter = load_input(args)
    bar, callback = iteration_progress(params)
    metrics = evaluate(inter, params, cutoff=args.cutoff, k=args.k, mode=args.mode,
                       callback=callback)
    bar.close()
    for line in format_metrics(metrics):
        print(line)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    return 0


def format_metrics(metrics: dict, prefix: str = "") -> list[str]:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines.extend(format_metrics(value, prefix=f"{prefix}{key}."))
        elif isinstance(value, float):
            lines.append(f"{prefix}{key:<24} {value:.4f}")
        else:
            lines.append(f"{prefix}{key:<24} {value}")
    return lines
