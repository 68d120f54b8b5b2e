"""`secsweep` command line: `secsweep report EXPERIMENT` and `secsweep list`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SecsweepError


def _report(args) -> int:
    from .report import frame_from_mlflow, write_report
    from .tracking import ParentRun, client_for, resolve_tracking_uri

    client = client_for(resolve_tracking_uri(args.tracking_uri))
    frame, histories, parent = frame_from_mlflow(client, args.experiment, args.run)
    if not len(frame):
        raise SecsweepError(f"experiment={args.experiment!r}: the sweep run {parent.info.run_id} has no trials")
    out = Path(args.out or f"report-{args.experiment}")
    paths = write_report(frame, out, title=args.experiment, histories=histories)
    if not args.no_log:
        ParentRun(client, parent.info.run_id).log_artifacts(paths)
    print((out / "per_defense.md").read_text() if (out / "per_defense.md").exists() else (out / "results.md").read_text())
    print(f"\nwrote {', '.join(p.name for p in paths)} to {out}/" + ("" if args.no_log else f" and to MLflow run {parent.info.run_id}"))
    return 0


def _list(args) -> int:
    from . import registry

    for kind in registry.KINDS:
        for name in registry.names(kind):
            spec = registry.get(name)
            print(f"{kind:9s} {name:12s} {(spec.doc.splitlines() or [''])[0]}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="secsweep")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="results table, plots and DER of a sweep, from MLflow")
    r.add_argument("experiment", help="MLflow experiment (= sweep script name, e.g. defense_comparison)")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    r.add_argument("--run", default=None, help="parent run id (default: the latest sweep run)")
    r.add_argument("--out", default=None, help="output folder (default report-<experiment>)")
    r.add_argument("--no-log", action="store_true", help="do not attach the report to the MLflow parent run")
    r.set_defaults(fn=_report)
    ls = sub.add_parser("list", help="registered trainables")
    ls.set_defaults(fn=_list)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except SecsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
