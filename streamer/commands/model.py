"""``foldstream model``: list, show, add, promote and roll back model versions."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from factors.artifacts import load_model
from streamer.commands.stream import add_config_option, config_from_args
from streamer.registry import ModelRegistry
from streamer.retrain import retrain_history, retrain_once


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage model versions (list, show, add, promote, rollback)",
                       description="The model registry: versioned model directories and the "
                       "pointer to the active one.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    def action(name: str, help_: str, run) -> argparse.ArgumentParser:
        a = msub.add_parser(name, help=help_, description=help_)
        add_config_option(a)
        a.add_argument("--registry", type=Path, default=None, help="overrides model.registry_dir")
        a.set_defaults(run=run)
        return a

    action("list", "list versions, marking the active one", cmd_list)
    a = action("show", "print a version's model.json (default: the active version)", cmd_show)
    a.add_argument("version", nargs="?")
    a = action("add", "copy a trained model directory into the registry as a new version", cmd_add)
    a.add_argument("model_dir", type=Path)
    a.add_argument("--promote", action="store_true", help="also make it the active version")
    a = action("promote", "make VERSION the active model", cmd_promote)
    a.add_argument("version")
    action("rollback", "re-activate the previously active version", cmd_rollback)
    action("history", "print the retrain history (one JSON object per attempt)", cmd_history)

    r = sub.add_parser("retrain", help="retrain from the live store behind the quality gate",
                       description="Train a candidate on every stored user history (read from a "
                       "snapshot beside the running consumer), compare it with the active model "
                       "on the most recent events, and promote it only if it is not worse.")
    add_config_option(r)
    r.add_argument("--now", action="store_true", required=True,
                   help="run one retrain now, in this process")
    r.set_defaults(run=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    record = retrain_once(config_from_args(args), trigger="manual")
    print(f"retrain {record.outcome}: {record.reason} ({record.events} events, "
          f"{record.users} users, {record.items} items, {record.seconds:.1f}s)")
    if record.new_version:
        print(f"{record.new_version} is now active")
    return 0 if record.outcome in ("promoted", "rejected", "skipped") else 1


def cmd_history(args: argparse.Namespace) -> int:
    for entry in retrain_history(_registry(args).root):
        print(json.dumps(entry, sort_keys=True))
    return 0


def _registry(args: argparse.Namespace) -> ModelRegistry:
    return ModelRegistry(args.registry or config_from_args(args).model.registry_dir)


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    active = registry.active_version()
    versions = registry.versions()
    if not versions:
        print(f"no model versions in {registry.root}")
        return 0
    for version in versions:
        meta = json.loads((registry.path(version) / "model.json").read_text("utf-8"))
        mark = "*" if version == active else " "
        print(f"{mark} {version}  created {meta.get('created', '?')}  k={meta.get('k')}  "
              f"users={meta.get('n_users')} items={meta.get('n_items')}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    version = args.version or registry.active_version()
    if version is None:
        print(f"no active model in {registry.root}")
        return 1
    meta = json.loads((registry.path(version) / "model.json").read_text("utf-8"))
    meta["version"] = version
    meta["active"] = version == registry.active_version()
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    registry = _registry(args)
    version = registry.add(load_model(args.model_dir))
    print(f"added {args.model_dir} as {version}")
    if args.promote:
        registry.promote(version)
        print(f"{version} is now active")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    registry.promote(args.version)
    print(f"{args.version} is now active ({datetime.now(timezone.utc).isoformat(timespec='seconds')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    version = _registry(args).rollback()
    print(f"rolled back: {version} is now active")
    return 0
