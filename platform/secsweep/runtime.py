"""Running trainables inside Ray: the Tune trial entry point and the multi-worker (Ray Train) path.

One code path for the trainable: `fn(cfg, ctx)`. A single-device trial runs it in the Tune trial
process with a `TuneContext`; a multi-worker trial (`num_workers > 1`) launches a Ray Train V2
`TorchTrainer` from inside the Tune trial, whose workers run the same function with a
`TrainContext` (DDP), and `TuneReportCallback` forwards rank 0's reports to Tune.

Checkpoints hold `state.pt` (the trainable's resume state: tensors and numbers, read back with
`torch.load(weights_only=True)`) and `artifacts/` (the trial's plots), so a restarted trial resumes at
its last epoch and its files reach the driver through Ray's own storage sync, on any storage path.
"""

from __future__ import annotations

import logging
import numbers
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import accel, registry
from .context import Context

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
ARTIFACTS = "artifacts"
PARAMS_KEY = "params"  # Tune config key holding the trainable's config values
TRAINABLE_KEY = "trainable"

# keys Tune adds to every result; not metrics of the method
TUNE_KEYS = {
    "time_this_iter_s", "time_total_s", "timestamp", "training_iteration", "time_since_restore",
    "iterations_since_restore", "pid", "done", "checkpoint_dir_name", "should_checkpoint", "node_ip",
    "timesteps_total", "episodes_total", "timesteps_since_restore", "checkpoint_path",
}


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The method's numeric metrics of a Tune result, as floats.

    NaN and +-inf are kept: an undefined metric (e.g. ASR over no counted input) must reach Tune,
    MLflow (which stores NaN as NaN, and +-inf as the largest float) and the reports as what it is;
    dropping it would leave the previous epoch's value standing as the trial's last value.
    """
    return {
        k: float(v) for k, v in result.items()
        if k not in TUNE_KEYS and k != "config" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


@dataclass(frozen=True)
class RuntimeSettings:
    """Per-sweep settings every trial needs (picklable; shipped to the workers)."""

    stage_root: str
    data_root: str | None = None
    download: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    num_workers: int = 1          # > 1: a Ray Train TorchTrainer with this many DDP workers per trial
    storage_path: str = ""
    objectives: tuple[str, ...] = ()  # the sweep's objective metrics (Context.objectives)
    fast_path: str | None = None  # accel.MODES (--fast-path); None: $SECSWEEP_FAST_PATH, else auto
    checkpoint_every: int = 0     # epochs between checkpoints; 0 = the fast path's default (secsweep.accel)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(gpus: float) -> str:
    """"cuda" for a trial that holds GPUs, else "cpu". A trial that holds a GPU torch cannot see fails
    rather than train on the CPU while it is charged GPU-hours (the sweep refuses --gpus-per-trial
    without GPUs before launch; this is a node whose CUDA set-up is broken)."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        from .errors import SecsweepError

        raise SecsweepError(f"--gpus-per-trial={gpus}: this trial holds a GPU but torch sees none "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return "cuda"


def write_checkpoint_dir(directory: Path, state: dict | None, artifacts: Path | None) -> Path:
    if state is not None:
        torch.save(state, directory / STATE_FILE)
    if artifacts is not None and artifacts.is_dir():
        shutil.copytree(artifacts, directory / ARTIFACTS, dirs_exist_ok=True)
    return directory


def read_checkpoint_dir(directory: Path, workdir: Path) -> dict | None:
    """Load the resume state (weights_only: checkpoints are data, never code) and restore artifacts."""
    if (directory / ARTIFACTS).is_dir():
        shutil.copytree(directory / ARTIFACTS, workdir / ARTIFACTS, dirs_exist_ok=True)
    f = directory / STATE_FILE
    return torch.load(f, map_location="cpu", weights_only=True) if f.exists() else None


class TuneContext(Context):
    """Reports to Ray Tune from the trial process, with a checkpoint per report that has state."""

    def __init__(self, **kw):
        super().__init__(**kw)
        from ray import tune

        self._tune = tune
        ckpt = tune.get_checkpoint()
        self._state = None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self._state = read_checkpoint_dir(Path(d), self.workdir)

    def _emit(self, metrics, state):
        if state is None:
            self._tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint_dir(Path(d), state, self.workdir / ARTIFACTS)
            self._tune.report(metrics, checkpoint=self._tune.Checkpoint.from_directory(d))

    def restored(self):
        return self._resumed_from(self._state)


class TrainContext(Context):
    """A Ray Train worker: DDP model, sharded data, every rank reports, rank 0 checkpoints."""

    def __init__(self, **kw):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        super().__init__(device=ray.train.torch.get_device(), **kw)
        self._train = ray.train
        self._state = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self._state = read_checkpoint_dir(Path(d), self.workdir)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(accel.prepare_model(model, self.fast))

    def all_reduce_mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).item()

    def _emit(self, metrics, state):
        if state is None or self.rank != 0:
            self._train.report(metrics)  # every rank must report (Train synchronises on it)
            return
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint_dir(Path(d), state, self.workdir / ARTIFACTS)
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(d))

    def restored(self):
        return self._resumed_from(self._state)


