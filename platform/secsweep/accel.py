"""The fast path: how a trial uses its device, chosen by the platform (the Context), never by a trainable.

`FastPath` bundles the settings; `FastPath.resolve(mode, device)` picks them. Mode "auto" (the
default) turns the fast path on for a CUDA device and off on the CPU, where the plain loop stays the
reference path every test checks; "on" forces it (also on the CPU, where the CUDA-only parts stay
off), "off" forces the reference path, "compile" is "on" plus `torch.compile`. The sweep flag
`--fast-path` sets the mode; without it `$SECSWEEP_FAST_PATH` does, else "auto".

What the fast path changes:

* device-resident data (`device_data`): a training or evaluation set is copied to the device once
  (`resident`) and every batch is an index gather there, no per-batch host-to-device copy. Images
  whose float values are exactly `code / scale` for uint8 codes (scale 255, or 16 for `digits`;
  every image as `secsweep.data.load` decodes it, and patch triggers of 0/1 pixels) are kept as
  uint8 and converted per batch with the very operation `data.load` uses (`to(float32).div_(scale)`),
  so the batch is bit-identical to the float one. Images that are not (blended or warped triggers,
  resized or grey-averaged sets) are kept as float32 rows beside them; no pixel is ever rounded.
  A set with fewer than half its rows exact is kept as float32 on the device as a whole.
* bf16 autocast (`autocast_dtype`) of the forward pass and loss, where the device supports it:
  on CUDA by default (`torch.cuda.is_bf16_supported()`), off on the CPU unless
  `$SECSWEEP_AUTOCAST=bf16`. Parameters, optimizer state and BatchNorm's running statistics stay
  float32 (autocast only lowers the matmul/conv inputs; batch norm accumulates in float32).
* channels_last memory format of the model and of every 4-D batch; `cudnn.benchmark` on CUDA.
* `torch.compile` (`compile_backend`, off by default: compilation costs tens of seconds a process,
  more than a CPU-sized trial; mode "compile" uses "inductor", `$SECSWEEP_COMPILE_BACKEND` another).
* a checkpoint every `checkpoint_every` epochs (`Context.checkpoint_due`, `backdoor.fit`): every
  epoch on the reference path and on preemptible workers (`$SECSWEEP_PREEMPTIBLE=1`, which a spot
  node's environment sets), every `DEFAULT_CHECKPOINT_EVERY` epochs on the fast path otherwise;
  `$SECSWEEP_CHECKPOINT_EVERY` or `RuntimeSettings.checkpoint_every` overrides both. The last epoch
  always checkpoints.

What every path does (results unchanged): the training loss is summed on the device and read once
per epoch (`secsweep.training.train_epoch`), not with a host synchronisation per step.

The evaluation loops (`secsweep.training.batched_eval`) take a device, not a Context; they follow the
fast path of the Context created last in the process (`current()`; one trial runs per process at a
time). Evaluation always runs in float32: its numbers are the reference path's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off", "compile")
ENV_MODE = "SECSWEEP_FAST_PATH"
ENV_AUTOCAST = "SECSWEEP_AUTOCAST"            # "bf16" or "off": overrides the device's default
ENV_COMPILE_BACKEND = "SECSWEEP_COMPILE_BACKEND"
ENV_CHECKPOINT_EVERY = "SECSWEEP_CHECKPOINT_EVERY"
ENV_PREEMPTIBLE = "SECSWEEP_PREEMPTIBLE"
DEFAULT_CHECKPOINT_EVERY = 5  # epochs between checkpoints on the fast path on a non-preemptible worker
PEAK_MEMORY = "gpu_peak_mem_gib"  # metric of every CUDA trial's report: peak allocated GiB so far
UINT8_SCALES = (255.0, 16.0)  # uint8 codes -> [0, 1]: 8-bit images; scikit-learn digits (0..16)


@dataclass(frozen=True)
class FastPath:
    """How a trial uses its device (see the module docstring). The default is the reference path."""

    enabled: bool = False
    device_data: bool = False                 # training / evaluation sets resident on the device
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16; None = float32 throughout
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile_backend: str = ""                 # "" = no torch.compile
    checkpoint_every: int = 1                 # epochs between checkpoints (the last epoch always)

    @classmethod
    def resolve(cls, mode: str | None, device: str | torch.device, *, checkpoint_every: int = 0,
                env: dict | None = None) -> "FastPath":
        """The settings for `mode` (None: $SECSWEEP_FAST_PATH, else "auto") on `device`."""
        env = os.environ if env is None else env
        mode = mode or env.get(ENV_MODE) or "auto"
        if mode not in MODES:
            from .config import fail

            fail("fast_path", mode, f"must be one of {', '.join(MODES)}")
        device = torch.device(device)
        cuda = device.type == "cuda"
        on = mode in ("on", "compile") or (mode == "auto" and cuda)
        dtype = None
        if on:
            wanted = env.get(ENV_AUTOCAST, "").lower()
            if wanted == "bf16":
                dtype = torch.bfloat16
            elif wanted not in ("", "off"):
                from .config import fail

                fail(ENV_AUTOCAST, wanted, "must be bf16 or off")
            elif wanted == "" and cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                dtype = torch.bfloat16
        raw = checkpoint_every or env.get(ENV_CHECKPOINT_EVERY) or 0
        try:
            every = int(raw)
        except ValueError:
            every = -1
        if every < 0:
            from .config import fail

            fail("checkpoint_every" if checkpoint_every else ENV_CHECKPOINT_EVERY, raw,
                 "must be >= 1 epoch (0 = the fast path's default)")
        if not every:
            preemptible = env.get(ENV_PREEMPTIBLE, "").lower() in ("1", "true", "yes")
            every = DEFAULT_CHECKPOINT_EVERY if on and not preemptible else 1
        return cls(
            enabled=on, device_data=on, autocast_dtype=dtype, channels_last=on, cudnn_benchmark=on and cuda,
            compile_backend=(env.get(ENV_COMPILE_BACKEND) or "inductor") if mode == "compile" else "",
            checkpoint_every=every,
        )

    def describe(self) -> str:
        if not self.enabled:
            return f"reference path (checkpoint every {self.checkpoint_every} epoch(s))"
        dtype = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "fp32"
        parts = [f"autocast {dtype}", "device-resident data" if self.device_data else "host data",
                 "channels_last" if self.channels_last else "contiguous"]
        if self.cudnn_benchmark:
            parts.append("cudnn.benchmark")
        if self.compile_backend:
            parts.append(f"torch.compile({self.compile_backend})")
        parts.append(f"checkpoint every {self.checkpoint_every} epoch(s)")
        return "fast path: " + ", ".join(parts)


REFERENCE = FastPath()
_current: FastPath = REFERENCE


def activate(fast: FastPath) -> None:
    """Make `fast` the process's fast path (the Context does this when it is created): the
    evaluation loops follow it, and cudnn.benchmark is set from it."""
    global _current
    _current = fast
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark


def current() -> FastPath:
    return _current


def with_checkpoint_every(fast: FastPath, every: int) -> FastPath:
    return replace(fast, checkpoint_every=every)


# -- model and batches --------------------------------------------------------------------------

def prepare_model(model: nn.Module, fast: FastPath) -> nn.Module:
    """The model in the fast path's memory format, compiled in place if asked (`nn.Module.compile`
    keeps the module and its state_dict keys, so checkpoints and saved weights are unchanged)."""
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast.compile_backend and not getattr(model, "_secsweep_compiled", False):
        model.compile(backend=fast.compile_backend)
        model._secsweep_compiled = True
    return model


def format_batch(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    if fast.channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(fast: FastPath, device: torch.device):
    """The autocast region of a forward pass and loss (a null context on the reference path)."""
    if fast.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=fast.autocast_dtype)


# -- device-resident sets -----------------------------------------------------------------------

def _exact_codes(images: torch.Tensor, scale: float, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, rows that `codes.to(float32).div_(scale)` reproduces bit for bit)."""
    codes = torch.empty(images.shape, dtype=torch.uint8)
    exact = torch.empty(len(images), dtype=torch.bool)
    for i in range(0, len(images), chunk):  # chunks bound the float temporaries (CIFAR: 600 MB whole)
        x = images[i : i + chunk].detach().to("cpu", torch.float32)
        c = (x * scale).round_().clamp_(0, 255).to(torch.uint8)
        codes[i : i + chunk] = c
        exact[i : i + chunk] = (c.to(torch.float32).div_(scale) == x).flatten(1).all(1)
    return codes, exact


