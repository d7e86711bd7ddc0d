"""The ``secateurs`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

PROG = "secateurs"
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Search pruning policies on the accuracy/latency/size frontier.")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="run a pruning-policy search described by a YAML config")
    search.add_argument("config", nargs="?", help="path to a YAML config, e.g. configs/quickstart.yaml")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set search.num_trials=8 (repeatable)")
    search.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    search.add_argument("--resume", metavar="RUN_ID", default=None,
                        help="continue the search recorded in this MLflow parent run (after a crash or Ctrl-C)")
    search.add_argument("--address", default=None,
                        help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:PORT (default: $RAY_ADDRESS, else a local Ray)")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _search(args: argparse.Namespace) -> int:
    # Imported here so that `secateurs --help` and config errors answer without loading Ray.
    from search.config import ConfigError, load_config

    if args.resume and (args.config or args.overrides):
        return _fail("--resume RUN_ID takes no config or --set: the search continues with the config it was started with")
    if not args.resume and not args.config:
        return _fail("search needs a CONFIG (e.g. configs/quickstart.yaml) or --resume RUN_ID")
    config = None
    if args.config:
        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as exc:
            return _fail(str(exc))

    from search.driver import resume_search, run_search

    try:
        if args.resume:
            result = resume_search(args.resume, tracking_uri=args.tracking_uri, address=args.address)
        else:
            result = run_search(config, config_name=Path(args.config).stem, tracking_uri=args.tracking_uri, address=args.address)
    except ValueError as exc:
        # ConfigError, SpaceError, CheckpointError, PruningError and task/data errors: bad input,
        # reported before anything is recorded.
        return _fail(str(exc))
    return 0 if result.status == "FINISHED" else 130


COMMANDS = {"search": _search}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
