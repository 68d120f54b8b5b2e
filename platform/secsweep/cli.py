"""`secsweep` command line: `report EXPERIMENT`, `list`, `stages list|gc` and `provenance`."""

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
    from .tracking import ui_url

    print(f"runs in the MLflow UI: {ui_url(resolve_tracking_uri(args.tracking_uri), parent.info.experiment_id)}")
    return 0


def _list(args) -> int:
    from . import registry

    for kind in registry.KINDS:
        for name in registry.names(kind):
            spec = registry.get(name)
            print(f"{kind:14s} {name:16s} {(spec.doc.splitlines() or [''])[0]}")
    return 0


# -- stages -------------------------------------------------------------------------------------

DAY_S = 86400.0


def _stage_root(storage_path: str) -> Path:
    """The stage cache of a sweep storage path (`<storage>/stages`), or the path itself if it is one."""
    root = Path(storage_path).expanduser()
    return root / "stages" if (root / "stages").is_dir() or not root.is_dir() else root


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < DAY_S:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY_S:.1f} d"


def _config_summary(stage: str, config: dict, width: int = 70) -> str:
    """The config fields that differ from the trainable's defaults (all of them if it is unknown)."""
    import dataclasses

    from . import registry

    defaults: dict = {}
    try:
        cls = registry.get(stage).config
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    except SecsweepError:
        pass
    text = " ".join(f"{k}={v}" for k, v in sorted(config.items()) if k not in defaults or defaults[k] != v)
    text = text or "(defaults)"
    return text if len(text) <= width else text[: width - 3] + "..."


def stage_entries(root: Path) -> list[dict]:
    """Every cached stage (status ok) and unfinished computation (status partial) under `root`."""
    import json
    import time

    from .stages import CHECKPOINT, MANIFEST, WORK_SUFFIX, read_usage

    now = time.time()
    out = []
    for sdir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for d in sorted(p for p in sdir.iterdir() if p.is_dir()):
            if ".tmp-" in d.name:
                continue
            entry = {"stage": sdir.name, "path": d, "size": _size(d)}
            if d.name.endswith(WORK_SUFFIX):
                key = d.name[: -len(WORK_SUFFIX)]
                if (sdir / key / MANIFEST).is_file():
                    continue  # a finished stage's leftover; gc removes it
                ckpt = d / CHECKPOINT
                created = (ckpt if ckpt.is_file() else d).stat().st_mtime
                out.append({**entry, "key": key, "status": "partial", "created": created, "age": now - created,
                            "last_used": None, "sweeps": [], "config": {}})
                continue
            try:
                manifest = json.loads((d / MANIFEST).read_text())
            except (OSError, ValueError):
                continue  # not a stage (or being replaced right now)
            created = float(manifest.get("created_unix") or (d / MANIFEST).stat().st_mtime)
            usage = read_usage(d)
            sweeps = list(dict.fromkeys(str(u.get("sweep")) for u in usage if u.get("sweep")))
            last = max((float(u.get("time", 0)) for u in usage), default=None)
            out.append({**entry, "key": d.name, "status": "ok", "created": created, "age": now - created,
                        "last_used": last, "sweeps": sweeps, "config": manifest.get("config", {})})
    return out


def _stages_list(args) -> int:
    import time

    root = _stage_root(args.storage_path)
    entries = stage_entries(root)
    if not entries:
        print(f"no cached stages under {root}")
        return 0
    now = time.time()
    print(f"{'stage':12s} {'key':20s} {'status':7s} {'size':>9s} {'age':>8s} {'created':19s} "
          f"{'last used':>9s}  used by / config")
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created"]))
        last = _human_age(now - e["last_used"]) if e["last_used"] else "never"
        used = ", ".join(e["sweeps"][-3:]) + (f" (+{len(e['sweeps']) - 3})" if len(e["sweeps"]) > 3 else "")
        print(f"{e['stage']:12s} {e['key']:20s} {e['status']:7s} {_human_size(e['size']):>9s} "
              f"{_human_age(e['age']):>8s} {created:19s} {last:>9s}  {used or '-'}")
        if e["status"] == "ok":
            print(f"{'':12s} {'':20s} config: {_config_summary(e['stage'], e['config'])}")
    total = sum(e["size"] for e in entries)
    print(f"{len(entries)} entries, {_human_size(total)} under {root}")
    return 0