class ResidentImages:
    """A float image set (N, C, H, W) held on `device`: uint8 codes for the rows that convert back
    exactly, float32 for the others (see the module docstring); `take(index)` returns the float
    batch, equal bit for bit to `images[index]`."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.device = torch.device(device)
        self.shape = tuple(images.shape)
        self.scale = 0.0
        self.codes: torch.Tensor | None = None
        self.floats: torch.Tensor | None = None   # all rows (float set) or the inexact rows
        self.row_of: torch.Tensor | None = None   # (N,) position in `floats`, -1 for a uint8 row
        if images.dtype != torch.float32 or images.ndim != 4 or len(images) == 0:
            self.floats = images.detach().to(self.device)
            return
        best = None
        for scale in UINT8_SCALES:
            codes, exact = _exact_codes(images, scale)
            n = int(exact.sum())
            if best is None or n > best[0]:
                best = (n, scale, codes, exact)
            if n == len(images):
                break
        n, scale, codes, exact = best
        if 2 * n < len(images):
            self.floats = images.detach().to(self.device, torch.float32)
            return
        self.scale = scale
        self.codes = codes.to(self.device)
        if n < len(images):
            inexact = torch.nonzero(~exact).flatten()
            row_of = torch.full((len(images),), -1, dtype=torch.long)
            row_of[inexact] = torch.arange(len(inexact))
            self.row_of = row_of.to(self.device)
            self.floats = images[inexact].detach().to(self.device, torch.float32)
        log.debug("resident set %s on %s: %d uint8 rows (scale %g), %d float rows", self.shape, self.device,
                  n, scale, len(images) - n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.floats, self.row_of) if t is not None)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 images at `index` (a long tensor on any device), on the device."""
        index = index.to(self.device)
        if self.codes is None:
            return self.floats[index]
        x = self.codes[index].to(torch.float32).div_(self.scale)  # the conversion of secsweep.data.load
        if self.row_of is not None:
            pos = self.row_of[index]
            # a select, not a boolean-mask index: no host synchronisation on the nonzero count
            x = torch.where((pos >= 0)[:, None, None, None], self.floats[pos.clamp(min=0)], x)
        return x

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.take(torch.arange(start, min(stop, self.shape[0]), device=self.device))


