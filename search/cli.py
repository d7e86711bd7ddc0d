"""The ``secateurs`` command."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a download is no line of the command's output

STARTED = time.perf_counter()  # the command's start, where search.time_budget_s counts from (before torch and Ray load)
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
    _production_parsers(commands)
    return parser


def _production_parsers(commands) -> None:
    """frontier, compare, pick and ui: from a finished search to a shipped model (search.compare, search.pick)."""
    frontier = commands.add_parser("frontier", help="print the frontier of a search (and write it as CSV/JSON)")
    frontier.add_argument("run_id", metavar="RUN_ID", help="the search's MLflow run id (the parent run)")
    frontier.add_argument("--all", action="store_true", help="every completed trial, with a pareto column, not only the frontier")
    frontier.add_argument("--csv", metavar="PATH", help="write the table as CSV (full run ids, ratio per group)")
    frontier.add_argument("--json", metavar="PATH", help="write the table as JSON, with the dense reference")
    frontier.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    compare = commands.add_parser("compare", help="overlay the frontiers of several searches in one table and plot")
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="search run ids (parent runs)")
    compare.add_argument("--out", metavar="PNG", help="write the overlay plot (accuracy vs latency and vs size)")
    compare.add_argument("--csv", metavar="PATH", help="write the union of the frontiers as CSV")
    compare.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    pick = commands.add_parser("pick", help="choose a frontier policy under constraints; rebuild, export and register it")
    pick.add_argument("run_id", metavar="RUN_ID", help="the search's MLflow run id (the parent run)")
    pick.add_argument("--min-accuracy", type=float, metavar="A", help="keep policies with accuracy >= A")
    pick.add_argument("--max-accuracy-drop", type=float, metavar="D", help="keep policies at most D below the dense accuracy")
    pick.add_argument("--max-latency-ms", type=float, metavar="MS", help="keep policies with latency_ms <= MS (as the search measured)")
    pick.add_argument("--max-size-mb", type=float, metavar="MB", help="keep policies with size_mb <= MB")
    pick.add_argument("--where", action="append", default=[], metavar="EXPR",
                      help="keep policies meeting a constraint written as search.constraints writes it, e.g. 'macs <= 0.5 * dense' "
                           "(repeatable; the flags above are shorthands for the same)")
    pick.add_argument("--prefer", default="knee", metavar="knee|OBJECTIVE",
                      help="among the policies left: the knee of the frontier (default) or the best of one objective "
                           "(accuracy, latency_ms, size_mb, or the search's own, e.g. rmse)")
    pick.add_argument("--trial", metavar="N|RUN_ID", help="take this trial of the search (number or run id) instead of choosing")
    pick.add_argument("--finetune-epochs", type=float, metavar="N",
                      help="rebuild and fine-tune for N epochs (default: as the search did), then measure as the search did")
    pick.add_argument("--out", metavar="DIR", help="export policy.json, model.pt, model.pt2, model.onnx, metrics.json, MODEL_CARD.md")
    pick.add_argument("--force", action="store_true", help="with --out: replace the export files in a non-empty DIR")
    pick.add_argument("--onnx-tolerance", type=float, default=1e-4, metavar="T",
                      help="largest max-abs difference allowed between ONNX/pt2 and torch outputs (default: 1e-4)")
    pick.add_argument("--register", metavar="NAME", help="log the model (a kind=export run) and register it in the MLflow Model Registry")
    pick.add_argument("--alias", default=None, metavar="ALIAS", help="with --register: the alias to set (default: candidate)")
    pick.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    ui = commands.add_parser("ui", help="start the MLflow UI on the tracking store (foreground; Ctrl-C stops it)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    ui.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)


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
            result = resume_search(args.resume, tracking_uri=args.tracking_uri, address=args.address, started=STARTED)
        else:
            result = run_search(config, config_name=Path(args.config).stem, tracking_uri=args.tracking_uri, address=args.address,
                                started=STARTED)
    except ValueError as exc:
        # ConfigError, SpaceError, CheckpointError, PruningError and task/data errors: bad input,
        # reported before anything is recorded.
        return _fail(str(exc))
    if result.status != "FINISHED":
        return 130
    if result.num_failed and not len(result.trials):
        print(f"{PROG}: error: every trial failed ({result.num_failed}); the first: {result.first_error}", file=sys.stderr)
        return 1
    return 0


def _production(handler):
    """Run a frontier/compare/pick/ui handler: bad input is one line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        import logging

        from search.tracking import resolve_tracking_uri

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        try:
            return handler(args, resolve_tracking_uri(args.tracking_uri))
        except ValueError as exc:  # ProductionError, and task factories reporting bad input
            return _fail(str(exc))

    return run


