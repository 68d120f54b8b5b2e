"""How much does the platform cost? The same trials as a plain loop and as a secsweep sweep.

    python bench/overhead.py                      # the default grid of sweeps/sft_grid.py (14 trials)
    python bench/overhead.py --trials smoke       # its --smoke-test grid (2 trials, about a minute)
    python bench/overhead.py --json overhead.json # also write the numbers

(a) plain loop: for every trial, `spec.fn(cfg, LocalContext(...))`, one after another in this
    process, torch using every core: the `for cfg in grid: train(cfg)` a researcher would write.
(b) platform: `secsweep.sweep.run(SWEEP, argv)` on a fresh local Ray with Tune, MLflow tracking into
    a throwaway SQLite store, checkpoints and the results report; Ray start-up and shut-down included.

Both run exactly the trial list `secsweep.sweep.plan()` resolves for (b) (preset, --smoke-test and
--set applied), against the same stage root `<storage-path>/stages`, where the backdoored models
(the attack stages) are computed once before either timing: both measure defense trials only.
See bench/README.md for how to read the ratio.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = ROOT / "sweeps" / "sft_grid.py"
GOAL = 1.2  # b/a the platform should stay under on the default grid
# other processes using more than this share of the cores during either run make b/a unreliable
# (on a 2-core machine one busy process halves a run's speed)
NOISY_SHARE = 0.1


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_sweep(path: Path):
    """The SWEEP a sweep script declares (imported by file path: sweeps/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_sweep_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "SWEEP"):
        raise SystemExit(f"error: {path} declares no SWEEP")
    return module.SWEEP


def platform_argv(args, storage: Path, tracking_uri: str, ncores: int) -> list[str]:
    """The command line (b) runs the sweep with; (a) runs the trials `plan()` resolves from it."""
    argv = ["--storage-path", str(storage), "--tracking-uri", tracking_uri]
    if args.trials == "smoke":
        argv.append("--smoke-test")
    if args.data_root:
        argv += ["--data-root", args.data_root]
    for s in args.set:
        argv += ["--set", s]
    if args.equal_concurrency:  # one trial at a time on every core, like (a)
        argv += ["--cpus-per-trial", str(ncores), "--max-concurrent", "1"]
    return argv


# -- background load ------------------------------------------------------------------------------
#
# Both timings assume the benchmark has the cores to itself. The monitor samples /proc once a second
# during each run and adds up the CPU time of this process and its descendants (for (b): the Ray
# daemons and trial processes, which Ray starts as descendants) and of every other process.
# Processes that start and exit between two samples are missed: the figures are lower bounds.

def proc_snapshot() -> dict[int, tuple[int, int, int, str]] | None:
    """pid -> (parent pid, start time in ticks since boot, CPU ticks used: user + system, command
    name) of every process, from /proc; None where there is no /proc (not Linux)."""
    proc = Path("/proc")
    if not (proc / "stat").is_file():
        return None
    out = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # after the command name, which may hold spaces and parentheses: field 3 (state) onwards;
        # ppid is field 4, utime 14, stime 15, starttime 22 (proc(5))
        f = raw[raw.rfind(")") + 2:].split()
        out[int(d.name)] = (int(f[1]), int(f[19]), int(f[11]) + int(f[12]), raw[raw.find("(") + 1:raw.rfind(")")])
    return out


def split_ticks(prev: dict[int, tuple], cur: dict[int, tuple], root: int,
                own_by_pid: dict[tuple[int, int], list] | None = None) -> tuple[int, int]:
    """CPU ticks used between the snapshots `prev` and `cur` by `root` with its descendants, and by
    every other process. A pid whose start time changed is a new process (pid reuse); a process new
    in `cur` counts all its ticks; one gone from `cur` is not counted (its last ticks are unknown).
    `own_by_pid`, if given, accumulates (pid, start) -> [command name, ticks] of the own processes."""
    memo: dict[int, bool] = {root: True}

    def in_tree(pid: int) -> bool:
        chain = []
        while pid not in memo:
            entry = cur.get(pid)
            if entry is None or pid in chain or pid <= 1:
                memo[pid] = False
                break
            chain.append(pid)
            pid = entry[0]
        for p in chain:
            memo[p] = memo[pid]
        return memo[pid]

    ours = others = 0
    for pid, (_, start, ticks, *name) in cur.items():
        old = prev.get(pid)
        used = ticks - old[2] if old is not None and old[1] == start else ticks
        if used > 0:
            if in_tree(pid):
                ours += used
                if own_by_pid is not None:
                    entry = own_by_pid.setdefault((pid, start), ["", 0])
                    entry[0] = name[0] if name else entry[0]  # the newest name (ray::IDLE becomes the trial's)
                    entry[1] += used
            else:
                others += used
    return ours, others


