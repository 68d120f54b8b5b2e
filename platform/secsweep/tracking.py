"""MLflow tracking: one experiment per sweep script, a parent run per invocation, a child run per trial.

All MLflow writes happen in the Tune driver, so a local SQLite store has a single writer. Child
runs carry the full resolved config as params, per-epoch metrics with their step, the tag
`trial_id`, the trial's artifacts (e.g. its learning-rate plot), and on a crash status FAILED with
the exception text. After the parent run is created, nothing waits on MLflow: the Tune callback
queues its writes in a `TrackingQueue` (journalled in the experiment folder, applied by a background
thread that retries through outages), and the sweep waits for the queue at its end. On `--resume`
the parent run is reopened, unapplied journal writes are replayed, a trial's existing child run is
found by its `trial_id` tag (so no child run is duplicated), epochs already logged are not logged
again, and trials in the completion ledger are not run again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from ray.tune import Callback

from . import ledger, provenance, registry
from .config import to_dict
from .names import EPOCH, IMPLANTED, TAG_TRIAL_ID, VAL_ASR_BEFORE
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


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment tag
# mlflow.experimentKind says it holds model training (the UI's "custom_model_development" kind)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before this tag was set
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """Link to an experiment's runs in the MLflow UI (an http tracking server's own address, else
    where `mlflow ui` listens by default). MLflow 3.17's UI ignores mlflow.experimentKind and opens
    every experiment on its GenAI overview unless the link asks for the model-training view
    (workflowType=machine_learning). The "Model training" toggle at the top left does the same,
    and the browser remembers it."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def dataset_inputs(inputs: Iterable[Mapping[str, str]]) -> list[DatasetInput]:
    """MLflow dataset inputs from secsweep.provenance.dataset_inputs' plain dicts."""
    return [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"]),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in inputs]


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


# -- buffered writes ------------------------------------------------------------------------------
#
# A tracking outage must cost nothing: Tune callbacks never call MLflow themselves. They append
# each write to an ordered queue that is journalled to the experiment folder (fsync per write, so
# a killed driver loses nothing) and applied by one background thread, which retries a write until
# the server takes it (backoff 1 s doubling to 15 s), keeping the order. `--resume` replays the
# writes the journal has not marked done, and does not queue again an epoch it already queued. The
# callback also records each trial's checkpoints and completion in the driver's ledger
# (secsweep.ledger), which trials consult on --resume, since Tune's own experiment snapshot can lag
# behind what the driver already logged.

JOURNAL_FILE = "tracking-journal.jsonl"
ARTIFACT_COPIES = "tracking-artifacts"   # trial artifacts copied here before their upload is queued
# MLflow's own HTTP retries block the calling thread and then give up (defaults: 7 retries, backoff
# factor 2, ~4 min in all); the writer retries without end, so one attempt is kept short (~6 s when
# the server refuses connections). Only set where the user has not set them.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 15.0
# MLflow errors that retrying cannot fix (the write itself is wrong): logged and dropped
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST"}
MAX_BATCH = 100  # MLflow's log_batch limit on params (and a safe size for metrics and tags)


def short_http_retries() -> None:
    for k, v in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # urllib3 logs every retry of every attempt; the writer reports an outage itself, once a minute
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _transient(e: BaseException) -> bool:
    if isinstance(e, MlflowException):
        return e.error_code not in PERMANENT_ERRORS
    # connection errors, timeouts, a locked SQLite file: the store may take the write later
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "requests", "urllib3", "sqlalchemy")


_QUEUES: dict[str, "TrackingQueue"] = {}


def queue_for(exp_dir: str | os.PathLike) -> "TrackingQueue | None":
    """The queue the driver opened for this experiment folder (this process), if any."""
    return _QUEUES.get(str(Path(exp_dir).resolve()))