def _frontier(args: argparse.Namespace, uri: str) -> int:
    from search.compare import describe_search, write_frontier
    from search.records import format_table, load_search

    record = load_search(args.run_id, uri)
    table = record.trials if args.all else record.frontier
    print(describe_search(record))
    if len(table):
        scores = [c for q in record.objectives.quality
                  for c in (q, "accuracy_drop" if q == "accuracy" else f"{q}_change", f"{q}_expected", f"{q}_expected_error")]  # search.refine
        columns = ["trial", "kind", "criterion", *scores, "latency_ms", "size_mb", "macs", "params"]
        extra = (["pareto"] + ([] if table["feasible"].all() else ["feasible"])) if args.all else []
        print(format_table(table, columns + extra + ["run_id"]))
    for path in write_frontier(record, table, csv=args.csv, json_path=args.json):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace, uri: str) -> int:
    from search.compare import compare_tables, plot_compare, unlike_training
    from search.records import format_table, load_search

    records = [load_search(run_id, uri) for run_id in dict.fromkeys(args.run_ids)]
    summary, combined = compare_tables(records)
    print(summary.drop(columns=["run_id", "scores_at"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("(hypervolume: each objective scaled to [0, 1] over all the frontiers shown, reference 1.1; larger is better)")
    if summary["refined"].any():  # search.refine: a refined score beside an unrefined one compares training lengths
        print("(best score, hypervolume and overall compare the scores "
              + ("after each search's refinement (search.fidelity)" if summary["scores_at"].iloc[0] == "refined"
                 else "after each search's own fine-tune: not every search refined its frontier") + ")")
    if len({r.config.task.name for r in records}) > 1:
        print("note: these searches are on different tasks; their scores are not comparable")
    if unlike := unlike_training(records, summary["scores_at"].iloc[0]):
        print("note: the scores compared come from unlike training, and a longer fine-tune lifts a frontier "
              "without a better policy:\n  " + "\n  ".join(unlike))
    if len(combined):
        print("\nunion of the frontiers, fastest first (overall = non-dominated among all of them):")
        print(format_table(combined, ["search", "trial", "kind", "criterion", *records[0].objectives.names, "overall", "run_id"]))
    if args.csv:
        path = Path(args.csv).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        combined.to_csv(path, index=False)
        print(f"wrote {path}", file=sys.stderr)
    if args.out:
        print(f"wrote {plot_compare(records, args.out)}", file=sys.stderr)
    return 0


def _pick_command(args: argparse.Namespace) -> str:
    """The pick command line as parsed (for the model card)."""
    import shlex

    words = [PROG, "pick", args.run_id]
    for flag in ("min_accuracy", "max_accuracy_drop", "max_latency_ms", "max_size_mb", "trial", "finetune_epochs",
                 "out", "register", "alias", "tracking_uri"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    for where in args.where:
        words += ["--where", where]
    if args.prefer != "knee":
        words += ["--prefer", args.prefer]
    return shlex.join(words)


def _pick(args: argparse.Namespace, uri: str) -> int:
    from search.choose import Constraints
    from search.pick import format_pick, pick
    from search.registry import DEFAULT_ALIAS

    if args.alias is not None and args.register is None:
        return _fail("--alias needs --register NAME")
    if args.force and args.out is None:
        return _fail("--force applies only with --out DIR")
    constraints = Constraints(args.min_accuracy, args.max_accuracy_drop, args.max_latency_ms, args.max_size_mb, where=tuple(args.where))
    if args.trial is not None and constraints.active():
        return _fail("--trial takes the trial given: it cannot be combined with constraints")
    result = pick(
        args.run_id,
        constraints=constraints,
        prefer=args.prefer,
        trial=args.trial,
        finetune_epochs=args.finetune_epochs,
        out=args.out,
        force=args.force,
        register=args.register,
        alias=args.alias or DEFAULT_ALIAS,
        onnx_tolerance=args.onnx_tolerance,
        tracking_uri=uri,
        command=_pick_command(args),
    )
    print(format_pick(result))
    return 0


def _ui(args: argparse.Namespace, uri: str) -> int:
    from search.ui import serve_ui

    return serve_ui(uri, args.host, args.port, args.workers)


COMMANDS = {
    "search": _search,
    "frontier": _production(_frontier),
    "compare": _production(_compare),
    "pick": _production(_pick),
    "ui": _production(_ui),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
