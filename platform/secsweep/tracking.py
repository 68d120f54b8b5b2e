"""MLflow tracking: one experiment per sweep script, a parent run per invocation, a child run per trial.

All MLflow writes happen in the Tune driver (a Tune callback), so a local SQLite store has a single
writer. Child runs carry the full resolved config as params, per-epoch metrics with their step, the
tag `trial_id`, the trial's artifacts (e.g. its learning-rate plot), and on a crash status FAILED
with the exception text. On `--resume` the parent run is reopened and a trial's existing child run is
found by its `trial_id` tag, so no child run is duplicated.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from . import registry
from .config import to_dict
from .names import EPOCH, TAG_TRIAL_ID
from .runtime import ARTIFACTS, PARAMS_KEY, TRAINABLE_KEY, numeric_metrics

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000

def resolve_tracking_uri(uri: str | None) -> str:
    """sqlite:///mlflow.db by default; a plain path becomes an absolute sqlite or file URI."""
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def flat_params(values: Mapping[str, Any], prefix: str = "") -> list[Param]:
    out = []
    for k, v in values.items():
        if isinstance(v, Mapping) and v:
            out += flat_params(v, f"{prefix}{k}.")
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
            out.append(Param(f"{prefix}{k}", text[:MAX_PARAM_LEN]))
    return out


def resolved_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full resolved config of a trial (defaults included) plus the trainable name."""
    values = dict(config[PARAMS_KEY])
    name = values.pop(TRAINABLE_KEY)
    cfg = registry.get(name).build_config(values)
    return {TRAINABLE_KEY: name, **to_dict(cfg)}


class MlflowTrialCallback(Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self._runs: dict[str, str] = {}
        self._client: MlflowClient | None = None

    def __getstate__(self):  # Tune pickles callbacks into its experiment state (for --resume)
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_runs")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._runs, self._client = {}, None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def child_run(self, trial) -> str:
        """The child run of `trial`: cached, found by tag (after a resume), or created."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{TAG_TRIAL_ID} = '{trial.trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{trial.config[PARAMS_KEY].get(TRAINABLE_KEY, 'trial')}-{trial.trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TAG_TRIAL_ID: trial.trial_id, "sweep": self.sweep},
            )
            run_id = run.info.run_id
            try:
                params = resolved_params(trial.config)
            except Exception as e:  # noqa: BLE001 - an invalid config still gets a run, marked failed later
                params = dict(trial.config[PARAMS_KEY])
                log.warning("could not resolve config of %s: %s", trial.trial_id, e)
            self.client.log_batch(run_id, params=flat_params(params))
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.child_run(trial)
        step = int(result.get(EPOCH, result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _upload_artifacts(self, trial, run_id: str) -> None:
        ckpt = trial.checkpoint
        if ckpt is None:
            return
        try:
            with ckpt.as_directory() as d:
                arts = Path(d) / ARTIFACTS
                if arts.is_dir():
                    for f in sorted(arts.iterdir()):
                        if f.is_file():
                            self.client.log_artifact(run_id, str(f))
        except Exception as e:  # noqa: BLE001 - artifacts are best effort; the run's status is not
            log.warning("artifacts of trial %s not uploaded: %s", trial.trial_id, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.child_run(trial)
        self._upload_artifacts(trial, run_id)
        self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.child_run(trial)
        text = error_text(trial)
        self.client.set_tag(run_id, "error", text[-4900:])
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "error.txt"
            p.write_text(text)
            self.client.log_artifact(run_id, str(p))
        self._upload_artifacts(trial, run_id)
        self.client.set_terminated(run_id, status="FAILED")


def error_text(trial) -> str:
    """The exception text of a failed trial (Tune keeps it in the trial's error file)."""
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and attr == "error_file" and Path(path).is_file():
            return Path(path).read_text()
    msg = getattr(trial, "error_msg", None)
    return str(msg) if msg else "trial failed (no error text recorded by Tune)"


class ParentRun:
    """The parent run of one sweep invocation; reopened by id on --resume."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, client: MlflowClient, experiment: str, run_name: str, tags: Mapping[str, str],
              params: Mapping[str, Any]) -> "ParentRun":
        run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=dict(tags))
        client.log_batch(run.info.run_id, params=flat_params(params))
        return cls(client, run.info.run_id)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for p in paths:
            if p and Path(p).is_file():
                self.client.log_artifact(self.run_id, str(p))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