class TrackingQueue:
    """Ordered, journalled MLflow writes of one sweep, applied by a background thread with retry.

    Writes name their run either by `run` (a run id) or by `trial` (a Tune trial id, resolved to its
    child run when the thread creates or finds it), so a trial can start while the server is down.
    """

    def __init__(self, tracking_uri: str, exp_dir: str | os.PathLike, experiment_id: str, parent_run_id: str):
        self.tracking_uri = tracking_uri
        self.exp_dir = Path(exp_dir).resolve()
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.journal = self.exp_dir / JOURNAL_FILE
        self.completed = ledger.completed(self.exp_dir)
        self._client = client_for(tracking_uri)
        self._cond = threading.Condition()
        self._file_lock = threading.Lock()
        self._pending: deque[dict[str, Any]] = deque()
        self._runs: dict[str, str] = {}             # trial_id -> child run id
        self._children: set[str] = set()            # trials whose child-run write this driver queued
        self._logged: dict[str, dict[str, int]] = {}  # trial_id -> metric -> highest step queued
        self._seq = 0
        self._closed = False
        self.failures = 0                           # writes dropped as permanently invalid
        self._load_journal()
        self._thread = threading.Thread(target=self._worker, name="secsweep-mlflow-writer", daemon=True)
        self._thread.start()
        _QUEUES[str(self.exp_dir)] = self

    # -- journal --------------------------------------------------------------------------------
    def _load_journal(self) -> None:
        ops: dict[int, dict[str, Any]] = {}
        done: set[int] = set()
        for r in ledger.read_records(self.journal):
            if "done" in r:
                done.add(int(r["done"]))
            elif "run_of" in r:
                self._runs[r["run_of"]] = r["run_id"]
            elif "seq" in r:
                ops[int(r["seq"])] = r
        terminated = set()
        for seq in sorted(ops):
            op = ops[seq]
            if op["op"] == "terminate" and "trial" in op:
                terminated.add(op["trial"])
            if op["op"] == "metrics":
                seen = self._logged.setdefault(op["trial"], {})
                for k in op["metrics"]:
                    seen[k] = max(seen.get(k, -1), int(op["step"]))
            if seq not in done:
                self._pending.append(op)
        self._seq = max(ops, default=0)
        # the ledger is written before a finished trial's last writes are queued: a driver killed in
        # between left a finished trial whose run was never closed
        for tid, rec in self.completed.items():
            if tid not in terminated:
                copies = self.exp_dir / ARTIFACT_COPIES / tid
                self.log_artifacts(sorted(copies.iterdir()) if copies.is_dir() else [], trial=tid)
                self.terminate(rec.get("status", "FINISHED"), trial=tid)
        if self._pending:
            log.info("MLflow: replaying %d write(s) an earlier driver left in %s", len(self._pending), self.journal)

    def _journal(self, record: Mapping[str, Any], *, sync: bool = True) -> None:
        with self._file_lock:
            ledger.append_record(self.journal, record, sync=sync)

    def _put(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            op = {"seq": self._seq, **op}
            self._journal(op)
            self._pending.append(op)
            self._cond.notify_all()

    # -- writes (called from Tune callbacks and the driver; never raise on MLflow errors) -----------
    def ensure_child(self, trial_id: str, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                     inputs: Sequence[Mapping[str, str]] = ()) -> None:
        if trial_id in self._children:
            return
        self._children.add(trial_id)
        self._put({"op": "child", "trial": trial_id, "name": run_name, "tags": dict(tags),
                   "inputs": [dict(d) for d in inputs]})  # datasets (secsweep.provenance.dataset_inputs)
        self._put({"op": "params", "trial": trial_id,
                   "params": {p.key: p.value for p in flat_params(params)}})

    def log_metrics(self, trial_id: str, metrics: Mapping[str, float], step: int) -> int:
        """Queue the metrics of `step`; a metric already queued at this step or a later one (a trial
        resumed from an older checkpoint repeats epochs) is skipped. Returns how many were queued."""
        seen = self._logged.setdefault(trial_id, {})
        new = {k: float(v) for k, v in metrics.items() if step > seen.get(k, -1)}
        if new:
            for k in new:
                seen[k] = step
            self._put({"op": "metrics", "trial": trial_id, "metrics": new, "step": int(step),
                       "ts": int(time.time() * 1000)})
        return len(new)

    def log_artifacts(self, paths: Iterable[Path], *, trial: str | None = None, run: str | None = None) -> None:
        files = [str(p) for p in paths if p and Path(p).is_file()]
        if files:
            self._put({"op": "artifacts", **self._target(trial, run), "paths": files})

    def set_tags(self, tags: Mapping[str, Any], *, trial: str | None = None, run: str | None = None) -> None:
        self._put({"op": "tags", **self._target(trial, run), "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def terminate(self, status: str, *, trial: str | None = None, run: str | None = None) -> None:
        self._put({"op": "terminate", **self._target(trial, run), "status": status})

    @staticmethod
    def _target(trial, run) -> dict[str, str]:
        return {"trial": trial} if trial is not None else {"run": run}

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every queued write to reach MLflow; False if some did not."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        """Stop the thread (after its current write); unapplied writes stay in the journal."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        _QUEUES.pop(str(self.exp_dir), None)

    # -- the writer thread -----------------------------------------------------------------------
    def _worker(self) -> None:
        delay, down_since, last_note = BACKOFF_MIN_S, None, 0.0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                op = self._pending[0]
            try:
                self._apply(op)
            except Exception as e:  # noqa: BLE001 - the thread must survive every error
                if not _transient(e):
                    self.failures += 1
                    log.error("MLflow write %s dropped (retrying cannot fix it): %s", op.get("op"), e)
                else:
                    now = time.monotonic()
                    if down_since is None:
                        down_since = last_note = now
                        log.warning("MLflow unreachable (%s); writes are buffered in memory and in %s, "
                                    "retrying", str(e).splitlines()[0][:200], self.journal)
                    elif now - last_note > 60:
                        log.warning("MLflow still unreachable after %.0f s; %d write(s) buffered",
                                    now - down_since, self.pending())
                        last_note = now
                    with self._cond:
                        self._cond.wait(delay)   # close() wakes it; the write stays queued
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
            if down_since is not None:
                log.warning("MLflow reachable again after %.0f s; flushing %d buffered write(s)",
                            time.monotonic() - down_since, self.pending())
                down_since, delay = None, BACKOFF_MIN_S
            self._journal({"done": op["seq"]}, sync=False)  # a lost mark only replays an idempotent write
            with self._cond:
                self._pending.popleft()
                self._cond.notify_all()

    def _run_id(self, op: Mapping[str, Any]) -> str:
        if "run" in op:
            return op["run"]
        tid = op["trial"]
        if tid not in self._runs:
            found = self._find_child(tid)
            if found is None:
                raise MlflowException(f"no child run for trial {tid}", error_code="RESOURCE_DOES_NOT_EXIST")
            self._runs[tid] = found
        return self._runs[tid]

    def _find_child(self, trial_id: str) -> str | None:
        found = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _apply(self, op: Mapping[str, Any]) -> None:
        kind, c = op["op"], self._client
        if kind == "child":
            # find before create: a retried or replayed write must not duplicate the run
            run_id = self._runs.get(op["trial"]) or self._find_child(op["trial"])
            if run_id is None:
                run_id = c.create_run(self.experiment_id, run_name=op["name"], tags=op["tags"]).info.run_id
                if op.get("inputs"):
                    c.log_inputs(run_id, datasets=dataset_inputs(op["inputs"]))
            else:
                c.update_run(run_id, status="RUNNING")
            if self._runs.get(op["trial"]) != run_id:
                self._runs[op["trial"]] = run_id
                self._journal({"run_of": op["trial"], "run_id": run_id})
            return
        run_id = self._run_id(op)
        if kind == "params":
            have = c.get_run(run_id).data.params  # a resumed run keeps the params it was created with
            params = [Param(k, v) for k, v in op["params"].items() if k not in have]
            for i in range(0, len(params), MAX_BATCH):
                c.log_batch(run_id, params=params[i:i + MAX_BATCH])
        elif kind == "metrics":
            metrics = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(metrics), MAX_BATCH):
                c.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH])
        elif kind == "artifacts":
            for p in op["paths"]:
                if Path(p).is_file():
                    c.log_artifact(run_id, p)
                else:
                    log.warning("artifact %s is gone; not uploaded", p)
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in op["tags"].items()]
            for i in range(0, len(tags), MAX_BATCH):
                c.log_batch(run_id, tags=tags[i:i + MAX_BATCH])
        elif kind == "terminate":
            c.set_terminated(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown journal write {kind!r}")


NOT_IMPLANTED_WARNING = ("backdoor not implanted: val ASR before the defense {asr:.3f} is below min_asr_before, so "
                         "this defense removed nothing; raise attack_epochs or poison_ratio")


class MlflowTrialCallback(Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run, via the sweep's
    `TrackingQueue`. It never raises into Tune: a tracking problem must not fail a trial."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, exp_dir: str,
                 source: str = ""):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.source = source  # the sweep script, for MLflow's mlflow.source.name tag
        self.exp_dir = str(Path(exp_dir).resolve())

    @property
    def queue(self) -> TrackingQueue:
        # Tune unpickles this callback from its experiment state on --resume: use the queue the
        # driver opened for the experiment folder (open one only if the driver did not)
        q = queue_for(self.exp_dir)
        if q is None:
            q = TrackingQueue(self.tracking_uri, self.exp_dir, self.experiment_id, self.parent_run_id)
        return q

    def _done_before(self, trial) -> bool:
        """A trial the ledger lists finished in an earlier driver: Tune re-runs it only because its
        snapshot lagged; the trial reports its recorded result without training, and nothing is
        logged again."""
        return trial.trial_id in self.queue.completed

    def child_tags(self, trial) -> dict[str, str]:
        """Tags a trial's child run is created with."""
        return {**provenance.current().run_tags(getattr(self, "source", "")),  # git commit, dirty, user
                PARENT_TAG: self.parent_run_id, TAG_TRIAL_ID: trial.trial_id, "sweep": self.sweep}

    def child_run(self, trial) -> None:
        """Queue the creation (or, after a resume, the lookup by `trial_id` tag) of `trial`'s child run."""
        q = self.queue
        if trial.trial_id in q._children:
            return
        try:
            params = resolved_params(trial.config)
        except Exception as e:  # noqa: BLE001 - an invalid config still gets a run, marked failed later
            params = dict(trial.config[PARAMS_KEY])
            log.warning("could not resolve config of %s: %s", trial.trial_id, e)
        q.ensure_child(trial.trial_id, f"{trial.config[PARAMS_KEY].get(TRAINABLE_KEY, 'trial')}-{trial.trial_id}",
                       self.child_tags(trial), params, inputs=provenance.dataset_inputs(params))

    def _guard(self, what: str, trial, fn) -> None:
        try:
            if not self._done_before(trial):
                fn()
        except Exception:  # noqa: BLE001 - never into Tune; the journal has everything queued so far
            log.exception("MLflow tracking of trial %s (%s) failed", trial.trial_id, what)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard("start", trial, lambda: self.child_run(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        def write():
            self.child_run(trial)
            step = int(result.get(EPOCH, result.get("training_iteration", 0)))
            self.queue.log_metrics(trial.trial_id, numeric_metrics(result), step)
            if result.get(IMPLANTED) == 0.0 and step == 0:  # say it plainly on the run, not only as a metric
                self.queue.set_tags({"warning": NOT_IMPLANTED_WARNING.format(
                    asr=result.get(VAL_ASR_BEFORE, result.get("asr_before", float("nan"))))}, trial=trial.trial_id)
        self._guard("result", trial, write)

    def _copy_artifacts(self, trial, extra: Mapping[str, str] = {}) -> list[Path]:
        """The trial's artifacts, copied into the experiment folder so their upload survives the
        checkpoint's deletion and a driver crash."""
        out = Path(self.exp_dir) / ARTIFACT_COPIES / trial.trial_id
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, text in extra.items():
            (out / name).write_text(text)
            files.append(out / name)
        ckpt = trial.checkpoint
        if ckpt is None:
            return files
        try:
            with ckpt.as_directory() as d:
                arts = Path(d) / ARTIFACTS
                if arts.is_dir():
                    for f in sorted(arts.iterdir()):
                        if f.is_file():
                            shutil.copy2(f, out / f.name)
                            files.append(out / f.name)
        except Exception as e:  # noqa: BLE001 - artifacts are best effort; the run's status is not
            log.warning("artifacts of trial %s not uploaded: %s", trial.trial_id, e)
        return files

    def _record(self, trial, status: str, **extra) -> None:
        self.queue.completed[trial.trial_id] = ledger.record_completion(
            self.exp_dir, trial.trial_id, status, numeric_metrics(trial.last_result or {}), **extra)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # the newest checkpoint, for a resume whose Tune snapshot predates it (see secsweep.ledger)
        try:
            ledger.record_checkpoint(self.exp_dir, trial.trial_id, checkpoint.path,
                                     (trial.last_result or {}).get(EPOCH))
        except Exception:  # noqa: BLE001 - never into Tune
            log.exception("checkpoint of trial %s not recorded", trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        def write():
            q = self.queue
            self.child_run(trial)
            files = self._copy_artifacts(trial)
            self._record(trial, "FINISHED")  # first: from here on a resume never runs it again
            q.log_artifacts(files, trial=trial.trial_id)
            q.terminate("FINISHED", trial=trial.trial_id)
        self._guard("complete", trial, write)

    def on_trial_error(self, iteration, trials, trial, **info):
        def write():
            q = self.queue
            self.child_run(trial)
            text = error_text(trial)
            files = self._copy_artifacts(trial, {"error.txt": text})
            self._record(trial, "FAILED", error=text[-2000:])
            q.set_tags({"error": text[-4900:]}, trial=trial.trial_id)
            q.log_artifacts(files, trial=trial.trial_id)
            q.terminate("FAILED", trial=trial.trial_id)
        self._guard("error", trial, write)


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
