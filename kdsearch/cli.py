"""Command line: parses arguments and calls the plain functions in the package; no logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdsearch import KdsearchError, __version__
from kdsearch.credentials import DEFAULT_STORAGE, STORAGE_ENV, TRACKING_ENV, default_storage, masked

DEFAULT_STUDY = "digits"


def find_study_file(name: str) -> Path:
    """A path as given, or a name looked up in ./studies and in the studies folder beside the package."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    for folder in (Path("studies"), Path(__file__).resolve().parent.parent / "studies"):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise KdsearchError(f"no study file '{name}': pass a .toml path or the name of a file in studies/")


def _positive_int(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--study x` must not pass for `--study-name x`

    def error(self, message: str):
        self.exit(2, f"kdsearch: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m kdsearch",
        description="Search for the best small student network to distill from a fixed teacher, "
                    "tracked in MLflow and drawn as a Pareto front.")
    parser.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run-study", help="run or resume a study",
                              description="Run (or resume, with the same --study-name) an Optuna study of students "
                                          "distilled from the study's teacher; then write the Pareto report.")
    _add_study_args(run, "distill.epochs=5")
    run.add_argument("--n-trials", type=_positive_int,
                     help="trials to add in this run (default: the study file's, 20); a new study's baselines and "
                          "warm-start trials come on top")
    run.add_argument("--timeout", type=_seconds, help="stop starting new trials after this many seconds")
    run.add_argument("--workers", type=_positive_int, default=1,
                     help="local worker processes sharing the study (needs a PostgreSQL or journal: --storage)")
    run.add_argument("--warm-start-from", metavar="STUDY",
                     help="a new study starts with the front of this earlier study (same --storage) enqueued first, "
                          "e.g. when moving from digits to MNIST or to more epochs")
    run.add_argument("--until-complete", type=_positive_int, help=argparse.SUPPRESS)  # set by --workers
    _add_common(run)

    ref = commands.add_parser("refine", help="train a study's winners again with a longer schedule",
                              description="Train the most accurate student of each [refine] budget (or the whole "
                                          "front) again with the [refine] schedule, as MLflow runs nested under the "
                                          "study's run; then write the report. Resumable: run it again.")
    _add_study_args(ref, "refine.epochs=60")
    _add_common(ref)

    rep = commands.add_parser("report", help="write the Pareto report of a study",
                              description="Write reports/<study>/pareto.{html,png,csv} and log them to the study's "
                                          "MLflow run.")
    _add_common(rep)

    exp = commands.add_parser("export", help="export a student as a torch.export program and ONNX, with a JSON card",
                              description="Pick a student (a trial, or the most accurate within a bound), write "
                                          "exports/<study>/trial-N/{student.pt2,student.onnx,card.json} and log it "
                                          "as an MLflow model on its trial's run.")
    pick = exp.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=int, help="trial number")
    pick.add_argument("--max-params", type=_positive_int, help="most accurate student with at most this many params")
    pick.add_argument("--max-latency-ms", type=_seconds, help="most accurate student at most this slow")
    exp.add_argument("--out", default="exports", help="output folder (default: %(default)s)")
    _add_common(exp)
    return parser


def study_name(text: str) -> str:
    """A study name also names its folders under reports/ and exports/."""
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} cannot name a study: its report folder is reports/<name>; "
                                         "use a name without slashes")
    return text


def _add_study_args(p: argparse.ArgumentParser, example: str) -> None:
    """The study file and what opens a session on it: run-study's and refine's."""
    p.add_argument("study", nargs="?", default=DEFAULT_STUDY,
                   help="study file (.toml) or name of one in studies/ (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding the dataset (default: the study file's data.data_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a study-file key, e.g. --set {example} (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    p.add_argument("--cache-dir", default=".kdsearch-cache", help="teacher cache (default: %(default)s)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study-name", type=study_name,
                   help="Optuna study name (default: the study file's name; report: 'digits')")
    p.add_argument("--storage", help=f"Optuna storage URL (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE}); give a "
                   f"URL with a password in ${STORAGE_ENV}: options show in every process list")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI (default: ${TRACKING_ENV}, else MLflow's own, "
                   "sqlite:///mlflow.db here)")
    p.add_argument("--reports-dir", default="reports", help="where reports go (default: %(default)s)")


def cmd_run_study(args: argparse.Namespace) -> None:
    from kdsearch.search import run_study
    from kdsearch.study_file import load_study

    overrides = [*([f"search.n_trials={args.n_trials}"] if args.n_trials else []),
                 *([f"search.timeout={args.timeout}"] if args.timeout else [])]
    study_file, overrides = find_study_file(args.study), _overrides(args, overrides)
    cfg = load_study(study_file, overrides)
    common = {"study_name": args.study_name, "storage": args.storage, "tracking_uri": args.tracking_uri,
              "device": args.device, "cache_dir": args.cache_dir, "reports_dir": args.reports_dir,
              "warm_start_from": args.warm_start_from}
    if args.workers > 1:
        from kdsearch.workers import run_workers

        run_workers(cfg, args.workers, _worker_args(args, study_file, overrides, cfg.name), **common)
    else:
        run_study(cfg, until_complete=args.until_complete, report=not args.until_complete, **common)


def _overrides(args: argparse.Namespace, more: list[str] | None = None) -> list[str]:
    """--set, then the options that stand for study-file keys."""
    return [*args.set, *(more or []), *([f"data.data_dir={args.data_dir!r}"] if args.data_dir else [])]


def cmd_refine(args: argparse.Namespace) -> None:
    from kdsearch.search import refine
    from kdsearch.study_file import load_study

    cfg = load_study(find_study_file(args.study), _overrides(args))
    refine(cfg, study_name=args.study_name, storage=args.storage, tracking_uri=args.tracking_uri,
           device=args.device, cache_dir=args.cache_dir, reports_dir=args.reports_dir)


def _worker_args(args: argparse.Namespace, study_file: Path, overrides: list[str], name: str) -> list[str]:
    """The command line of one worker: the same study and overrides (its stores come in its environment, see
    `credentials.worker_environment`)."""
    out = [str(study_file.resolve()), "--cache-dir", args.cache_dir, "--study-name", args.study_name or name]
    for item in overrides:
        out += ["--set", item]
    return out


def cmd_report(args: argparse.Namespace) -> None:
    from kdsearch.report import load_and_report

    load_and_report(args.study_name or DEFAULT_STUDY, args.storage, args.tracking_uri, Path(args.reports_dir))


def _quiet_libraries() -> None:
    """Our own progress lines replace the libraries' INFO logs (study created, database tables made)."""
    import logging

    import mlflow  # noqa: F401  (configures its loggers on import; set our level after that)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # export's downloads drew bars
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_export(args: argparse.Namespace) -> None:
    from kdsearch.export import export_study_student

    paths = export_study_student(args.study_name or DEFAULT_STUDY, args.storage, args.tracking_uri, Path(args.out),
                                 trial=args.trial, max_params=args.max_params, max_latency_ms=args.max_latency_ms)
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "storage"):
        args.storage = args.storage or default_storage()
    _quiet_libraries()
    try:
        {"run-study": cmd_run_study, "refine": cmd_refine, "report": cmd_report,
         "export": cmd_export}[args.command](args)
    except KdsearchError as e:
        print(f"kdsearch: error: {masked(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (`| head`); Python's docs' recipe, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        name = getattr(args, "study_name", None) or ""
        print(f"\nkdsearch: interrupted; finished trials are kept. Run the same command again to resume"
              f"{' study ' + name if name else ''}.", file=sys.stderr)
        return 130
    return 0