class LoadMonitor:
    """Context manager: cores used on average, while it is open, by this process with its descendants
    (`own_cores`) and by all other processes (`other_cores`); None without /proc."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.own_ticks = self.other_ticks = 0
        self.own_by_pid: dict[tuple[int, int], list] = {}
        self.seconds = 0.0
        self._prev = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LoadMonitor":
        self._prev = proc_snapshot()
        self._t0 = time.monotonic()
        if self._prev is not None:
            self._thread = threading.Thread(target=self._run, name="overhead-load-monitor", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        cur = proc_snapshot()
        own, other = split_ticks(self._prev, cur, os.getpid(), self.own_by_pid)
        self.own_ticks += own
        self.other_ticks += other
        self._prev = cur

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()

    def _cores(self, ticks: int) -> float | None:
        if self._thread is None or self.seconds <= 0:
            return None
        return ticks / os.sysconf("SC_CLK_TCK") / self.seconds

    @property
    def own_cores(self) -> float | None:
        return self._cores(self.own_ticks)

    @property
    def other_cores(self) -> float | None:
        return self._cores(self.other_ticks)

    @property
    def own_cpu_s(self) -> float | None:
        return None if self._thread is None else self.own_ticks / os.sysconf("SC_CLK_TCK")

    def top_own(self, k: int = 4) -> list[tuple[str, float]]:
        """The `k` own processes that used the most CPU: (command name, CPU-seconds); this process is "this process"."""
        hz = os.sysconf("SC_CLK_TCK")
        rows = [("this process" if pid == os.getpid() else name, ticks / hz)
                for (pid, _), (name, ticks) in self.own_by_pid.items()]
        return sorted(rows, key=lambda r: -r[1])[:k]


# -- preparation (not timed) ----------------------------------------------------------------------

def precompute_stages(trials: list[dict[str, Any]], stage_root: Path, data_root: str | None, workdir: Path) -> int:
    """Compute every upstream attack stage the trials need, once, into the shared stage root."""
    from secsweep import registry
    from secsweep.context import LocalContext
    from secsweep.runtime import TRAINABLE_KEY
    from secsweep.stages import stage_key

    done: set[str] = set()
    for item in trials:
        values = dict(item)
        cfg = registry.get(values.pop(TRAINABLE_KEY)).build_config(values)
        if not hasattr(cfg, "attack_config"):  # not a defense: no upstream stage
            continue
        attack_cfg = cfg.attack_config()
        key = stage_key(cfg.attack, attack_cfg)
        if key in done:
            continue
        ctx = LocalContext(workdir=workdir / f"stage-{cfg.attack}-{key}", stage_root=stage_root, data_root=data_root)
        ctx.stage(cfg.attack, attack_cfg)
        done.add(key)
    return len(done)


def init_mlflow_store(tracking_uri: str) -> None:
    """Create the throwaway SQLite store (schema migrations take seconds; a user pays that once)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


# -- (a) the plain loop ---------------------------------------------------------------------------

def run_plain(trials: list[dict[str, Any]], stage_root: Path, data_root: str | None, workdir: Path,
              threads: int) -> tuple[float, list[dict[str, Any]]]:
    import torch

    from secsweep import registry
    from secsweep.context import LocalContext
    from secsweep.runtime import TRAINABLE_KEY, seed_everything

    torch.set_num_threads(threads)
    rows = []
    t0 = time.perf_counter()
    for i, item in enumerate(trials):
        values = dict(item)
        name = values.pop(TRAINABLE_KEY)
        spec = registry.get(name)
        cfg = spec.build_config(values)
        seed_everything(getattr(cfg, "seed", 0))  # what the platform's trial entry does too
        ctx = LocalContext(workdir=workdir / f"{i:03d}-{name}", stage_root=stage_root, data_root=data_root)
        t = time.perf_counter()
        spec.fn(cfg, ctx)
        last = ctx.history[-1] if ctx.history else {}
        rows.append({"trial": item, "seconds": time.perf_counter() - t,
                     "asr": last.get("asr"), "clean_acc": last.get("clean_acc")})
    return time.perf_counter() - t0, rows


