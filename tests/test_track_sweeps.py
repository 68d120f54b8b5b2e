"""The encoder, stealing and fake-image tracks' sweep scripts end to end: each `--smoke-test` on a
local Ray, through Tune and MLflow (tests/test_sweeps.py covers the backdoor sweeps and the
platform's own behaviour: resume, failures, bad input)."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import FASHION, ROOT
from test_sweeps import run_script, runs_of


def _smoke_plan(script: str):
    """The trial list `script --smoke-test` runs (the sweep's own plan, so the test follows the script)."""
    import importlib.util

    from secsweep import sweep as sweep_mod

    spec = importlib.util.spec_from_file_location(f"_smoke_{script}", ROOT / "sweeps" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = sweep_mod.build_parser(module.SWEEP).parse_args(["--smoke-test"])
    return sweep_mod.plan(module.SWEEP, args)


TRACK_SWEEPS = ("ssl_pretrain", "badencoder", "encoder_scenario", "encodermi", "cont_steal", "stealing_defenses",
                "watermark", "surrogate_adv", "prompt_analysis",
                "defake_detect", "defake_attribute", "defake_robustness", "audit_zoo", "dede",
                "detector_comparison")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One Ray storage path for the module's sweeps, so one stage cache (`<storage>/stages`): a stage
    two smoke sweeps share (the DE-FAKE smoke corpus, a small victim encoder) is computed inside the
    first sweep's trials and read back by the others, as on a cluster that keeps its storage."""
    return tmp_path_factory.mktemp("track-storage")


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("script", TRACK_SWEEPS)
def test_every_track_sweep_smoke_runs_and_logs_its_declared_metrics(script, tmp_path, sweep_env, storage):
    """The encoder, stealing and fake-image sweeps' --smoke-test runs every planned trial through Tune
    (their upstream stages computed inside the trials, or read from the shared stage cache) and each
    child run in MLflow carries the metrics its trainable declares."""
    from secsweep import registry

    plan_ = _smoke_plan(script)
    trials = [dict(t) for t in plan_.trials for _ in range(plan_.num_samples)]
    proc = run_script(ROOT / f"sweeps/{script}.py", ["--smoke-test", "--storage-path", str(storage),
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-csv", str(tmp_path / "r.csv")],
                      sweep_env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == len(trials) and (table["status"] == "TERMINATED").all(), table.to_string()
    _, parents, children = runs_of(tmp_path / "mlflow.db", plan_.sweep.name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == len(trials)
    assert sorted(c.data.params["trainable"] for c in children) == sorted(t.get("trainable", plan_.sweep.trainable) for t in trials)
    for c in children:
        declared = registry.get(c.data.params["trainable"]).metrics
        assert c.info.status == "FINISHED" and set(declared) <= set(c.data.metrics), (
            c.data.params["trainable"], sorted(set(declared) - set(c.data.metrics)))
