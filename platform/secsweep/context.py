"""The Context: everything a trainable may use of the platform.

Trainables never import ray or mlflow; they receive a Context and use its device, data location,
`report()` (metrics each epoch, with the state to resume from), `restored()`, `artifact_path()`,
`stage()` (a cached upstream stage, e.g. the backdoored model) and `save_output()`. `LocalContext`
runs a trainable in a plain Python loop (tests, the overhead benchmark, stage computation); the
runtime module adds contexts that report to Ray Tune or Ray Train.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .names import DEVICE_HOURS
from .stages import StageOutput, StageStore, save_tensors

log = logging.getLogger(__name__)


class Context:
    """Base context. Subclasses override `_emit` (where reports go) and `restored`."""

    rank = 0        # this worker's rank in a multi-worker (DDP) trial
    world_size = 1  # number of workers in the trial

    def __init__(
        self,
        *,
        workdir: str | os.PathLike,
        device: str | torch.device = "cpu",
        data_root: str | None = None,
        download: bool = False,
        stage_root: str | os.PathLike | None = None,
        devices_per_trial: float = 1.0,
        output_dir: str | os.PathLike | None = None,
    ):
        self.workdir = Path(workdir)
        self.device = torch.device(device)
        self.data_root = data_root
        self.download = download
        self.stage_root = Path(stage_root) if stage_root else self.workdir / "stages"
        # device-hours = wall-hours x devices held (GPUs, or 1 CPU process): GPU-hours as the paper counts them
        self.devices_per_trial = devices_per_trial
        self.output_dir = Path(output_dir) if output_dir else self.workdir / "outputs"
        self._start = time.monotonic()
        self._stage_seconds = 0.0  # time spent computing upstream stages, not charged to this trial
        self._hours_offset = 0.0   # device-hours of earlier runs of this trial (resume)

    # -- time ---------------------------------------------------------------------------------
    def device_hours(self) -> float:
        wall = time.monotonic() - self._start - self._stage_seconds
        return self._hours_offset + wall / 3600.0 * self.devices_per_trial

    # -- reporting ----------------------------------------------------------------------------
    def report(self, metrics: Mapping[str, Any], *, state: Mapping[str, Any] | None = None) -> None:
        """Report one epoch's metrics; `state` (tensors and numbers) is what a restart resumes from."""
        out = dict(metrics)
        out.setdefault(DEVICE_HOURS, self.device_hours())
        if state is not None:
            state = {**state, "_device_hours": out[DEVICE_HOURS]}
        self._emit(out, state)

    def _emit(self, metrics: dict[str, Any], state: Mapping[str, Any] | None) -> None:
        raise NotImplementedError

    def restored(self) -> dict[str, Any] | None:
        """The `state` of the last report before a restart, or None on a fresh start."""
        return None

    def _resumed_from(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        if state is not None and not getattr(self, "_resume_applied", False):
            self._hours_offset = float(state.get("_device_hours", 0.0))
            self._start = time.monotonic()
            self._resume_applied = True
        return state

    # -- files --------------------------------------------------------------------------------
    def artifact_path(self, name: str) -> Path:
        """Path of a file (plot, table) to attach to this trial's MLflow run."""
        d = self.workdir / "artifacts"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def save_output(self, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Save tensors this trainable produces (weights, triggers) as safetensors."""
        if self.rank != 0:
            return self.output_dir / f"{name}.safetensors"
        return save_tensors(self.output_dir, name, tensors)

    # -- upstream stages ----------------------------------------------------------------------
    def stage(self, trainable: str, cfg: Any) -> StageOutput:
        """Run (once, cached) the trainable `trainable` with `cfg` as an upstream stage of this trial."""
        from . import registry  # late: registry imports trainables, which import this module

        spec = registry.get(trainable)
        module = __import__(spec.fn.__module__, fromlist=["_"])
        code_version = str(getattr(module, "VERSION", 1))
        t0 = time.monotonic()

        def compute(outdir: Path):
            sub = LocalContext(
                workdir=outdir.parent / (outdir.name + "-work"),
                output_dir=outdir,
                device=self.device,
                data_root=self.data_root,
                download=self.download,
                stage_root=self.stage_root,
            )
            log.info("computing stage %s", trainable)
            spec.fn(cfg, sub)
            last = sub.history[-1] if sub.history else {}
            return last, {"history": sub.history}

        try:
            return StageStore(self.stage_root).get_or_compute(trainable, cfg, compute, code_version=code_version)
        finally:
            self._stage_seconds += time.monotonic() - t0

    # -- distributed --------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model to the trial's device (multi-worker contexts also wrap it for DDP)."""
        return model.to(self.device)

    def shard(self, n: int) -> torch.Tensor:
        """Indices of `n` samples this worker trains on (all of them on a single worker)."""
        return torch.arange(self.rank, n, self.world_size)

    def all_reduce_mean(self, value: float) -> float:
        return value


class LocalContext(Context):
    """Runs a trainable in-process and keeps its reports: plain loops, tests, stages, benchmarks."""

    def __init__(self, *, on_report: Callable[[dict[str, Any]], None] | None = None, state: dict | None = None, **kw):
        super().__init__(**kw)
        self.history: list[dict[str, Any]] = []
        self.last_state: dict[str, Any] | None = None
        self._on_report = on_report
        self._initial_state = state

    def _emit(self, metrics, state):
        self.history.append(metrics)
        if state is not None:
            self.last_state = dict(state)
        if self._on_report:
            self._on_report(metrics)
        log.debug("report %s", metrics)

    def restored(self):
        return self._resumed_from(self._initial_state)
