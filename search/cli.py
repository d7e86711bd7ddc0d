"""The ``secateurs`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

PROG = "secateurs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Search pruning policies on the accuracy/latency/size frontier.")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="run a pruning-policy search described by a YAML config")
    search.add_argument("config", help="path to a YAML config, e.g. configs/quickstart.yaml")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set search.num_trials=8 (repeatable)")
    search.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that `secateurs --help` and config errors answer without loading Ray.
    from search.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))

    from evaluators.checkpoint import CheckpointError
    from evaluators.pruning import PruningError
    from search.driver import run_search
    from spaces import SpaceError

    try:
        run_search(config, config_name=Path(args.config).stem, tracking_uri=args.tracking_uri)
    except (SpaceError, CheckpointError, PruningError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # task factories and data loaders report bad input as ValueError
        return _fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