def _stages_gc(args) -> int:
    import shutil
    import time

    from filelock import FileLock, Timeout

    from .stages import cleanup_temporaries

    if args.older_than is None and not args.unused and args.unused_for is None:
        raise SecsweepError("stages gc: give at least one of --older-than DAYS, --unused, --unused-for DAYS")
    for flag, value in (("--older-than", args.older_than), ("--unused-for", args.unused_for)):
        if value is not None and not value >= 0:
            raise SecsweepError(f"{flag}={value}: must be a number of days >= 0")
    root = _stage_root(args.storage_path)
    now = time.time()

    def matches(e: dict) -> bool:
        if args.older_than is not None and e["age"] < args.older_than * DAY_S:
            return False
        if args.unused and e["sweeps"]:
            return False
        if args.unused_for is not None:
            last = e["last_used"] or e["created"]
            if now - last < args.unused_for * DAY_S:
                return False
        return True

    verb = "would remove" if args.dry_run else "removed"
    freed = 0
    for e in stage_entries(root):
        if args.stage and e["stage"] != args.stage or not matches(e):
            continue
        lock = FileLock(str(root / e["stage"] / e["key"]) + ".lock")
        try:
            lock.acquire(timeout=0)  # never delete a stage that is being computed right now
        except Timeout:
            print(f"skipped {e['stage']}/{e['key']}: locked (being computed)")
            continue
        try:
            if not args.dry_run:
                shutil.rmtree(e["path"])
        finally:
            lock.release()
        freed += e["size"]
        print(f"{verb} {e['stage']}/{e['path'].name} ({e['status']}, {_human_size(e['size'])}, "
              f"age {_human_age(e['age'])}, used by {len(e['sweeps'])} sweep(s))")
    if not args.dry_run and root.is_dir():
        for sdir in (p for p in root.iterdir() if p.is_dir()):
            for p in cleanup_temporaries(sdir):
                print(f"removed leftover {sdir.name}/{p.name}")
    print(f"{verb} {_human_size(freed)} under {root}")
    return 0


def _provenance(args) -> int:
    from . import provenance

    if args.write:
        path = provenance.write_file()
        print(f"wrote {path}")
    prov = provenance.compute()
    print(f"commit {prov.commit} dirty {prov.dirty} (from {prov.source})")
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
    st = sub.add_parser("stages", help="cached upstream stages (backdoored models, ...): list or prune")
    st_sub = st.add_subparsers(dest="stages_command", required=True)
    for name, fn, text in (("list", _stages_list, "what is cached: size, age, which sweeps used it"),
                           ("gc", _stages_gc, "remove cached stages by age or use")):
        c = st_sub.add_parser(name, help=text)
        c.add_argument("--storage-path", default="ray_results",
                       help="the sweeps' --storage-path (its stages/ folder), or a stage folder (default ray_results)")
        c.set_defaults(fn=fn)
        if name == "gc":
            c.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="created more than DAYS ago")
            c.add_argument("--unused", action="store_true", help="never read by any sweep")
            c.add_argument("--unused-for", type=float, default=None, metavar="DAYS",
                           help="not read by any sweep for DAYS (never-read stages: since created)")
            c.add_argument("--stage", default=None, help="only this stage (trainable name)")
            c.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    pv = sub.add_parser("provenance", help="the git commit and dirty flag runs are tagged with")
    pv.add_argument("--write", action="store_true",
                    help="write .secsweep-provenance.json (run before `ray up`: the cluster has no .git)")
    pv.set_defaults(fn=_provenance)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except SecsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
