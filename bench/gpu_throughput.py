"""Training throughput on the device: a stock PyTorch loop against the platform's loop, and one SFT
trial through the whole platform.

    python bench/gpu_throughput.py                 # CUDA: PreAct-ResNet18, 50,000 CIFAR-shaped images
    python bench/gpu_throughput.py --compile       # also the fast path with torch.compile
    python bench/gpu_throughput.py --small         # CPU smoke check: smallcnn, 2,000 images (< 2 min)

1. Images per second of one training epoch on random CIFAR-shaped tensors (uint8 levels / 255, as a
   decoded dataset), batch 512, SGD, same model and data for both:
   (a) stock: `DataLoader(TensorDataset(images, labels), shuffle=True)`, fp32, each batch copied to the
       device, `loss.item()` every step (the tutorial loop's running loss);
   (b) platform: `secsweep.training.train_epoch` under the trial's fast path (`secsweep.accel`; on by
       default on CUDA: resident uint8 data, bf16 autocast, channels_last, cudnn.benchmark, no host
       sync per step); (c) with --compile the same plus torch.compile.
   Each runs a few warm-up steps, then two timed epochs: epoch 1 includes one-time costs (the copy of
   the set to the device, cudnn.benchmark's and compile's searches), epoch 2 is the steady state.
   Printed: images/s of each and b/a (epoch 2), against the goal of one epoch of 50,000 in <= 1 s.
2. One 3-epoch SFT trial through `secsweep.sweep.run` (Ray, Tune, MLflow into a throwaway SQLite store,
   checkpoints, report): wall time with Ray start-up (the whole `run` call) and without it (Tune's
   time_total_s of the trial), and the device-hours the platform charges, against the goal of <= 6 s.
   The backdoored model (the attack stage) is computed before, untimed, as in bench/overhead.py.
   Data: CIFAR-10 if the platform finds it, else random images written in CIFAR-10's file layout into
   the work folder (no download: the timing does not depend on the pixels); --small uses digits.

Not a test: nothing here asserts a time. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

EPOCH_GOAL_S = 1.0   # one ResNet-18 epoch of 50,000 32x32 images on an H100-class GPU
TRIAL_GOAL_S = 6.0   # one 3-epoch SFT trial (PreAct-ResNet18, CIFAR-10) on an H100-class GPU


def _overhead():
    """bench/overhead.py as a module (tune_trials, precompute_stages, init_mlflow_store)."""
    spec = importlib.util.spec_from_file_location("_bench_overhead", Path(__file__).with_name("overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, Any]:
    import torch

    out = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cudnn"] = torch.backends.cudnn.version()
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


# -- 1. epoch throughput -------------------------------------------------------------------------

def random_set(n: int, shape: tuple[int, int, int], classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8).float().div_(255)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images, labels


def build(model_name: str, shape, classes: int, device):
    import torch

    from secsweep.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, classes, in_channels=shape[0], image_size=shape[1]).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def stock_epochs(model_name, images, labels, classes, device, batch: int, epochs: int, warmup: int) -> list[float]:
    """(a): seconds per epoch of the DataLoader loop."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    model, opt = build(model_name, images.shape[1:], classes, device)
    model.train()
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True,
                        pin_memory=device.type == "cuda", num_workers=0)

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for i, (x, y) in enumerate(loader):
        if i >= warmup:
            break
        step(x, y)
    times = []
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        running = 0.0
        for x, y in loader:
            running += step(x, y)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def platform_epochs(model_name, images, labels, classes, device, batch: int, epochs: int, warmup: int,
                    mode: str, workdir: Path) -> tuple[list[float], str]:
    """(b)/(c): seconds per epoch of secsweep.training.train_epoch under the fast path `mode`."""
    from secsweep import accel
    from secsweep.context import LocalContext
    from secsweep.training import train_epoch

    fast = accel.FastPath.resolve(mode, device)
    ctx = LocalContext(workdir=workdir, device=device, fast=fast)
    model, _ = build(model_name, images.shape[1:], classes, device)
    model = ctx.prepare_model(model)
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    n_warm = min(len(labels), warmup * batch)
    wx, wy = images[:n_warm].clone(), labels[:n_warm].clone()  # its own (small) resident copy
    train_epoch(model, wx, wy, opt, ctx, batch_size=batch, seed=1, epoch=0)
    times = []
    for e in range(epochs):
        sync(device)
        t = time.perf_counter()
        train_epoch(model, images, labels, opt, ctx, batch_size=batch, seed=0, epoch=e)
        sync(device)
        times.append(time.perf_counter() - t)
    accel.activate(accel.REFERENCE)
    accel.clear_cache()
    return times, fast.describe()


