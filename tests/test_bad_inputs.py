"""Every bad input is one line `error: ...` naming the field, exit code 2, before anything starts.

The corpus (tests/data/bad_inputs.txt) goes well beyond the cases issues named; each line runs
in-process through `secsweep.sweep.run` with the sweep script's own SWEEP, with the launch replaced
by a failure (so a case that slips through validation cannot start Ray). test_sweeps.py keeps one
case through the real script in a subprocess.
"""

from __future__ import annotations

import argparse
import runpy
import shlex

import pytest

import secsweep.sweep as sw
from conftest import ROOT

CORPUS = ROOT / "tests" / "data" / "bad_inputs.txt"


def _cases() -> list:
    out = []
    for n, line in enumerate(CORPUS.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        argv, sep, field = line.rpartition(" => ")
        assert sep and field, f"{CORPUS.name}:{n}: expected 'ARGV => FIELD'"
        script, colon, rest = argv.partition(": ")
        script, argv = (script, rest) if colon and " " not in script else ("sft_grid", argv)
        out.append(pytest.param(script, argv, field.strip(), id=f"{n}:{script}:{argv}"))
    return out


_SWEEPS: dict = {}


def sweep_of(script: str):
    if script not in _SWEEPS:
        _SWEEPS[script] = runpy.run_path(str(ROOT / "sweeps" / f"{script}.py"), run_name="bad_inputs")["SWEEP"]
    return _SWEEPS[script]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in an empty folder with no datasets but the system ones, and fail on any launch."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECSWEEP_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def launched(plan, args):
        raise AssertionError(f"validation let {args.argv} through: it would have launched")

    monkeypatch.setattr(sw, "_launch", launched)
    monkeypatch.setattr(sw, "cluster_gpu_check", lambda args: None)
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_corpus_is_large_and_covers_every_flag():
    cases = _cases()
    assert len(cases) >= 80
    flags = {a.option_strings[-1] for a in sw.build_parser(sweep_of("sft_grid"))._actions
             if a.option_strings and not isinstance(a, (argparse._StoreTrueAction, argparse._HelpAction))}
    named = {c.values[2] for c in cases}
    assert flags - {"--dataset", "--set"} <= named, f"flags without a bad-input case: {flags - named}"


@pytest.mark.parametrize("script, argv, field", _cases())
def test_bad_input_is_one_line_naming_the_field_exit_2(isolated, capsys, script, argv, field):
    argv = shlex.split(argv.replace("{tmp}", str(isolated / "empty")))
    code = sw.run(sweep_of(script), ["--storage-path", str(isolated / "rr"), *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert field in lines[0], lines[0]
    assert not (isolated / "rr").exists() and not (isolated / "mlflow.db").exists()  # nothing started
    assert {p.name for p in isolated.iterdir()} <= {"empty", "cache", "nodata"}


def test_gpus_this_machine_lacks_are_refused_before_launch(isolated, capsys):
    """Without --address the trials run here: asking for more GPUs than torch sees is one line, exit 2
    (on this CPU machine any --gpus-per-trial > 0), not trials pending forever."""
    import torch

    have = torch.cuda.device_count()
    argv = ["--gpus-per-trial", "0.5"] if have == 0 else ["--gpus-per-trial", "1", "--num-workers", str(have + 1),
                                                          "--set", f"batch_size={128 * (have + 1)}"]
    code = sw.run(sweep_of("sft_grid"), ["--storage-path", str(isolated / "rr"), *argv])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and line.startswith("error: --gpus-per-trial=") and f"this machine has {have}" in line


def test_cluster_gpu_decision():
    """--address: refuse only when the cluster cannot ever have a GPU (none now, and the autoscaler's
    node types have none); warn when that cannot be told; accept GPUs now or addable later."""
    from secsweep.errors import ConfigError

    args = argparse.Namespace(gpus_per_trial=0.5, address="auto")
    assert sw.check_cluster_gpus(2.0, None, args) is None   # GPUs now
    assert sw.check_cluster_gpus(0.0, 8.0, args) is None    # the autoscaler can add GPU nodes
    assert "pending" in sw.check_cluster_gpus(0.0, None, args)  # no autoscaler config visible: warn
    with pytest.raises(ConfigError, match="--gpus-per-trial=0.5: the cluster .* has no GPU"):
        sw.check_cluster_gpus(0.0, 0.0, args)
    assert sw.check_cluster_gpus(0.0, 0.0, argparse.Namespace(gpus_per_trial=0.0, address="auto")) is None


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:///{tmp}/m.db", "sqlite:///{tmp}/new/../m.db",
                                 "http://127.0.0.1:5000", "https://mlflow.example.org", "databricks",
                                 "databricks://profile", "postgresql+psycopg2://u@db/mlflow", "file:///{tmp}/mlruns",
                                 "{tmp}/mlruns"])
def test_good_tracking_uris_pass(isolated, monkeypatch, uri):
    """The allowed set: SQLAlchemy databases (sqlite, postgresql, mysql, mssql, +driver), file stores
    (file: or a bare path, where MLflow allows them: MLflow 3 only with MLFLOW_ALLOW_FILE_STORE=true),
    tracking servers (http, https), Databricks."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (isolated / "empty" / "new").mkdir()
    sw._check_tracking_uri(uri.replace("{tmp}", str(isolated / "empty")))
