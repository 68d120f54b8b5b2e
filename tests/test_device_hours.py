"""device_hours charges every trial the same things: never stages, dataset decoding, checkpoint
writes or plots; always the trainable's own work; a resumed trial continues from its checkpoint."""

from __future__ import annotations

import time

import pytest

from secsweep import data as data_mod
from secsweep.context import Context, LocalContext
from secsweep.runtime import RuntimeSettings, predecode

SECOND = 1 / 3600  # device-hours of one second on one device


class SlowCheckpointContext(Context):
    """A context whose checkpoint writes take 0.3 s (a slow file system)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.reports = []

    def _emit(self, metrics, state):
        if state is not None:
            time.sleep(0.3)
        self.reports.append(metrics)


def test_checkpoint_writes_are_not_charged(tmp_path):
    ctx = SlowCheckpointContext(workdir=tmp_path)
    for epoch in range(3):
        ctx.report({"epoch": epoch}, state={"epoch": epoch})
    assert ctx.reports[-1]["device_hours"] < 0.1 * SECOND  # 0.6 s of writes before it, none charged
    assert ctx.device_hours() < 0.1 * SECOND


def test_uncharged_blocks_and_stage_time_are_excluded_work_is_charged(tmp_path):
    ctx = LocalContext(workdir=tmp_path, devices_per_trial=0.5)
    with ctx.uncharged():  # a plot
        with ctx.uncharged():  # nested: counted once
            time.sleep(0.2)
    assert ctx.device_hours() < 0.5 * 0.1 * SECOND  # 0.2 s slept, none charged
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:  # the trainable's own work
        pass
    assert 0.5 * 0.19 * SECOND < ctx.device_hours() < 0.5 * 1.0 * SECOND  # x 0.5 GPU held


def test_stage_computation_is_not_charged_to_the_trial(tmp_path):
    """The trial that computes the backdoored model pays nothing for it (nor does a trial that waits
    for or loads it): only its own work counts."""
    from secsweep import registry

    cfg = registry.get("badnets").build_config({"dataset": "digits", "attack_epochs": 1, "attack_batch_size": 64})
    ctx = LocalContext(workdir=tmp_path / "t", stage_root=tmp_path / "stages")  # as the runtime: after the config
    t0 = time.monotonic()
    ctx.stage("badnets", cfg)
    took = time.monotonic() - t0
    assert took > 0.05  # the stage trained a model (about 0.2 s on an idle core)
    assert ctx.device_hours() < 0.1 * took * SECOND


def test_resumed_trial_continues_from_the_checkpoint_and_charges_what_it_redoes(tmp_path):
    first = LocalContext(workdir=tmp_path)
    first.report({"epoch": 1}, state={"epoch": 1})
    saved = dict(first.last_state)
    saved["_device_hours"] = 1.0  # as if epoch 1 had cost one device-hour

    again = LocalContext(workdir=tmp_path, state=saved)
    time.sleep(0.2)  # the restarted trial loads its data and builds its model before asking for its state
    assert again.restored()["epoch"] == 1
    again.report({"epoch": 2}, state={"epoch": 2})
    hours = again.history[-1]["device_hours"]
    assert 1.0 + 0.19 * SECOND < hours < 1.0 + 1.0 * SECOND  # continues from 1.0; the reload is charged
    assert again.last_state["_device_hours"] == hours  # and the next restart continues from here


def test_predecode_fills_the_cache_before_the_clock_starts():
    """Tune trials decode their datasets (dataset and target_dataset) before the Context exists, so the
    first trial of a process is not charged for what later trials find decoded."""
    from secsweep import registry

    data_mod._clear_cache()
    cfg = registry.get("transfer").build_config({"dataset": "digits", "target_dataset": "digits"})
    predecode(cfg, RuntimeSettings(stage_root=""))
    assert {k[:2] for k in data_mod._RAW_CACHE} >= {("digits", "train"), ("digits", "test")}
    t0 = time.monotonic()
    data_mod.load("digits", "train")
    assert time.monotonic() - t0 < 0.5


def test_predecode_raises_for_a_missing_dataset(tmp_path, monkeypatch):
    from secsweep import registry
    from secsweep.errors import SecsweepError

    monkeypatch.setenv("SECSWEEP_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_SYSTEM_ROOTS", ())
    cfg = registry.get("badnets").build_config({"dataset": "cifar10"})
    with pytest.raises(SecsweepError, match="cifar10"):
        predecode(cfg, RuntimeSettings(stage_root="", data_root=str(tmp_path)))


def test_a_trial_holding_a_gpu_torch_cannot_see_fails_instead_of_running_on_cpu(monkeypatch):
    import torch

    from secsweep.errors import SecsweepError
    from secsweep.runtime import pick_device

    assert pick_device(0.0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine
    with pytest.raises(SecsweepError, match="--gpus-per-trial=0.5: this trial holds a GPU but torch sees none"):
        pick_device(0.5)
