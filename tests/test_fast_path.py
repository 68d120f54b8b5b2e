"""The fast path (secsweep.accel): device-resident uint8 data, no per-step host sync, channels_last,
autocast, compile, checkpoint frequency, fractional-GPU bounds.

On the CPU the fast path runs with its CUDA-only parts (cudnn.benchmark, the GPU memory fraction,
bf16 by default) off; what it shares with the GPU (the resident uint8 sets and their per-batch
conversion, device-side loss accumulation, channels_last, autocast on request, compile) runs here.

Tolerances (same seeds; blended backdoor, 6 epochs of smallcnn on digits, accuracies ~0.97):
* device-resident data alone (with on-device crop augmentation): bit-identical to the reference path
  (same float batches, same ops, same draws);
* + channels_last (other conv kernels: float rounding only): every accuracy within 0.02 absolute,
  the training loss of every epoch within 1 % (measured: 0.007 and 0.2 %);
* + bf16 autocast (8-bit mantissa): accuracies within 0.03, training loss within 2 % (measured: 0.007, 0.5 %).
The recipe has no crop augmentation there: crop with 4 pixels of padding on 8x8 images makes the
training chaotic enough that rounding-level changes move the final accuracies as much as a new seed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from secsweep import accel, registry
from secsweep import data as data_mod
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.training import predict, train_epoch

# blended: its poisoned rows are not uint8 levels (the float rows of a resident set); crop: device augmentation
VALUES = {"dataset": "digits", "model": "smallcnn", "attack_batch_size": 32, "attack_epochs": 6,
          "attack_lr": 0.02, "attack_momentum": 0.5, "augment": "none", "seed": 3}
DATA_ONLY = accel.FastPath(enabled=True, device_data=True)
ON_CPU = accel.FastPath.resolve("on", "cpu", checkpoint_every=1)
BF16 = dataclasses.replace(ON_CPU, autocast_dtype=torch.bfloat16)
METRICS = ("asr", "clean_acc", "val_asr", "val_clean_acc")


def _run(tmp_path, name: str, fast: accel.FastPath | None, **values) -> LocalContext:
    spec = registry.get("blended")
    cfg = spec.build_config({**VALUES, **values})
    ctx = LocalContext(workdir=tmp_path / name, fast=fast)
    spec.fn(cfg, ctx)
    return ctx


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (conftest): module fixtures start before that fixture
    try:
        return _run(tmp_path_factory.mktemp("ref"), "ref", accel.REFERENCE)
    finally:
        torch.set_num_threads(before)


def _strip(h):
    return {k: v for k, v in h.items() if k != DEVICE_HOURS}


# -- resolution -------------------------------------------------------------------------------

def test_resolve_defaults_per_device_and_overrides():
    cpu = accel.FastPath.resolve("auto", "cpu", env={})
    assert not cpu.enabled and not cpu.device_data and cpu.checkpoint_every == 1  # CPU: the reference path
    on = accel.FastPath.resolve("on", "cpu", env={})
    assert on.enabled and on.device_data and on.channels_last
    assert on.autocast_dtype is None and not on.cudnn_benchmark  # CUDA-only parts stay off on the CPU
    assert on.checkpoint_every == accel.DEFAULT_CHECKPOINT_EVERY and not on.compile_backend
    assert accel.FastPath.resolve("on", "cpu", env={"SECSWEEP_PREEMPTIBLE": "1"}).checkpoint_every == 1
    assert accel.FastPath.resolve("on", "cpu", env={"SECSWEEP_CHECKPOINT_EVERY": "3"}).checkpoint_every == 3
    assert accel.FastPath.resolve("off", "cpu", checkpoint_every=4, env={}).checkpoint_every == 4
    assert accel.FastPath.resolve(None, "cpu", env={"SECSWEEP_FAST_PATH": "on"}).enabled
    assert accel.FastPath.resolve("on", "cpu", env={"SECSWEEP_AUTOCAST": "bf16"}).autocast_dtype == torch.bfloat16
    assert accel.FastPath.resolve("compile", "cpu", env={}).compile_backend == "inductor"
    cuda = accel.FastPath.resolve("auto", "cuda", env={})
    assert cuda.enabled and cuda.cudnn_benchmark and cuda.checkpoint_every == accel.DEFAULT_CHECKPOINT_EVERY
    assert not accel.FastPath.resolve("off", "cuda", env={}).enabled
    with pytest.raises(ConfigError, match="fast_path='fast': must be one of auto, on, off, compile"):
        accel.FastPath.resolve("fast", "cpu", env={})
    with pytest.raises(ConfigError, match="SECSWEEP_CHECKPOINT_EVERY='x': must be >= 1 epoch"):
        accel.FastPath.resolve("on", "cpu", env={"SECSWEEP_CHECKPOINT_EVERY": "x"})


def test_sweep_flag():
    from secsweep import sweep

    s = sweep.Sweep(name="t", trainable="clean", grid=[{}])
    assert sweep.build_parser(s).parse_args(["--fast-path", "off"]).fast_path == "off"
    assert sweep.build_parser(s).parse_args([]).fast_path is None
    # a bad mode is refused before launch: tests/data/bad_inputs.txt (test_bad_inputs.py)


# -- resident sets ----------------------------------------------------------------------------

def test_resident_set_is_uint8_and_bit_identical():
    ds = data_mod.load("digits", "train")  # values k / 16
    images = ds.images.clone()
    images[:5] = images[:5] * 0.8 + 0.2 * torch.rand(5, *images.shape[1:])  # blended rows: no uint8 level
    images[5:7, :, :3, :3] = 1.0                                            # a patch: still exact
    res = accel.ResidentImages(images, torch.device("cpu"))
    assert res.codes is not None and res.codes.dtype == torch.uint8 and res.scale == 16.0
    assert res.floats.shape[0] == 5  # only the inexact rows are float
    idx = torch.randperm(len(images))[:200]
    idx[:3] = torch.tensor([0, 4, 6])
    assert torch.equal(res.take(idx), images[idx])
    assert torch.equal(res.slice(0, 10_000), images)
    assert res.nbytes < images.numel() * 4 / 3  # uint8 + 5 float rows + the row map, vs float32

    eight_bit = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8).float().div_(255)
    r8 = accel.ResidentImages(eight_bit, torch.device("cpu"))
    assert r8.scale == 255.0 and r8.floats is None and torch.equal(r8.take(torch.arange(50)), eight_bit)
    noisy = torch.rand(40, 1, 4, 4)  # no uint8 encoding: kept float as a whole, still exact
    rn = accel.ResidentImages(noisy, torch.device("cpu"))
    assert rn.codes is None and torch.equal(rn.take(torch.arange(40).flip(0)), noisy.flip(0))


def test_resident_cache_follows_in_place_changes():
    x = torch.rand(8, 1, 2, 2)
    a = accel.resident(x, "cpu")
    assert accel.resident(x, "cpu") is a
    x[0] = 0.5  # poisoning writes into its set: a new copy
    b = accel.resident(x, "cpu")
    assert b is not a and torch.equal(b.take(torch.arange(8)), x)


# -- training loop ----------------------------------------------------------------------------

def test_device_accumulated_loss_equals_per_step_item_mean(tmp_path):
    ds = data_mod.load("digits", "train").subset(torch.arange(300))
    for fast in (accel.REFERENCE, DATA_ONLY):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen: list[tuple[float, int]] = []

        def loss_fn(logits, y):
            loss = F.cross_entropy(logits, y)
            seen.append((loss.item(), len(y)))  # what the loop used to read every step
            return loss

        ctx = LocalContext(workdir=tmp_path, fast=fast)
        step, mean = train_epoch(model, ds.images, ds.labels, opt, ctx, batch_size=64, seed=1, epoch=0,
                                 loss_fn=loss_fn)
        total = 0.0
        for value, n in seen:
            total += value * n
        assert step == 5 and mean == total / 300  # bit for bit


def test_device_resident_data_is_bit_identical_to_reference(tmp_path):
    short = {"attack_epochs": 2, "augment": "crop", "augment_padding": 1}  # augmentation on the device
    ref = _run(tmp_path, "ref", accel.REFERENCE, **short)
    fast = _run(tmp_path, "data_only", DATA_ONLY, **short)
    assert [_strip(h) for h in fast.history] == [_strip(h) for h in ref.history]


def test_fast_path_on_cpu_matches_reference(tmp_path, reference):
    fast = _run(tmp_path, "on", ON_CPU)
    last, ref = fast.history[-1], reference.history[-1]
    assert [h[EPOCH] for h in fast.history] == [h[EPOCH] for h in reference.history]
    for key in METRICS:
        assert last[key] == pytest.approx(ref[key], abs=0.02), key
    for h, r in zip(fast.history, reference.history):
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=0.01)
    assert ref["asr"] > 0.9 and ref["clean_acc"] > 0.9  # trained backdoors, not two failures


def test_bf16_autocast_on_cpu_matches_reference_loosely(tmp_path, reference):
    fast = _run(tmp_path, "bf16", BF16)
    last, ref = fast.history[-1], reference.history[-1]
    for key in METRICS:
        assert last[key] == pytest.approx(ref[key], abs=0.03), key
    for h, r in zip(fast.history, reference.history):
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=0.02)


def test_fast_eval_equals_reference_eval(tmp_path):
    ds = data_mod.load("digits", "test")
    torch.manual_seed(0)
    from secsweep.models import build_model

    net = build_model("smallcnn", 10, in_channels=1, image_size=8)
    LocalContext(workdir=tmp_path, fast=accel.REFERENCE)
    ref = predict(net, ds.images, torch.device("cpu"), batch_size=100)
    LocalContext(workdir=tmp_path, fast=DATA_ONLY)  # the Context sets the process's fast path
    assert accel.current() is DATA_ONLY
    assert torch.equal(predict(net, ds.images, torch.device("cpu"), batch_size=100), ref)
    accel.activate(accel.REFERENCE)


def test_compile_keeps_state_dict_and_results(tmp_path):
    ds = data_mod.load("digits", "train").subset(torch.arange(256))
    from secsweep.models import build_model

    results = []
    for fast in (DATA_ONLY, dataclasses.replace(DATA_ONLY, compile_backend="eager")):
        torch.manual_seed(0)
        ctx = LocalContext(workdir=tmp_path, fast=fast)
        net = ctx.prepare_model(build_model("smallcnn", 10, in_channels=1, image_size=8))
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        _, loss = train_epoch(net, ds.images, ds.labels, opt, ctx, batch_size=64, seed=0, epoch=0)
        results.append((loss, net.state_dict()))
    accel.activate(accel.REFERENCE)
    (l0, s0), (l1, s1) = results
    assert list(s0) == list(s1)  # no "_orig_mod." prefix: checkpoints and saved weights load anywhere
    assert l1 == pytest.approx(l0, rel=1e-4)


# -- checkpoint frequency ---------------------------------------------------------------------

class Preempted(Exception):
    pass


def test_checkpoint_every_k_epochs_and_the_last(tmp_path):
    spec = registry.get("clean")
    cfg = spec.build_config({"dataset": "digits", "model": "smallcnn", "epochs": 5, "batch_size": 128,
                             "train_size": 400})
    fast = accel.with_checkpoint_every(accel.REFERENCE, 2)
    path = tmp_path / "ckpt.pt"
    saved: list[int | None] = []

    def look(metrics):
        state = torch.load(path, weights_only=True)["state"] if path.exists() else None
        saved.append(None if state is None else int(state["epoch"]))

    ctx = LocalContext(workdir=tmp_path / "run", checkpoint=path, fast=fast, on_report=look)
    assert ctx.checkpoint_every == 2
    spec.fn(cfg, ctx)
    assert saved == [None, 2, 2, 4, 5]  # epochs 2 and 4, and the last (5)


def test_resume_with_checkpoint_every_2_matches_uninterrupted(tmp_path):
    spec = registry.get("clean")
    cfg = spec.build_config({"dataset": "digits", "model": "smallcnn", "epochs": 4, "batch_size": 128,
                             "train_size": 400, "augment": "crop"})
    fast = accel.with_checkpoint_every(accel.REFERENCE, 2)
    full = LocalContext(workdir=tmp_path / "full", fast=fast)
    spec.fn(cfg, full)

    def stop_at_three(metrics):
        if metrics[EPOCH] == 3:
            raise Preempted

    path = tmp_path / "ckpt.pt"
    first = LocalContext(workdir=tmp_path / "a", checkpoint=path, fast=fast, on_report=stop_at_three)
    with pytest.raises(Preempted):
        spec.fn(cfg, first)
    resumed = LocalContext(workdir=tmp_path / "b", checkpoint=path, fast=fast)
    assert resumed.restored()["epoch"] == 2  # epoch 3 was not due: it is redone
    spec.fn(cfg, resumed)
    assert [h[EPOCH] for h in resumed.history] == [1, 2, 3, 4]
    assert _strip(resumed.history[-1]) == _strip(full.history[-1])


# -- fractional devices -----------------------------------------------------------------------

def test_bound_trial_threads_follow_cpu_share():
    accel.bound_trial("cpu", 0.0, 2.7)
    assert torch.get_num_threads() == 2
    accel.bound_trial("cpu", 0.0, 0.5)
    assert torch.get_num_threads() == 1


_FAULTS = """
import resource, sys, threading, torch
from secsweep import accel
def work():  # a trial's body runs in a thread of the Tune trial process
    accel.bound_trial("cpu", 0.0, 1)
    x, conv = torch.randn(64, 1, 28, 28), torch.nn.Conv2d(1, 32, 3, padding=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        y = conv(x).relu_()
        z = y * 2
        del y, z
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_trial_threads_keep_freed_batches_instead_of_faulting_them_in_again():
    """In a non-main thread glibc unmaps freed activation-sized blocks and faults them in again on
    the next batch; bound_trial raises the thresholds (measured: 47 k minor faults -> 10 k for 30
    batches of a 64x32x28x28 activation), and $SECSWEEP_MALLOC_TUNING=off keeps the defaults."""
    faults = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                             env={**os.environ, accel.ENV_MALLOC: mode})
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["on"] * 3 < faults["off"], faults
    assert not accel.tune_host_allocator({accel.ENV_MALLOC: "off"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_and_memory_fraction(tmp_path, reference):
    accel.bound_trial("cuda", 0.25, 1)
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        torch.empty(int(total * 0.3), dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    spec = registry.get("blended")
    ctx = LocalContext(workdir=tmp_path / "cuda", device="cuda")
    assert ctx.fast.enabled and ctx.fast.device_data
    spec.fn(spec.build_config(VALUES), ctx)
    accel.activate(accel.REFERENCE)
    for key in METRICS:
        assert ctx.history[-1][key] == pytest.approx(reference.history[-1][key], abs=0.05), key
