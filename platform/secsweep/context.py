"""The Context: everything a trainable may use of the platform.

Trainables never import ray or mlflow; they receive a Context and use its device, data location,
`report()` (metrics each epoch, with the state to resume from), `restored()`, `artifact_path()`,
`stage()` (a cached upstream stage, e.g. the backdoored model) and `save_output()`. `LocalContext`
runs a trainable in a plain Python loop (tests, the overhead benchmark, stage computation); the
runtime module adds contexts that report to Ray Tune or Ray Train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import accel
from .names import DEVICE_HOURS, EPOCH, IMPLANTED
from .ops.metrics import with_der
from .stages import CHECKPOINT, StageOutput, StageStore, code_fingerprint, save_tensors

log = logging.getLogger(__name__)


class Context:
    """Base context. Subclasses override `_emit` (where reports go) and `restored`."""

    rank = 0        # this worker's rank in a multi-worker (DDP) trial
    objectives: tuple[str, ...] = ()  # the sweep's objective metrics (NaN for trials that must not be selected)
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
        fast: accel.FastPath | None = None,
        run_info: Mapping[str, Any] | None = None,
    ):
        self.workdir = Path(workdir)
        # what is running here (trainable, resolved config, code digest): the provenance model
        # artifacts carry (`save_model`); set by the runtime and by `stage`
        self.run_info: dict[str, Any] = dict(run_info or {})
        self._cards: dict[int, Any] = {}  # id(model) -> the ModelCard it was loaded from (`card_of`)
        self.device = torch.device(device)
        # how this trial uses its device (secsweep.accel): given by the runtime, else the device's
        # default (the fast path on CUDA, the reference path on the CPU); the evaluation loops follow it
        self.fast = fast if fast is not None else accel.FastPath.resolve(None, self.device)
        accel.activate(self.fast)
        self.data_root = data_root
        self.download = download
        self.stage_root = Path(stage_root) if stage_root else self.workdir / "stages"
        # device-hours = wall-hours x devices held (GPUs, or 1 CPU process): GPU-hours as the paper counts them
        self.devices_per_trial = devices_per_trial
        self.output_dir = Path(output_dir) if output_dir else self.workdir / "outputs"
        self._start = time.monotonic()
        self._stage_seconds = 0.0  # time spent computing upstream stages, not charged to this trial
        self._uncharged_seconds = 0.0  # checkpoint writes, plots: platform I/O, not charged (see device_hours)
        self._uncharged_depth = 0
        self._hours_offset = 0.0   # device-hours of earlier runs of this trial (resume)

    # -- time ---------------------------------------------------------------------------------
    def device_hours(self) -> float:
        """Device-hours charged to this trial so far: (wall-hours since this context was created,
        less the uncharged time) x the devices the trial holds (GPUs, fractions included; 1 per CPU
        process), plus the device-hours of its earlier runs when it resumed from a checkpoint.

        Never charged, to every trial alike: computing or waiting for upstream stages (`stage`),
        decoding dataset files (the runtime decodes them before it creates the context, so a trial
        that finds them decoded by an earlier trial of its process costs the same as one that does
        not), checkpoint writes (inside `report`), and whatever a trainable wraps in `uncharged()`
        (plots). Always charged: everything else the trainable does, including converting and
        resizing the decoded pixels, building models, training and evaluation. The work a resumed
        trial redoes (loading, the epoch after its last checkpoint) is charged again: it was spent.
        """
        wall = time.monotonic() - self._start - self._stage_seconds - self._uncharged_seconds
        return self._hours_offset + max(wall, 0.0) / 3600.0 * self.devices_per_trial

    @contextlib.contextmanager
    def uncharged(self):
        """A block whose wall time is not charged to device_hours (platform I/O: plots, checkpoint
        writes); nesting counts the time once."""
        self._uncharged_depth += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._uncharged_depth -= 1
            if self._uncharged_depth == 0:
                self._uncharged_seconds += time.monotonic() - t0

    # -- reporting ----------------------------------------------------------------------------
    def report(self, metrics: Mapping[str, Any], *, state: Mapping[str, Any] | None = None) -> None:
        """Report one epoch's metrics; `state` (tensors and numbers) is what a restart resumes from."""
        out = with_der(metrics)
        if out.get(IMPLANTED) == 0.0:  # a defense of a backdoor that never took: no objective may select it
            out.update({k: float("nan") for k in self.objectives if k in out})
        out.setdefault(DEVICE_HOURS, self.device_hours())
        if self.device.type == "cuda":  # what a GPU share must hold (bench/packing.py); no host sync
            out.setdefault(accel.PEAK_MEMORY, torch.cuda.max_memory_allocated(self.device) / 2**30)
        if state is not None:
            state = {**state, "_device_hours": out[DEVICE_HOURS]}
        with self.uncharged():  # writing the checkpoint (and, on Ray Train, waiting for the other ranks)
            self._emit(out, state)

    def _emit(self, metrics: dict[str, Any], state: Mapping[str, Any] | None) -> None:
        raise NotImplementedError

    @property
    def checkpoint_every(self) -> int:
        """Epochs between checkpoints (`accel.FastPath.checkpoint_every`)."""
        return self.fast.checkpoint_every

    def checkpoint_due(self, epoch: int, last: bool = False) -> bool:
        """Whether the report of (1-based) `epoch` should carry the resume state: every
        `checkpoint_every` epochs and always the `last` one. A trainable builds its state only when
        it is due (`backdoor.fit`), so the epochs in between skip the copy and the write; a restart
        resumes from the newest due epoch and redoes the ones after it with the same seeds."""
        k = self.checkpoint_every
        return last or k <= 1 or int(epoch) % k == 0

    def restored(self) -> dict[str, Any] | None:
        """The `state` of the last report before a restart, or None on a fresh start."""
        return None

    def _resumed_from(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        if state is not None and not getattr(self, "_resume_applied", False):
            # the clock keeps running from this run's start: what this run spent before asking for
            # its state (loading data, building the model) was spent too
            self._hours_offset = float(state.get("_device_hours", 0.0))
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

    def save_model(self, name: str, model: nn.Module, arch: str, args: Mapping[str, Any], role: str, *,
                   input: "artifacts.InputContract | None" = None) -> Path:
        """Save `model` (built as `secsweep.models.build(arch, args)`) as the model artifact `name`:
        safetensors weights and a model card with its architecture, role, input contract and this
        run's provenance (`secsweep.artifacts`). Consumers rebuild it with `load_model`."""
        from . import artifacts

        card = artifacts.card_for(model, arch, args, role, input=input)
        card = dataclasses.replace(card, provenance=dict(self.run_info))
        if self.rank != 0:
            return self.output_dir / f"{name}.safetensors"
        return artifacts.save(self.output_dir, name, model, card)

    def load_model(self, ref: Any, name: str | None = None, *, role: str | tuple[str, ...] | None = None,
                   cfg: Any = None) -> tuple[nn.Module, "artifacts.ModelCard"]:
        """The model artifact `name` of an upstream stage, rebuilt from its card and on this trial's
        device: `ref` is a `StageRef` (computed once, cached), a trainable name with `cfg`, or a
        `StageOutput` already in hand. `name` defaults to the first output the stage's kind
        declares ("encoder" for encoders, "model" for classifiers); `role` refuses any other role."""
        out = ref if isinstance(ref, StageOutput) else self.stage(ref, cfg)
        model, card = self._load_artifact(out, ref, name, role)
        self._cards[id(model)] = card
        return model, card

    def card_of(self, model: nn.Module) -> "artifacts.ModelCard | None":
        """The card of a model this context loaded (`load_model`), to save it again as what it is."""
        return getattr(self, "_cards", {}).get(id(getattr(model, "module", model)))

    def _load_artifact(self, out, ref, name, role):
        from . import artifacts, registry
        from .refs import StageRef

        if name is None:
            trainable = ref.trainable if isinstance(ref, StageRef) else (
                ref if isinstance(ref, str) else out.manifest.get("stage", ""))
            declared = registry.get(trainable).contract.outputs if trainable else {}
            name = next(iter(declared), "model")
        return artifacts.load(out.path, name, role=role, device=self.device)

    # -- upstream stages ----------------------------------------------------------------------
    # seconds to wait for another process computing the same stage; None: $SECSWEEP_STAGE_LOCK_TIMEOUT_S
    # or 6 h (secsweep.stages.lock_timeout_from_env)
    stage_lock_timeout_s: float | None = None

    def stage(self, trainable: Any, cfg: Any = None) -> StageOutput:
        """Run (once, cached) the trainable `trainable` with `cfg` as an upstream stage of this trial;
        `trainable` may instead be a `secsweep.refs.StageRef` (then `cfg` is its config).

        The cache key covers `cfg` and the code (secsweep.stages.code_fingerprint of the package and
        the trainable's module). The computation checkpoints every report that carries `state` into
        the stage's work folder, so a computation whose worker died resumes at its last epoch.
        """
        t0 = time.monotonic()  # from here on: stage time, not charged to this trial (device_hours)
        from . import provenance, registry  # late: registry imports trainables, which import this module
        from .config import to_dict
        from .refs import StageRef, upstream_modules

        if isinstance(trainable, StageRef):
            trainable, cfg = trainable.trainable, trainable.config()
        if cfg is None:
            raise TypeError("stage(trainable, cfg): the config of the stage is missing")
        spec = registry.get(trainable)
        code = code_fingerprint([spec.fn.__module__, *upstream_modules(cfg)])

        def compute(outdir: Path, workdir: Path):
            sub = LocalContext(
                workdir=workdir / "run",
                output_dir=outdir,
                device=self.device,
                data_root=self.data_root,
                download=self.download,
                stage_root=self.stage_root,
                checkpoint=workdir / CHECKPOINT,
                fast=self.fast,
                run_info={"trainable": trainable, "config": to_dict(cfg), "code": code.digest},
            )
            resumed = len(sub.history)
            if resumed:
                log.info("resuming stage %s from its checkpoint after %d reports", trainable, resumed)
            else:
                log.info("computing stage %s", trainable)
            spec.fn(cfg, sub)
            last = sub.history[-1] if sub.history else {}
            meta: dict[str, Any] = {"history": sub.history}
            if resumed:
                meta["resumed"] = {"reports": resumed, EPOCH: sub.history[resumed - 1].get(EPOCH)}
            return last, meta

        try:
            return StageStore(self.stage_root).get_or_compute(
                trainable, cfg, compute, code=code, usage=provenance.sweep_label(),
                provenance=provenance.current().as_dict(), lock_timeout_s=self.stage_lock_timeout_s)
        finally:
            self._stage_seconds += time.monotonic() - t0

    # -- distributed --------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model to the trial's device in the fast path's memory format (and compile it,
        if asked: `accel.prepare_model`); multi-worker contexts also wrap it for DDP."""
        return accel.prepare_model(model.to(self.device), self.fast)

    def shard(self, n: int) -> torch.Tensor:
        """Positions (into an epoch's order of `n` samples) this worker trains on, all of them on a
        single worker.

        Every rank gets the same number, ceil(n / world_size), as torch's DistributedSampler does
        by default: the order is padded by wrapping around to its start until its length is a
        multiple of world_size, then rank r takes positions r, r + world_size, ... Equal shards give
        every rank the same number of steps (DDP deadlocks on the first step one rank lacks).
        Padding rather than dropping the tail keeps every sample in every epoch (at most
        world_size - 1 of them are seen twice; which ones changes with the epoch's permutation), so
        a multi-worker epoch covers what a one-worker epoch covers. With a global batch split as
        `worker_batch` does, batch j of all ranks together is positions [j*B, (j+1)*B) of the
        padded order: the one-worker trial's batch j.
        """
        if n <= 0:
            return torch.arange(0)
        total = -(-n // self.world_size) * self.world_size
        return torch.arange(self.rank, total, self.world_size) % n

    def worker_batch(self, batch_size: int, field: str = "batch_size") -> int:
        """Samples per step on this worker for the global batch `batch_size` (samples per optimizer
        step summed over all workers): batch_size // world_size; refuses a batch that does not split
        evenly, so that every worker count trains the same recipe."""
        if batch_size % self.world_size:
            from .config import fail

            fail(field, batch_size, f"must be divisible by the number of workers ({self.world_size}): "
                                    "it is the global batch, split evenly across workers")
        return batch_size // self.world_size

    def all_reduce_mean(self, value: float) -> float:
        return value


class LocalContext(Context):
    """Runs a trainable in-process and keeps its reports: plain loops, tests, stages, benchmarks.

    With `checkpoint` (a file path), every report that carries `state` is also saved there
    (torch.save, replaced atomically) together with the reports so far; a new LocalContext on the same
    path starts from it (`restored()` returns that state, `history` holds the earlier reports), so a
    computation killed midway continues at its last epoch. The file holds tensors and plain numbers
    only and is read with torch.load(weights_only=True).
    """

    def __init__(self, *, on_report: Callable[[dict[str, Any]], None] | None = None, state: dict | None = None,
                 checkpoint: str | os.PathLike | None = None, **kw):
        super().__init__(**kw)
        self.history: list[dict[str, Any]] = []
        self.last_state: dict[str, Any] | None = None
        self._on_report = on_report
        self._initial_state = state
        self.checkpoint = Path(checkpoint) if checkpoint else None
        if self.checkpoint is not None and state is None and self.checkpoint.is_file():
            saved = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            self._initial_state = saved["state"]
            self.history = list(saved.get("history", []))

    def _emit(self, metrics, state):
        self.history.append(metrics)
        if state is not None:
            self.last_state = dict(state)
            if self.checkpoint is not None:
                self._save_checkpoint(self.last_state)
        if self._on_report:
            self._on_report(metrics)
        log.debug("report %s", metrics)

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(f"{self.checkpoint.name}.tmp-{os.getpid()}")
        history = [{k: (float(v) if isinstance(v, numbers.Real) else str(v)) for k, v in m.items()}
                   for m in self.history]  # plain floats: weights_only loading refuses numpy scalars
        torch.save({"state": state, "history": history}, tmp)
        os.replace(tmp, self.checkpoint)  # a kill mid-write leaves the previous epoch's checkpoint intact

    def restored(self):
        return self._resumed_from(self._initial_state)