# -- 2. one SFT trial through the platform -----------------------------------------------------------

def fake_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000) -> Path:
    """Random images in CIFAR-10's python layout (`cifar-10-batches-py/`) under `root`."""
    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = n_train // 5
    for name, n in [*((f"data_batch_{i}", per) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def trial_values(small: bool) -> dict[str, Any]:
    if small:
        return {"trainable": "sft", "attack": "badnets", "dataset": "digits", "model": "smallcnn",
                "attack_epochs": 6, "attack_lr": 0.05, "attack_batch_size": 32, "epochs": 3, "phase1_epochs": 2.0}
    from secsweep.presets import paper_fixed

    # the paper's recipe (PreAct-ResNet18, CIFAR-10, batch 256, crop+flip) with 3 SFT epochs; the
    # backdoor (untimed stage) trains 1 epoch: the pixels are random, only the timing matters
    return {**paper_fixed(), "trainable": "sft", "attack": "badnets", "attack_epochs": 1, "epochs": 3,
            "phase1_epochs": 2.0, "ramp_steps": 0}


def precompute_stage(values: dict[str, Any], stage_root: Path, data_root: str | None, workdir: Path, device) -> None:
    """The defense's backdoored model (its attack stage), computed on `device` before any timing."""
    from secsweep import accel, registry
    from secsweep.context import LocalContext

    trial = dict(values)
    cfg = registry.get(trial.pop("trainable")).build_config(trial)
    ctx = LocalContext(workdir=workdir, stage_root=stage_root, data_root=data_root, device=device)
    ctx.stage(cfg.attack, cfg.attack_config())
    accel.activate(accel.REFERENCE)
    accel.clear_cache()


def run_trial(values: dict[str, Any], base: Path, data_root: str | None, gpus: float, fast_path: str | None):
    """One trial through secsweep.sweep.run; returns (wall with Ray start-up, trial row, exit code)."""
    from secsweep import sweep as sweep_mod

    ov = _overhead()
    storage, uri = base / "ray_results", f"sqlite:///{base / 'mlflow.db'}"
    trial = dict(values)
    trainable = trial.pop("trainable")
    sweep = sweep_mod.Sweep(name="bench_sft_trial", trainable=trainable, fixed=trial, grid=[{}],
                            source=str(Path(__file__).resolve()))
    precompute_stage(values, storage / "stages", data_root, base / "precompute", "cuda" if gpus else "cpu")
    ov.init_mlflow_store(uri)
    argv = ["--storage-path", str(storage), "--tracking-uri", uri, "--max-failures", "0"]
    if data_root:
        argv += ["--data-root", data_root]
    if gpus:
        argv += ["--gpus-per-trial", str(gpus)]
    if fast_path:
        argv += ["--fast-path", fast_path]
    os.environ.pop("RAY_ADDRESS", None)
    t = time.perf_counter()
    rc = sweep_mod.run(sweep, argv)
    wall = time.perf_counter() - t
    rows = ov.tune_trials(storage, sweep.name)
    last = {}
    for p in sorted(storage.glob(f"{sweep.name}-*/*/result.json")):
        lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        if lines:
            last = lines[-1]
    return wall, (rows[0] if rows else {}), last, rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU smoke check: smallcnn, 2,000 images, digits trial")
    p.add_argument("--images", type=int, default=None, help="images per epoch (default 50,000; --small 2,000)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per step (default 512)")
    p.add_argument("--model", default=None, help="default preact_resnet18 (--small: smallcnn)")
    p.add_argument("--compile", action="store_true", help="also measure the fast path with torch.compile")
    p.add_argument("--fast-path", default=None, choices=("auto", "on", "off", "compile"),
                   help="the platform's mode for (b) and the trial (default: auto, on for CUDA)")
    p.add_argument("--skip-trial", action="store_true", help="only the epoch throughput")
    p.add_argument("--data-root", default=None, help="dataset folder for the trial (default: search, else random CIFAR-10 files)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("error: no CUDA device: this benchmark measures the GPU path; run it on a GPU, or pass --small "
              "for a CPU smoke check of the script (its numbers say nothing about the GPU goals)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    label = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "CPU (smoke check; GPU goals not comparable)"
    n = args.images or (2_000 if args.small else 50_000)
    model = args.model or ("smallcnn" if args.small else "preact_resnet18")
    base = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="secsweep-gpu-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    if not cuda:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    numbers: dict[str, Any] = {"device": label, "images": n, "model": model, "batch_size": args.batch_size,
                               "versions": versions()}
    try:
        images, labels = random_set(n, (3, 32, 32), 10)
        warmup = 3 if args.small else 20
        print(f"== epoch throughput on {label}: {model}, {n} images 3x32x32, batch {args.batch_size}", flush=True)
        a = stock_epochs(model, images, labels, 10, device, args.batch_size, 2, warmup)
        print(f"(a) stock DataLoader loop, fp32      : epoch 1 {a[0]:7.2f} s, epoch 2 {a[1]:7.2f} s = "
              f"{n / a[1]:9.0f} images/s", flush=True)
        b, how_b = platform_epochs(model, images, labels, 10, device, args.batch_size, 2, warmup,
                                   args.fast_path or "auto", base / "b")
        print(f"(b) secsweep train_epoch              : epoch 1 {b[0]:7.2f} s, epoch 2 {b[1]:7.2f} s = "
              f"{n / b[1]:9.0f} images/s   [{how_b}]", flush=True)
        numbers.update(a_epoch_s=a, b_epoch_s=b, b_path=how_b, ratio_b_over_a=a[1] / b[1])
        print(f"ratio b/a (images/s, epoch 2)         : {a[1] / b[1]:.2f}")
        if args.compile:
            c, how_c = platform_epochs(model, images, labels, 10, device, args.batch_size, 2, warmup, "compile",
                                       base / "c")
            print(f"(c) secsweep + torch.compile          : epoch 1 {c[0]:7.2f} s, epoch 2 {c[1]:7.2f} s = "
                  f"{n / c[1]:9.0f} images/s   [{how_c}]; c/a {a[1] / c[1]:.2f}")
            numbers.update(c_epoch_s=c, c_path=how_c, ratio_c_over_a=a[1] / c[1])
        best = min(b[1], numbers.get("c_epoch_s", [0, float("inf")])[1])
        per_50k = best * 50_000 / n
        print(f"epoch of 50,000 images (scaled)       : {per_50k:.2f} s   (goal <= {EPOCH_GOAL_S:g} s on an H100-class GPU)")
        numbers["epoch_50k_s"] = per_50k
        del images, labels

        if not args.skip_trial:
            values = trial_values(args.small)
            data_root = args.data_root
            if not args.small and data_root is None:
                from secsweep import data as data_mod
                from secsweep.errors import DatasetMissingError

                try:
                    data_mod.check_available("cifar10")
                except DatasetMissingError:
                    data_root = str(fake_cifar10(base / "data"))
                    print(f"(CIFAR-10 not found: random images in its layout under {data_root})")
            gpus = 1.0 if cuda else 0.0
            print(f"\n== one SFT trial through the platform ({values['model']} on {values['dataset']}, "
                  f"{values['epochs']} epochs) on {label}", flush=True)
            wall, row, last, rc = run_trial(values, base / "trial", data_root, gpus, args.fast_path)
            inside = float(last.get("time_total_s", float("nan")))
            dh = float(last.get("device_hours", float("nan")))
            print(f"wall, Ray start-up included           : {wall:7.1f} s   (secsweep.sweep.run, exit code {rc})")
            print(f"wall, Ray start-up excluded           : {inside:7.1f} s   (Tune time_total_s of the trial; "
                  f"goal <= {TRIAL_GOAL_S:g} s on an H100-class GPU)")
            unit = "GPU-hours" if cuda else "device-hours (1 CPU process)"
            print(f"charged by the platform               : {dh:.5f} {unit} = {dh * 3600 / max(gpus, 1):.1f} s "
                  f"(stages, decoding and checkpoint writes not charged)")
            numbers.update(trial_wall_with_ray_s=wall, trial_wall_without_ray_s=inside, trial_device_hours=dh,
                           trial_exit_code=rc, trial_values=values, trial_status=row.get("status"))
        if args.json:
            Path(args.json).write_text(json.dumps(numbers, indent=2, default=str))
            print(f"numbers written to {args.json}")
        return 0 if numbers.get("trial_exit_code", 0) == 0 else 1
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
