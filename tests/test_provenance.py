"""secsweep.provenance: git commit and dirty flag from git, the driver's environment or the file
that travels to a cluster without .git; MLflow tags; dataset inputs."""

from __future__ import annotations

import json
import subprocess

import pytest

from secsweep import provenance as pv


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "train.py").write_text("lr = 0.1\n")
    _git(root, "add", "train.py")
    _git(root, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    return root, head


def test_git_commit_and_dirty_flag(repo):
    root, head = repo
    assert pv.from_git(root) == pv.Provenance(head, False, "git")
    (root / "train.py").write_text("lr = 0.2\n")  # an uncommitted edit
    assert pv.from_git(root) == pv.Provenance(head, True, "git")
    _git(root, "checkout", "-q", "train.py")
    (root / "new_trigger.py").write_text("")   # an untracked source file changes what runs too
    assert pv.from_git(root).dirty is True
    (root / "new_trigger.py").unlink()
    (root / pv.FILE_NAME).write_text("{}")     # our own provenance file does not count
    assert pv.from_git(root).dirty is False


def test_no_git_falls_back_to_the_provenance_file(repo, tmp_path, monkeypatch):
    root, head = repo
    (root / "train.py").write_text("lr = 0.3\n")
    path = pv.write_file(root)
    assert json.loads(path.read_text())["commit"] == head
    synced = tmp_path / "on_the_cluster"   # what `ray up` uploads: the tree without .git
    synced.mkdir()
    (synced / pv.FILE_NAME).write_text(path.read_text())
    monkeypatch.delenv(pv.ENV, raising=False)
    assert pv.from_git(synced) is None
    assert pv.compute(synced) == pv.Provenance(head, True, "file")
    # the code on the node differs from what the file was written for: dirty, whatever the file says
    d = json.loads(path.read_text())
    (synced / pv.FILE_NAME).write_text(json.dumps({**d, "dirty": False, "code": "0" * 64}))
    assert pv.compute(synced) == pv.Provenance(head, True, "file")
    (synced / pv.FILE_NAME).write_text(json.dumps({**d, "dirty": False}))
    assert pv.compute(synced) == pv.Provenance(head, False, "file")
    (synced / pv.FILE_NAME).unlink()
    assert pv.compute(synced) == pv.Provenance("unknown", None, "none")


def test_write_file_needs_git(tmp_path):
    from secsweep.errors import SecsweepError

    with pytest.raises(SecsweepError, match="not a git work tree"):
        pv.write_file(tmp_path)


def test_driver_environment_wins_and_round_trips(repo, tmp_path, monkeypatch):
    root, head = repo
    env = pv.worker_env("sft_grid-20260101-000000", pv.Provenance(head, True, "git"))
    assert env[pv.SWEEP_ENV] == "sft_grid-20260101-000000"
    monkeypatch.setenv("SECSWEEP_STAGE_LOCK_TIMEOUT_S", "120")
    assert pv.worker_env()["SECSWEEP_STAGE_LOCK_TIMEOUT_S"] == "120"  # reaches trials on other nodes
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert pv.compute(tmp_path) == pv.Provenance(head, True, "env")  # a trial process without .git
    assert pv.sweep_label() == "sft_grid-20260101-000000"
    monkeypatch.setenv(pv.ENV, "{broken")
    assert pv.compute(root) == pv.Provenance(head, False, "git")


def test_run_tags_fill_mlflow_source_and_version(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    tags = pv.Provenance("a" * 40, False, "git").run_tags("sweeps/sft_grid.py")
    assert tags == {"git_commit": "a" * 40, "git_dirty": "false", "provenance_source": "git",
                    "mlflow.source.name": "sweeps/sft_grid.py", "mlflow.source.type": "LOCAL",
                    "mlflow.source.git.commit": "a" * 40, "mlflow.user": "alice"}
    unknown = pv.Provenance().run_tags()
    assert unknown["git_dirty"] == "unknown" and "mlflow.source.git.commit" not in unknown


def test_dataset_inputs_digest_follows_the_data_config():
    base = {"dataset": "fashion_mnist", "train_size": 20000, "seed": 0, "lr_max1": 0.1, "val_fraction": 0.1}
    inputs = pv.dataset_inputs(base)
    assert [(d["name"], d["context"]) for d in inputs] == [("fashion_mnist/train", "training"),
                                                           ("fashion_mnist/test", "evaluation")]
    digest = inputs[0]["digest"]
    assert pv.dataset_inputs({**base, "lr_max1": 0.2})[0]["digest"] == digest    # not a data field
    assert pv.dataset_inputs({**base, "train_size": 100})[0]["digest"] != digest  # other data
    assert json.loads(inputs[0]["source"])["config"]["train_size"] == 20000
    assert pv.dataset_inputs({"lr": 0.1}) == []
    assert pv.dataset_inputs({**base, "target_dataset": "digits"})[-1]["name"] == "digits/train"


def test_experiment_opens_on_training_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from secsweep.tracking import experiment_id, ui_url

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    new = experiment_id(client, "fresh")
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made_earlier")  # before secsweep set the tag
    assert experiment_id(client, "made_earlier") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert ui_url("http://127.0.0.1:5000/", "7") == "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    assert ui_url(f"sqlite:///{tmp_path}/m.db", "7").startswith("http://127.0.0.1:5000/#/experiments/7?")