# -- (b) the platform -----------------------------------------------------------------------------

def tune_trials(storage: Path, sweep_name: str) -> list[dict[str, Any]]:
    """Per-trial config, last metrics and timing from the Tune result files of the sweep just run."""
    exp_dirs = sorted(storage.glob(f"{sweep_name}-*/secsweep.json"), key=lambda p: p.stat().st_mtime)
    if not exp_dirs:
        return []
    exp_dir = exp_dirs[-1].parent
    # the final status is in the platform's results table: Tune's result.json never says done=True
    # for a function trainable that simply returns
    status: dict[str, str] = {}
    if (exp_dir / "results.csv").is_file():
        with open(exp_dir / "results.csv", newline="") as f:
            status = {row.get("trial_id", ""): row.get("status", "") for row in csv.DictReader(f)}
    out = []
    for result in sorted(exp_dir.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        first, last = lines[0], lines[-1]
        out.append({
            "trial": (last.get("config") or {}).get("params", {}),
            "seconds": float(last.get("time_total_s", 0.0)),
            # Tune stamps results in whole seconds: start/end are good to about a second
            "start": float(first.get("timestamp", 0)) - float(first.get("time_this_iter_s", 0.0)),
            "end": float(last.get("timestamp", 0)),
            "status": status.get(str(last.get("trial_id")), "UNKNOWN"),
            "asr": last.get("asr"), "clean_acc": last.get("clean_acc"),
        })
    return out


def run_platform(sweep, argv: list[str]) -> tuple[float, int, float]:
    from secsweep import sweep as sweep_mod

    t_wall = time.time()
    t0 = time.perf_counter()
    rc = sweep_mod.run(sweep, argv)
    return time.perf_counter() - t0, rc, t_wall


# -- report ---------------------------------------------------------------------------------------

def _key(trial: dict[str, Any]) -> str:
    return json.dumps({k: trial[k] for k in sorted(trial)}, sort_keys=True, default=str)


def per_trial_split(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-trial times of both runs, the first trial of each apart from the rest.

    The first trial of (b) also carries its trial process's one-time work (importing every
    trainable, torch's first optimizer importing torch._dynamo), which (a) did before its timing;
    the later trials of a reused trial process show the per-trial cost (reports, checkpoints,
    switching trials). `steady_diffs`: (b) - (a) in seconds of every trial that is the first of
    neither run, matched by config."""
    b_sorted = sorted(b_rows, key=lambda r: r.get("start", 0.0))
    firsts = {_key(a_rows[0]["trial"])} if a_rows else set()
    if b_sorted:
        firsts.add(_key(b_sorted[0]["trial"]))
    b_by = {_key(r["trial"]): r for r in b_rows}
    diffs = [b_by[_key(r["trial"])]["seconds"] - r["seconds"] for r in a_rows
             if _key(r["trial"]) not in firsts and _key(r["trial"]) in b_by]
    diffs_sorted = sorted(diffs)
    median = None
    if diffs_sorted:
        mid = len(diffs_sorted) // 2
        median = diffs_sorted[mid] if len(diffs_sorted) % 2 else (diffs_sorted[mid - 1] + diffs_sorted[mid]) / 2
    return {
        "first_a_s": a_rows[0]["seconds"] if a_rows else None,
        "first_b_s": b_sorted[0]["seconds"] if b_sorted else None,
        "steady_diffs": diffs,
        "steady_median_diff_s": median,
    }


def max_metric_diff(a_rows, b_rows, metric: str) -> float | None:
    b_by = {_key(r["trial"]): r for r in b_rows}
    diffs = [abs(r[metric] - b_by[_key(r["trial"])][metric]) for r in a_rows
             if _key(r["trial"]) in b_by and r[metric] is not None and b_by[_key(r["trial"])][metric] is not None]
    return max(diffs) if diffs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", choices=("grid", "smoke"), default="grid",
                   help="grid: the sweep's default grid; smoke: its --smoke-test grid and settings")
    p.add_argument("--sweep", default=str(DEFAULT_SWEEP), help="sweep script declaring a grid SWEEP (default sweeps/sft_grid.py)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the platform's search order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both (repeatable)")
    p.add_argument("--equal-concurrency", action="store_true",
                   help="run (b) one trial at a time with every core (--cpus-per-trial N --max-concurrent 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--workdir", default=None, help="keep all files here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    if args.data_root:
        args.data_root = str(Path(args.data_root).expanduser().resolve())

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray: its start-up is part of (b)
    ncores = cores()

    from secsweep import sweep as sweep_mod
    from secsweep.errors import SecsweepError

    sweep = load_sweep(Path(args.sweep).resolve())
    if args.workdir:
        base = Path(args.workdir).expanduser().resolve()
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="secsweep-overhead-")).resolve()
    storage = base / "ray_results"
    stage_root = storage / "stages"          # where (b) keeps stages: `<storage-path>/stages`
    tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
    b_argv = platform_argv(args, storage, tracking_uri, ncores)

    try:
        try:
            plan = sweep_mod.plan(sweep, sweep_mod.build_parser(sweep).parse_args(b_argv))
        except SecsweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if plan.trials is None:
            print(f"error: {sweep.name} is a search (space=), not a grid: the benchmark needs a fixed trial list",
                  file=sys.stderr)
            return 2
        trials = [dict(t) for t in plan.trials for _ in range(plan.num_samples)]  # grid: num_samples repeats
        n = len(trials)

        # -- untimed preparation shared by (a) and (b)
        t = time.perf_counter()
        n_stages = precompute_stages(trials, stage_root, args.data_root, base / "precompute")
        stage_s = time.perf_counter() - t
        t = time.perf_counter()
        init_mlflow_store(tracking_uri)
        mlflow_s = time.perf_counter() - t
        from secsweep import data as data_mod

        data_mod._clear_cache()  # (a) decodes the dataset itself, as a fresh script would

        # -- (a)
        print(f"\n== (a) plain loop: {n} trials, one at a time, {ncores} torch threads", flush=True)
        with LoadMonitor() as load_a:
            a_s, a_rows = run_plain(trials, stage_root, args.data_root, base / "plain", ncores)

        # -- (b)
        conc_b = 1 if args.equal_concurrency else ncores
        print(f"\n== (b) secsweep.sweep.run({sweep.name}, {' '.join(b_argv)})", flush=True)
        with LoadMonitor() as load_b:
            b_s, rc, b_t0 = run_platform(sweep, b_argv)
        b_rows = tune_trials(storage, sweep.name)
        b_end = b_t0 + b_s

        # -- report
        finished = sum(r["status"] == "TERMINATED" for r in b_rows)
        ok_b = rc == 0 and finished == n
        ratio = b_s / a_s
        per_trial = (b_s - a_s) / n
        startup = min(r["start"] for r in b_rows) - b_t0 if b_rows else None
        teardown = b_end - max(r["end"] for r in b_rows) if b_rows else None
        a_mean = sum(r["seconds"] for r in a_rows) / n
        b_mean = sum(r["seconds"] for r in b_rows) / len(b_rows) if b_rows else None
        d_acc, d_asr = max_metric_diff(a_rows, b_rows, "clean_acc"), max_metric_diff(a_rows, b_rows, "asr")
        split = per_trial_split(a_rows, b_rows)
        others = [x for x in (load_a.other_cores, load_b.other_cores) if x is not None]
        noisy = bool(others) and max(others) > NOISY_SHARE * ncores
        if args.equal_concurrency:
            a_how = f"1 trial at a time, {ncores} torch threads"
            b_how = f"1 trial at a time, {ncores} CPUs and {ncores} torch threads (--equal-concurrency)"
            conc_note = "equal concurrency: both run one trial at a time on all cores; b/a is the platform's own cost"
        else:
            a_how = f"1 trial at a time, {ncores} torch threads"
            b_how = f"up to {conc_b} trials at a time, 1 CPU and 1 torch thread each"
            conc_note = (f"NOT equal concurrency: (a) runs 1 trial at a time with {ncores} torch threads, (b) runs "
                         f"{conc_b} trials at a time with 1 torch thread each; both use all {ncores} cores, so b/a "
                         f"compares finishing the same work on the same machine (a sweep's parallelism can hide "
                         f"overhead). For the platform's cost at equal concurrency run with --equal-concurrency.")

        print(f"\n== secsweep overhead: {sweep.name}, trials={args.trials} ({n} trials), {ncores} cores")
        print(f"untimed setup    : {n_stages} attack stage(s) pre-computed in {stage_s:.1f} s into {stage_root}; "
              f"MLflow SQLite store created in {mlflow_s:.1f} s")
        print(f"(a) plain loop   : {a_s:8.1f} s wall   {a_how}; mean {a_mean:.1f} s/trial")
        b_extra = f"; mean {b_mean:.1f} s/trial inside Tune" if b_mean is not None else ""
        print(f"(b) secsweep     : {b_s:8.1f} s wall   {b_how}, Ray start-up included{b_extra}")
        if startup is not None:
            print(f"    (b) phases   : start-up to first trial ~{startup:.0f} s (MLflow parent run, ray.init, Tune, "
                  f"trial actors); trials ~{b_end - b_t0 - startup - teardown:.0f} s; "
                  f"after last result ~{teardown:.0f} s (report, plots, artifacts, ray.shutdown)")
        print(f"ratio b/a        : {ratio:.2f}   (goal <= {GOAL} on the default grid)")
        print(f"per-trial overhead: {per_trial:+.1f} s   ((b - a) / {n} trials)")
        if split["first_b_s"] is not None and split["first_a_s"] is not None:
            print(f"first trial      : (a) {split['first_a_s']:.1f} s, (b) {split['first_b_s']:.1f} s inside Tune "
                  f"(also its trial process's one-time imports, which (a) did before its timing)")
        if split["steady_median_diff_s"] is not None:
            print(f"later trials     : median (b - a) {split['steady_median_diff_s']:+.2f} s per trial over "
                  f"{len(split['steady_diffs'])} trial(s) (reports, checkpoints, switching trials)")
        if load_a.other_cores is not None and load_b.other_cores is not None:
            print(f"background load  : other processes used {load_a.other_cores:.2f} cores on average during (a), "
                  f"{load_b.other_cores:.2f} during (b), of {ncores}; the benchmark itself used "
                  f"{load_a.own_cpu_s:.0f} CPU-s in (a), {load_b.own_cpu_s:.0f} CPU-s in (b) (Ray's processes included)")
            print("    (b) CPU-s    : " + ", ".join(f"{name} {sec:.1f}" for name, sec in load_b.top_own()))
        print(f"concurrency      : {conc_note}")
        if d_acc is not None:
            print(f"same trials      : max |clean_acc a - b| = {d_acc:.4f}, max |asr a - b| = {d_asr:.4f} "
                  f"(differences come from thread counts, not from the platform)")
        if noisy:
            print(f"WARNING: other processes used more than {NOISY_SHARE:.0%} of the cores during a run: both "
                  f"timings are slowed by different amounts and b/a is not the platform's cost; rerun on an "
                  f"idle machine", file=sys.stderr)
        if not ok_b:
            print(f"WARNING: (b) exit code {rc}, {finished}/{n} trials finished: "
                  f"the timing of (b) is not comparable", file=sys.stderr)

        if args.json:
            import ray
            import torch

            numbers = {
                "sweep": sweep.name, "trials_mode": args.trials, "n_trials": n, "cores": ncores,
                "a_wall_s": a_s, "b_wall_s": b_s, "ratio_b_over_a": ratio, "per_trial_overhead_s": per_trial,
                "goal_ratio": GOAL, "equal_concurrency": args.equal_concurrency,
                "a_concurrency": 1, "a_torch_threads": ncores,
                "b_concurrency": conc_b, "b_torch_threads": ncores if args.equal_concurrency else 1,
                "a_mean_trial_s": a_mean, "b_mean_trial_s": b_mean,
                "b_startup_s": startup, "b_teardown_s": teardown,
                "stage_precompute_s": stage_s, "stages": n_stages, "mlflow_store_init_s": mlflow_s,
                "max_abs_diff_clean_acc": d_acc, "max_abs_diff_asr": d_asr,
                "first_trial_a_s": split["first_a_s"], "first_trial_b_s": split["first_b_s"],
                "later_trials_diff_s": split["steady_diffs"], "later_trials_median_diff_s": split["steady_median_diff_s"],
                "other_cores_a": load_a.other_cores, "other_cores_b": load_b.other_cores,
                "own_cpu_s_a": load_a.own_cpu_s, "own_cpu_s_b": load_b.own_cpu_s, "noisy": noisy,
                "b_cpu_s_by_process": load_b.top_own(12),
                "b_exit_code": rc, "b_ok": ok_b, "argv_b": b_argv, "set": args.set,
                "ray": ray.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                "a_trials": a_rows, "b_trials": b_rows,
            }
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(numbers, indent=2, default=str))
            print(f"numbers written to {out}")
        return 0 if ok_b else 1
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