def _build(config: dict) -> tuple[registry.TrainableSpec, Any]:
    values = dict(config[PARAMS_KEY])
    spec = registry.get(values.pop(TRAINABLE_KEY))
    return spec, spec.build_config(values)


def predecode(cfg: Any, settings: RuntimeSettings) -> None:
    """Decode the dataset files the trial reads (its `dataset` and `target_dataset`, both splits)
    into the per-process cache before its Context, and so its device-hours clock, starts.

    With actor reuse, only the first trial of a process would otherwise pay the decoding; this way
    no trial does (see Context.device_hours). A missing dataset raises here, as it would in the
    trainable.
    """
    from . import data as data_mod

    names = {getattr(cfg, f, None) for f in ("dataset", "target_dataset")}
    gtsrb_size = getattr(cfg, "image_size", 0) or data_mod.native_shape("gtsrb")[1]
    for name in sorted(n for n in names if isinstance(n, str) and n in data_mod.DATASETS):
        for split in ("train", "test"):  # the splits stored in files (a validation split is cut from train)
            data_mod._raw(name, split, settings.data_root, settings.download, gtsrb_size)


def _train_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker of a multi-worker trial."""
    settings: RuntimeSettings = loop_config["settings"]
    spec, cfg = _build(loop_config["config"])
    seed_everything(getattr(cfg, "seed", 0))
    predecode(cfg, settings)
    import ray.train.torch

    device = ray.train.torch.get_device()
    accel.bound_trial(device, settings.gpus_per_trial, settings.cpus_per_trial)
    ctx = TrainContext(
        workdir=Path(loop_config["workdir"]) / f"rank{os.environ.get('RANK', '0')}",
        data_root=settings.data_root, download=settings.download, stage_root=settings.stage_root,
        devices_per_trial=(settings.gpus_per_trial or 1.0) * settings.num_workers,
        fast=accel.FastPath.resolve(settings.fast_path, device, checkpoint_every=settings.checkpoint_every),
    )
    ctx.objectives = settings.objectives
    spec.fn(cfg, ctx)


def trial_entry(config: dict, settings: RuntimeSettings, ledger_dir: str | None = None) -> None:
    """The Tune function trainable: resolve the config, seed, and run the trainable.

    `ledger_dir` (the experiment folder) holds the driver's record of completed trials and of every
    checkpoint (`secsweep.ledger`), which can be newer than Tune's experiment snapshot after a
    killed driver: a trial recorded as done reports its recorded final result (or fails again) at
    once, without training; any other resumes from the newest checkpoint the driver saw.
    """
    from ray import tune

    from . import ledger

    trial_id = tune.get_context().get_trial_id()
    done = ledger.completed(ledger_dir).get(trial_id)
    if done is not None:
        if done.get("status") == "FAILED":
            raise RuntimeError("trial failed in an earlier run of this sweep:\n" + str(done.get("error", "")))
        tune.report(dict(done.get("result", {})))
        return
    spec, cfg = _build(config)
    seed_everything(getattr(cfg, "seed", 0))
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    trial_dir = Path(tune.get_context().get_trial_dir())
    if settings.num_workers <= 1:
        predecode(cfg, settings)
        device = pick_device(settings.gpus_per_trial)
        # the trial's share of the node: CPU threads, and on CUDA its fraction of the GPU's memory
        accel.bound_trial(device, settings.gpus_per_trial, settings.cpus_per_trial)
        fast = accel.FastPath.resolve(settings.fast_path, device, checkpoint_every=settings.checkpoint_every)
        log.info("trial %s on %s: %s", trial_id, device, fast.describe())
        ctx = TuneContext(
            workdir=trial_dir, device=device, data_root=settings.data_root,
            download=settings.download, stage_root=settings.stage_root,
            devices_per_trial=settings.gpus_per_trial or 1.0,  # a GPU fraction counts as that fraction
            fast=fast,
        )
        newest = ledger.latest_checkpoint(ledger_dir, trial_id)
        if newest is not None:  # at least as new as the one Tune restored, if any
            with tune.Checkpoint(newest).as_directory() as d:
                ctx._state = read_checkpoint_dir(Path(d), ctx.workdir)
        ctx.objectives = settings.objectives
        spec.fn(cfg, ctx)
        return
    _run_train(config, settings, trial_dir, tune.get_context().get_trial_id())


def _run_train(config: dict, settings: RuntimeSettings, trial_dir: Path, trial_id: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = settings.gpus_per_trial > 0
    per_worker = {"CPU": settings.cpus_per_trial}
    if use_gpu:
        per_worker["GPU"] = settings.gpus_per_trial
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "settings": settings, "workdir": str(trial_dir)},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        # same name for a restarted trial: Train resumes from the run's latest checkpoint
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=settings.storage_path or str(trial_dir),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