class _ResidentCache:
    """Device copies of tensors, keyed by the tensor (weakly) and its version counter: an in-place
    change of the source (poisoning writes into its set) makes a new copy; a freed source frees it."""

    def __init__(self):
        self._entries: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}

    def get(self, tensor: torch.Tensor, device: torch.device, build):
        key = (id(tensor), str(torch.device(device)))
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]
        value = build(tensor, device)
        entries = self._entries
        ref = weakref.ref(tensor, lambda _r, k=key: entries.pop(k, None))
        entries[key] = (ref, tensor._version, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _ResidentCache()


def resident(images: torch.Tensor, device: str | torch.device) -> ResidentImages:
    """The device-resident copy of the image set `images` (made once per set and version)."""
    return _CACHE.get(images, torch.device(device), ResidentImages)


def resident_tensor(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A device copy of a plain tensor (labels), made once per tensor and version."""
    return _CACHE.get(t, torch.device(device), lambda x, d: x.detach().to(d))


def clear_cache() -> None:
    _CACHE.clear()


# -- fractional devices -------------------------------------------------------------------------

# -- the host allocator ---------------------------------------------------------------------------

ENV_MALLOC = "SECSWEEP_MALLOC_TUNING"  # "off" keeps glibc's defaults in trial processes
MALLOC_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and return to) the heap, not mmap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def tune_host_allocator(env: dict | None = None) -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the OS per batch.

    Ray Tune runs a function trainable in a thread of the trial process, and glibc serves a
    non-main thread from a secondary arena whose freed blocks of a few MB (activations, batches)
    are unmapped and faulted in again on the next batch: on the default SFT grid that doubled the
    minor page faults (10 M vs 5 M per three trials) and the kernel time of a trial against the same
    loop on the main thread, making it ~20 % slower (README, Benchmarks). Raising glibc's mmap and
    trim thresholds to `MALLOC_KEEP_BYTES` (the dynamic threshold glibc uses on the main thread does
    the same on a smaller scale) removes that: the process keeps up to that much freed memory for
    reuse. Linux/glibc only; `$SECSWEEP_MALLOC_TUNING=off` leaves the defaults. Returns whether the
    thresholds were set."""
    env = os.environ if env is None else env
    if str(env.get(ENV_MALLOC, "on")).strip().lower() in ("0", "off", "false", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no tunable thresholds)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES) == 1


def bound_trial(device: str | torch.device, gpus: float, cpus: float) -> None:
    """Hold a trial to its share of the node: `cpus` torch threads (at least one) and, on CUDA with
    a GPU fraction below 1, that fraction of the GPU's memory (the caching allocator raises an
    out-of-memory error past it, instead of starving the trials that share the GPU). Also tunes the
    host allocator for the trial's thread (`tune_host_allocator`)."""
    tune_host_allocator()
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device(device)
    if device.type == "cuda" and 0 < gpus < 1:
        torch.cuda.set_per_process_memory_fraction(float(gpus), device.index or 0)
