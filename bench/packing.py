"""Trials per GPU-hour when trials share a GPU: an SFT grid at --gpus-per-trial 1, 0.5 and 0.25.

    python bench/packing.py                    # CUDA: 8 SFT trials (PreAct-ResNet18, CIFAR-shaped, 3 epochs)
    python bench/packing.py --trials 16 --shares 1 0.5 0.25 0.125
    python bench/packing.py --small            # CPU: checks the script works (no GPU numbers)

For every share g the same grid (N SFT trials against one backdoored model, differing in their
`seed`) runs through `secsweep.sweep.run` with `--gpus-per-trial g` on one GPU, so 1/g trials run
at once; every trial's memory is bounded to g of the GPU (`secsweep.accel.bound_trial`) and its
torch threads to its CPUs (`--cpus-per-trial`, default: the node's cores x g, at least 1).
The backdoored model is computed once before, untimed, into the stage root all runs share (a stage
is computed once under its lock however many trials need it: `secsweep.stages.StageStore`).

Printed per share: the span of the trials (first start to last end, from Tune's results; Ray
start-up excluded), trials per GPU-hour = N / span in hours (one GPU), the gain over g = 1 (goal:
>= 2x at 0.25), and the peak GPU memory of each trial (`gpu_peak_mem_gib`, the largest
`torch.cuda.max_memory_allocated` a trial reported). Data: as bench/gpu_throughput.py (CIFAR-10 if
found, else random images in its layout). On a machine without CUDA it refuses, unless --small:
then it runs a 2-trial digits grid at --cpus-per-trial 2 and 1 only to check that the script works
(CPU-hours, no memory numbers: not a measurement of packing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
GOAL = 2.0  # trials per GPU-hour at --gpus-per-trial 0.25 over those at 1


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_share(values: dict[str, Any], n: int, storage: Path, uri: str, data_root: str | None, flag: str,
              share: float, cpus: float, fast_path: str | None) -> dict[str, Any]:
    from secsweep import sweep as sweep_mod

    ov = _bench("overhead")
    trial = dict(values)
    trainable = trial.pop("trainable")
    name = f"bench_packing_{flag.strip('-').split('-')[0]}_{str(share).replace('.', 'p')}"
    sweep = sweep_mod.Sweep(name=name, trainable=trainable, fixed=trial, grid=[{"seed": s} for s in range(n)],
                            source=str(Path(__file__).resolve()))
    argv = ["--storage-path", str(storage), "--tracking-uri", uri, "--max-failures", "0", "--max-concurrent", "0"]
    if data_root:
        argv += ["--data-root", data_root]
    if flag == "--gpus-per-trial":
        argv += ["--gpus-per-trial", str(share), "--cpus-per-trial", str(cpus)]
    else:
        argv += ["--cpus-per-trial", str(share)]
    if fast_path:
        argv += ["--fast-path", fast_path]
    t = time.perf_counter()
    rc = sweep_mod.run(sweep, argv)
    wall = time.perf_counter() - t
    rows = ov.tune_trials(storage, name)
    peaks = []
    for p in sorted(storage.glob(f"{name}-*/*/result.json")):
        vals = [json.loads(x).get("gpu_peak_mem_gib") for x in p.read_text().splitlines() if x.strip()]
        vals = [v for v in vals if v is not None]
        if vals:
            peaks.append(max(vals))
    done = sum(r["status"] == "TERMINATED" for r in rows)
    span = (max(r["end"] for r in rows) - min(r["start"] for r in rows)) if rows else float("nan")
    return {"share": share, "trials": n, "finished": done, "exit_code": rc, "wall_with_ray_s": wall,
            "span_s": span, "trials_per_device_hour": n / (span / 3600) if span > 0 else float("nan"),
            "peak_mem_gib": peaks, "mean_trial_s": sum(r["seconds"] for r in rows) / max(len(rows), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU: only check that the script works (2 digits trials)")
    p.add_argument("--trials", type=int, default=None, help="trials per share (default 8; --small 2)")
    p.add_argument("--shares", type=float, nargs="+", default=None, help="GPU shares (default 1 0.5 0.25)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default: the node's cores x share, at least 1")
    p.add_argument("--fast-path", default=None, choices=("auto", "on", "off", "compile"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("error: no CUDA device: packing trials onto a GPU needs one; pass --small to check the script on "
              "the CPU (it measures no packing)", file=sys.stderr)
        return 2
    gt = _bench("gpu_throughput")
    ncores = len(os.sched_getaffinity(0))
    n = args.trials or (2 if args.small else 8)
    if cuda:
        flag, shares, unit = "--gpus-per-trial", args.shares or [1.0, 0.5, 0.25], "GPU-hour"
    else:
        flag, shares, unit = "--cpus-per-trial", [float(ncores), 1.0] if ncores > 1 else [1.0], "CPU-node-hour"
    base = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="secsweep-packing-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    results = []
    try:
        values = gt.trial_values(args.small)
        data_root = args.data_root
        if not args.small and data_root is None:
            from secsweep import data as data_mod
            from secsweep.errors import DatasetMissingError

            try:
                data_mod.check_available("cifar10")
            except DatasetMissingError:
                data_root = str(gt.fake_cifar10(base / "data"))
        storage, uri = base / "ray_results", f"sqlite:///{base / 'mlflow.db'}"
        ov = _bench("overhead")
        t = time.perf_counter()
        gt.precompute_stage(values, storage / "stages", data_root, base / "precompute", "cuda" if cuda else "cpu")
        ov.init_mlflow_store(uri)
        print(f"untimed: backdoored model and MLflow store in {time.perf_counter() - t:.1f} s", flush=True)
        for share in shares:
            cpus = args.cpus_per_trial or max(1.0, float(int(ncores * share)))
            print(f"\n== {n} trials at {flag} {share:g}", flush=True)
            results.append(run_share(values, n, storage, uri, data_root, flag, share, cpus, args.fast_path))
        where = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "CPU (script check only: not a packing measurement)"
        print(f"\n== packing on {where}: {n} SFT trials ({values['model']} on {values['dataset']}, "
              f"{values['epochs']} epochs) per share")
        ref = results[0]["trials_per_device_hour"]
        for r in results:
            peak = (f"peak memory per trial {max(r['peak_mem_gib']):.2f} GiB (max over trials)"
                    if r["peak_mem_gib"] else "peak memory n/a (CPU)")
            print(f"{flag} {r['share']:<5g}: span {r['span_s']:7.1f} s, {r['trials_per_device_hour']:8.1f} trials per "
                  f"{unit}, x{r['trials_per_device_hour'] / ref:.2f} vs {results[0]['share']:g}; {peak}; "
                  f"{r['finished']}/{n} finished; wall with Ray start-up {r['wall_with_ray_s']:.1f} s")
        if cuda and 0.25 in [r["share"] for r in results]:
            gain = next(r for r in results if r["share"] == 0.25)["trials_per_device_hour"] / ref
            print(f"gain at 0.25: x{gain:.2f}   (goal >= {GOAL:g}x)")
        ok = all(r["exit_code"] == 0 and r["finished"] == n for r in results)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": where, "results": results, "values": values,
                                                   "versions": gt.versions()}, indent=2, default=str))
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
