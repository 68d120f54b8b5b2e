"""Sweeps: the declaration every sweep script makes, the common CLI, and the Tune run.

A sweep script declares a `Sweep` (trainables, fixed values, a grid or an Optuna search space, the
objectives, presets) and calls `main(SWEEP)`. Everything a user can get wrong is checked before Ray
starts: unknown `--set` keys, values of the wrong type, invalid values at every grid point and at
every corner of a search space, missing datasets. Such errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import dataclasses
import datetime as _dt
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as data_mod
from . import provenance, refs, registry
from .config import fail, field_types, is_ref_field, parse_assignments, split_dotted
from .errors import SecsweepError
from .runtime import PARAMS_KEY, TRAINABLE_KEY

log = logging.getLogger("secsweep")
STATE_FILE = "secsweep.json"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def grid(**dims: Sequence[Any]) -> list[dict[str, Any]]:
    """Cartesian product of the given dimensions as a list of dicts (a grid search)."""
    keys = list(dims)
    return [dict(zip(keys, values)) for values in itertools.product(*(dims[k] for k in keys))]


def variants(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Concatenate grids of different trainables into one list of trials."""
    return [dict(v) for g in groups for v in g]


@dataclass
class Sweep:
    """What a sweep script declares."""

    name: str                                       # MLflow experiment and results folder name
    trainable: str | None = None                    # default trainable (a grid point may name its own)
    fixed: dict[str, Any] = field(default_factory=dict)    # values every trial shares
    grid: list[dict[str, Any]] | None = None        # explicit trials: grid search
    space: dict[str, Any] | None = None             # Tune distributions: Optuna search
    # what a search optimises, always on the validation split (test metrics are reported, never selected on)
    # None: the objectives of the trainable's kind (`registry.CONTRACTS`; a defense: val_asr min, val_clean_acc max)
    objectives: dict[str, str] | None = None
    # the single metric ASHA stops on and a one-objective search optimises: DER on validation, which a
    # model that collapsed to chance cannot win (its ASR is ~0 but so is its clean accuracy)
    selection: tuple[str, str] | None = None         # None: the kind's (a defense: val_der max)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"fixed":..., "grid":..., "space":...}
    smoke: dict[str, Any] = field(default_factory=dict)    # {"fixed":..., "grid":..., "num_samples":...} for --smoke-test
    num_samples: int = 1                            # trials Optuna draws (a search only; grid repeats: --seeds)
    columns: tuple[str, ...] = ()                   # () : "trainable" and the metrics the trainables declare
    description: str = ""
    source: str = ""                                # the sweep script (found automatically)

    def __post_init__(self) -> None:
        self._resolve_defaults()
        if not self.source:  # the file that declared the sweep (skipping dataclass-generated frames)
            self.source = next((f.filename for f in inspect.stack()[1:]
                                if f.filename != __file__ and not f.filename.startswith("<")), "")


    def trainables(self) -> list[str]:
        """The trainables the sweep's default declaration runs (its own, or its grid's)."""
        names = [t[TRAINABLE_KEY] for t in (self.grid or []) if TRAINABLE_KEY in t]
        return list(dict.fromkeys(([self.trainable] if self.trainable else []) + names))

    def _resolve_defaults(self) -> None:
        """Objectives, selection and columns follow what the trainables declare (their kind's
        contract and their metrics) unless the sweep states them."""
        specs = [registry.get(n) for n in self.trainables()]
        contract = next((sp.contract for sp in specs if sp.contract.objectives), None)
        if self.objectives is None:
            self.objectives = dict(contract.objectives) if contract else {"val_asr": "min", "val_clean_acc": "max"}
        if self.selection is None:
            self.selection = tuple(contract.selection) if contract and contract.selection else ("val_der", "max")
        if not self.columns:
            metrics = [m for sp in specs for m in sp.metrics]
            upstream = ["attack"] if any(sp.kind in ("defense", "detector") for sp in specs) else []
            self.columns = tuple(dict.fromkeys(["trainable", *upstream, *metrics]))


# -- CLI ------------------------------------------------------------------------------------------

def build_parser(sweep: Sweep) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python sweeps/{sweep.name}.py", description=sweep.description)
    p.add_argument("--smoke-test", action="store_true", help="a tiny version of the sweep (< 2 min on 2 CPUs)")
    p.add_argument("--preset", default="default", help=f"settings preset: default, {', '.join(sweep.presets)}")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster); default: start a local Ray")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--storage-path", default="ray_results", help="where Tune results, checkpoints and stage artifacts live")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $SECSWEEP_DATA, ~/.cache/secsweep/data, /usr/share/datasets)")
    p.add_argument("--download", action="store_true", help="download missing datasets with torchvision (needs internet)")
    p.add_argument("--dataset", default=None, help=f"dataset for every trial: {', '.join(data_mod.DATASETS)}")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue an interrupted sweep (the latest one, or the results folder PATH)")
    p.add_argument("--results-csv", default=None, help="also write the results table to this CSV")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (fractions share a GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (and torch threads)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train DDP workers per trial (>1: TorchTrainer)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials running at once (0: as resources allow)")
    p.add_argument("--num-samples", type=int, default=None, help="trials Optuna draws (searches only; repeats: --seeds)")
    p.add_argument("--seeds", type=int, default=1, help="run every grid point with N seeds (the trial's own `seed`)")
    p.add_argument("--reseed-upstream", action="store_true",
                   help="with --seeds: re-seed upstream stages too (victim_seed follows seed) instead of sharing them")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial (from its last checkpoint)")
    p.add_argument("--asha", action="store_true", help="ASHA early stopping on the sweep's selection metric (default val_der)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--tracking-drain-timeout", type=float, default=600.0, metavar="S", help="at the end, wait up to S seconds for buffered MLflow writes (an outage); the rest are replayed by --resume")
    p.add_argument("--resources-per-trial", default=None, metavar="JSON", help='custom Ray resources each trial also requests, e.g. \'{"fake_gpu": 1}\' (docs/cluster.md)')
    p.add_argument("--fast-path", default=None, metavar="MODE", help="device fast path (secsweep.accel): auto (on for CUDA trials, off on CPU), on, off, or compile (on + torch.compile); default: $SECSWEEP_FAST_PATH or auto")
    return p


@dataclass
class Plan:
    """A validated sweep, ready to launch."""

    sweep: Sweep
    fixed: dict[str, Any]
    trials: list[dict[str, Any]] | None   # grid search: every trial's values (incl. trainable)
    space: dict[str, Any] | None          # search: Tune distributions over config keys
    num_samples: int
    search_space_json: str


def _config_fields(trainable: str) -> dict[str, Any]:
    return field_types(registry.get(trainable).config)


def _values_for(trainable: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `values` that `trainable`'s Config has (shared keys go to every trainable)."""
    fields = _config_fields(trainable)
    return {k: v for k, v in values.items() if k in fields or split_dotted(k, fields)}


def _check_keys(trainables: Sequence[str], keys, source: str) -> None:
    known: set[str] = set()
    dotted_ok = False
    for t in trainables:
        known |= set(_config_fields(t))
    for k in keys:
        for t in trainables:
            dotted_ok = bool(split_dotted(k, _config_fields(t)))
            if dotted_ok:
                break
        if k not in known and k != TRAINABLE_KEY and not dotted_ok:
            fail(k, "", f"unknown {source} key; allowed: {', '.join(sorted(known))}")


def _domain_corners(dist: Any) -> list[Any]:
    """Extreme values of a Tune domain (or a plain value), for validation before launch."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(dist, Categorical):
        return list(dist.categories)
    if isinstance(dist, (Float, Integer)):
        upper = dist.upper - 1 if isinstance(dist, Integer) else dist.upper
        return [dist.lower, upper]
    if isinstance(dist, Mapping) and "grid_search" in dist:
        return list(dist["grid_search"])
    return [dist]


# metrics a model that collapsed to chance wins (ASR ~0 because nothing is predicted right)
COLLAPSE_PRONE = {"asr": "min", "val_asr": "min"}


def _check_objectives(sweep: Sweep) -> None:
    """Selection happens on validation metrics, and never on ASR alone."""
    for name, mode in [*sweep.objectives.items(), sweep.selection]:
        if mode not in ("min", "max"):
            fail(f"objectives.{name}", mode, "must be min or max")
    if len(sweep.objectives) == 1:
        ((name, mode),) = sweep.objectives.items()
        if COLLAPSE_PRONE.get(name) == mode:
            fail("objectives", name, "alone is won by a model that collapsed to chance; use val_der, or "
                 "add val_clean_acc as a second objective")
    if COLLAPSE_PRONE.get(sweep.selection[0]) == sweep.selection[1]:
        fail("selection", sweep.selection[0], "is won by a model that collapsed to chance; use val_der")


# -- flags: every CLI value is checked here, before anything starts -------------------------------

# MLflow tracking URI schemes secsweep accepts (a bare path is a local file store): the SQLAlchemy
# databases MLflow supports (optionally with a +driver), a local file store, a tracking server, Databricks
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")
RAY_ADDRESS_HELP = "must be auto, local, ray://HOST:PORT or HOST:PORT"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write_in(folder: Path) -> bool:
    """Try it (permission bits say nothing for root, or on read-only and virtual file systems):
    create and remove an empty temporary folder in `folder`."""
    import tempfile

    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".secsweep-write-test-").cleanup()
        return True
    except OSError:
        return False


def _check_writable_dir(flag: str, value: str) -> None:
    """`value` is a folder this user can write in, or one that can be created (nothing is left behind)."""
    path = Path(value).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            fail(flag, value, "exists and is not a folder")
        if not _can_write_in(path):
            fail(flag, value, "is a folder this user cannot write in")
        return
    base = _nearest_existing(path)
    if not base.is_dir():
        fail(flag, value, f"cannot be created: {base} is not a folder")
    if not _can_write_in(base):
        fail(flag, value, f"cannot be created: {base} is not writable")


def _check_file_store_allowed(uri: str) -> None:
    """MLflow 3 keeps its file store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE
    is true (older MLflow has no such switch and accepts it)."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        fail("--tracking-uri", uri, "is an MLflow file store, which this MLflow refuses (maintenance mode): "
             "use sqlite:///PATH.db, or set MLFLOW_ALLOW_FILE_STORE=true")


def _check_tracking_uri(uri: str) -> None:
    from urllib.parse import urlsplit

    flag = "--tracking-uri"
    if not uri.strip():
        fail(flag, uri, "must not be empty")
    if uri == "databricks":  # MLflow's name for the default Databricks profile
        return
    scheme = urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
    if not scheme or (len(scheme) == 1 and os.name == "nt"):  # a bare path: a local file store
        _check_file_store_allowed(uri)
        _check_writable_dir(flag, str(Path(uri).expanduser().parent))
        return
    base = scheme.split("+", 1)[0]
    if base not in TRACKING_SCHEMES:
        fail(flag, uri, f"scheme {scheme!r} is not supported; allowed: {', '.join(TRACKING_SCHEMES)} or a bare path")
    if base == "file":
        _check_file_store_allowed(uri)
    rest = uri[len(scheme) + 1:]
    if base == "sqlite":
        if not rest.startswith("///") or len(rest) == 3:
            fail(flag, uri, "must be sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db")
        db = Path(rest[3:]).expanduser()
        folder = db.parent.absolute()
        if not folder.is_dir():
            fail(flag, uri, f"the database's folder {folder} does not exist (MLflow does not create it)")
        if not _can_write_in(folder):
            fail(flag, uri, f"the database's folder {folder} is not writable")
    elif base == "file":
        _check_writable_dir(flag, urlsplit(uri).path or ".")
    elif base in ("http", "https", "postgresql", "mysql", "mssql") and not urlsplit(uri).netloc:
        fail(flag, uri, f"a {base} URI needs a host, e.g. {base}://127.0.0.1:5000" if base.startswith("http")
             else f"a {base} URI needs a host, e.g. {base}://user@host/db")


def _check_ray_address(address: str) -> None:
    import re

    if address in ("auto", "local"):
        return
    m = re.fullmatch(r"(?:ray://)?\[?([A-Za-z0-9._:-]+?)\]?(?::(\d{1,5}))?", address)
    if m is None or (not address.startswith("ray://") and m.group(2) is None):
        fail("--address", address, RAY_ADDRESS_HELP)
    if m.group(2) is not None and not 0 < int(m.group(2)) < 65536:
        fail("--address", address, "port must be in 1..65535")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def validate_args(args: argparse.Namespace) -> None:
    """Check every CLI flag (ranges, types, URI schemes, paths) before anything starts: one
    `field=value: what is allowed` error (ConfigError) for the first bad one. Creates nothing.

    GPUs: without --address the trials run on this machine, so --gpus-per-trial > 0 needs CUDA
    devices here (torch.cuda.device_count()), enough for one trial; with --address the cluster is
    asked after connecting (`check_cluster_gpus`), since an autoscaler may add GPU nodes later.
    """
    for dest, value in sorted(vars(args).items()):  # every float flag: no nan, no inf
        if isinstance(value, float) and not math.isfinite(value):
            fail(_flag(dest), value, "must be a finite number")
    if args.cpus_per_trial <= 0:
        fail("--cpus-per-trial", args.cpus_per_trial, "must be > 0")
    if args.num_workers < 1:
        fail("--num-workers", args.num_workers, "must be >= 1")
    from . import accel

    mode = args.fast_path or os.environ.get(accel.ENV_MODE)
    if mode and mode not in accel.MODES:
        fail("--fast-path" if args.fast_path else accel.ENV_MODE, mode, f"must be one of {', '.join(accel.MODES)}")
    if args.max_concurrent < 0:
        fail("--max-concurrent", args.max_concurrent, "must be >= 0 (0: as many as resources allow)")
    if args.max_failures < -1:
        fail("--max-failures", args.max_failures, "must be >= 0, or -1 for unlimited retries")
    gpus = args.gpus_per_trial
    if gpus < 0:
        fail("--gpus-per-trial", gpus, "must be >= 0")
    if gpus > 1:
        fail("--gpus-per-trial", gpus, "must be <= 1: a trial process uses one GPU (fractions share one); "
             "for more GPUs per trial use --num-workers N (one GPU each)")
    if args.num_workers > 1 and 0 < gpus < 1:
        fail("--gpus-per-trial", gpus, f"must be 0 or 1 with --num-workers={args.num_workers}: each DDP worker "
             "needs a GPU of its own (NCCL cannot put two ranks on one GPU)")
    if gpus > 0 and args.address is None:
        have = _local_gpus()
        need = math.ceil(gpus * args.num_workers)
        if have < need:
            fail("--gpus-per-trial", gpus, f"needs {need} GPU(s) per trial and this machine has {have} "
                 "(torch.cuda.device_count()); use 0 to run on CPUs, or --address to use a cluster")
    if args.address is not None:
        _check_ray_address(args.address)
    if args.tracking_uri is not None:
        _check_tracking_uri(args.tracking_uri)
    if "://" in args.storage_path:
        fail("--storage-path", args.storage_path, "must be a local or mounted folder (a shared file system on a cluster)")
    _check_writable_dir("--storage-path", args.storage_path)
    if args.data_root is not None:
        if args.download:  # the download target: it may be created
            _check_writable_dir("--data-root", args.data_root)
        else:
            _check_data_root(args.data_root)
    if getattr(args, "tracking_drain_timeout", 0.0) < 0:
        fail("--tracking-drain-timeout", args.tracking_drain_timeout, "must be >= 0 (seconds)")
    if getattr(args, "resources_per_trial", None) is not None:
        custom_resources(args)  # raises ConfigError on a bad value
    if args.results_csv is not None:
        csv = Path(args.results_csv).expanduser()
        if csv.is_dir():
            fail("--results-csv", args.results_csv, "is a folder; give a file path")
        _check_writable_dir("--results-csv", str(csv.absolute().parent))


def custom_resources(args: argparse.Namespace) -> dict[str, float]:
    """--resources-per-trial as {name: amount}: custom Ray resources (a node type's `resources` in a
    cluster config, e.g. the simulated cluster's `fake_gpu`) each trial requests besides its CPUs and
    GPUs. {} when the flag is absent. ConfigError (one line) on anything Ray would refuse later."""
    raw = getattr(args, "resources_per_trial", None)
    if raw is None:
        return {}
    flag = "--resources-per-trial"
    try:
        value = json.loads(raw)
    except ValueError:
        fail(flag, raw, 'must be a JSON object of resource names and amounts, e.g. \'{"fake_gpu": 1}\'')
    if not isinstance(value, dict) or not value:
        fail(flag, raw, 'must be a non-empty JSON object of resource names and amounts, e.g. \'{"fake_gpu": 1}\'')
    for name, amount in value.items():
        if name.strip().lower() in ("cpu", "gpu", "custom_resources") or not name.strip():
            fail(flag, raw, f"resource name {name!r} is not allowed: CPUs and GPUs have --cpus-per-trial and "
                 "--gpus-per-trial; name a custom resource")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount <= 0:
            fail(flag, raw, f"amount of {name!r} must be a finite number > 0")
        if amount > 1 and amount != int(amount):  # Ray's own rule for resource requests
            fail(flag, raw, f"amount of {name!r} must be a whole number when above 1 (fractions only below 1)")
    if args.num_workers > 1:
        fail(flag, raw, f"is not supported with --num-workers={args.num_workers} (the Train workers hold the "
             "resources); use it with one process per trial")
    return {name: float(amount) for name, amount in value.items()}


def _check_data_root(value: str) -> None:
    path = Path(value).expanduser()
    if not path.is_dir():
        fail("--data-root", value, "is not an existing folder (add --download to fetch datasets into a new one)")


def check_cluster_gpus(cluster_gpus: float, max_gpus: float | None, args: argparse.Namespace) -> str | None:
    """With --address and --gpus-per-trial > 0: refuse (ConfigError) when the cluster cannot ever
    provide a GPU, i.e. it has none now and its autoscaler's node types (`max_gpus`, from the cluster
    config Ray's autoscaler publishes) have none either; return a warning when that cannot be told
    (no autoscaler config visible: trials wait until a GPU node joins); None when GPUs are there or
    can be added."""
    gpus = args.gpus_per_trial
    if gpus <= 0 or cluster_gpus > 0:
        return None
    if max_gpus is None:
        return (f"--gpus-per-trial={gpus}: the cluster has no GPU now and no autoscaler config is visible; "
                "trials stay pending until a node with GPUs joins")
    if max_gpus <= 0:
        fail("--gpus-per-trial", gpus, f"the cluster at --address={args.address} has no GPU and its autoscaler "
             "has no node type with GPUs; use 0, or add a GPU worker type to the cluster config")
    return None


def cluster_gpu_check(args: argparse.Namespace) -> None:
    """Connect to the cluster at --address, apply `check_cluster_gpus`, disconnect."""
    if args.address is None or args.gpus_per_trial <= 0:
        return
    import ray

    ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        have = float(ray.cluster_resources().get("GPU", 0.0))
        most: float | None = None
        try:  # the autoscaler's node types; Ray's own libraries read them this way (no public API yet)
            from ray._private.state import state

            limits = state.get_max_resources_from_cluster_config()
            most = None if limits is None else float(limits.get("GPU", 0))
        except Exception:  # noqa: BLE001 - a Ray without this call: cannot tell, so warn
            most = None
        warning = check_cluster_gpus(have, most, args)
        if warning:
            log.warning(warning)
    finally:
        ray.shutdown()


def check_configs(configs: Sequence[Any], args: argparse.Namespace) -> None:
    """Checks of built trial configs that involve the CLI: every dataset a config names (`dataset`,
    `target_dataset`, any `*_dataset`) is available, and with --num-workers N every `*batch_size`
    the trial trains with (a global batch, see secsweep.training.train_epoch) splits evenly over the
    N workers. A defense's `attack_batch_size` is exempt: its attack runs as a one-process stage."""
    seen: set[str] = set()
    kinds = {registry.get(n).config: registry.get(n).kind for n in registry.names()}
    for cfg in configs:
        upstream_only = {"attack_batch_size"} if kinds.get(type(cfg)) == "defense" else set()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if (f.name == "dataset" or f.name.endswith("_dataset")) and isinstance(value, str) and value not in seen:
                seen.add(value)
                try:
                    data_mod.check_available(value, args.data_root, download=args.download)
                except SecsweepError as e:  # name the field: it may be target_dataset, not dataset
                    raise type(e)(f"{f.name}={value!r}: {e}") from None
            if (f.name == "batch_size" or f.name.endswith("_batch_size")) and f.name not in upstream_only \
                    and isinstance(value, int) and args.num_workers > 1 and value % args.num_workers:
                fail(f.name, value, f"must be divisible by --num-workers={args.num_workers}: it is the global "
                     "batch (samples per optimizer step over all workers), split evenly across them")


def plan(sweep: Sweep, args: argparse.Namespace) -> Plan:
    """Merge preset, smoke-test and --set values into the sweep and validate every trial config."""
    validate_args(args)
    if args.preset != "default" and args.preset not in sweep.presets:
        fail("--preset", args.preset, "must be one of " + ", ".join(["default", *sweep.presets]))
    preset = sweep.presets.get(args.preset, {})
    fixed = {**sweep.fixed, **preset.get("fixed", {})}
    trials = preset.get("grid", sweep.grid)
    space = preset.get("space", sweep.space)
    num_samples = preset.get("num_samples", sweep.num_samples)
    if args.smoke_test:
        fixed.update(sweep.smoke.get("fixed", {}))
        trials = sweep.smoke.get("grid", trials)
        space = sweep.smoke.get("space", space)
        num_samples = sweep.smoke.get("num_samples", num_samples)
    overrides = parse_assignments(args.set)
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.num_samples is not None:
        if args.num_samples < 1:
            fail("--num-samples", args.num_samples, "must be >= 1")
        if trials is not None:
            fail("--num-samples", args.num_samples, "is for Optuna searches; repeat a grid with --seeds N")
        num_samples = args.num_samples
    if args.seeds < 1:
        fail("--seeds", args.seeds, "must be >= 1")
    if args.reseed_upstream and args.seeds == 1:
        fail("--reseed-upstream", True, "needs --seeds N with N > 1")
    if args.gpus_per_trial < 0:
        fail("--gpus-per-trial", args.gpus_per_trial, "must be >= 0")
    if args.cpus_per_trial <= 0:
        fail("--cpus-per-trial", args.cpus_per_trial, "must be > 0")
    if args.num_workers < 1:
        fail("--num-workers", args.num_workers, "must be >= 1")
    if (trials is None) == (space is None):
        raise SecsweepError(f"sweep {sweep.name}: declare exactly one of grid= or space=")
    _check_objectives(sweep)

    default_trainable = fixed.pop(TRAINABLE_KEY, sweep.trainable)
    trainables = sorted({t.get(TRAINABLE_KEY, default_trainable) for t in (trials or [{}])})
    for t in trainables:
        if t is None:
            raise SecsweepError(f"sweep {sweep.name}: no trainable given")
        registry.get(t)
    _check_keys(trainables, fixed, "fixed")
    _check_keys(trainables, overrides, "--set")
    dims = set(itertools.chain.from_iterable(trials)) if trials is not None else set(space)
    _check_keys(trainables, dims - {TRAINABLE_KEY}, "search-space")

    if trials is not None:
        # --set overrides fixed values and collapses grid dimensions of the same name
        resolved: list[dict[str, Any]] = []
        for t in trials:
            name = t.get(TRAINABLE_KEY, default_trainable)
            merged = {**_values_for(name, fixed), **_values_for(name, t), **_values_for(name, overrides)}
            item = {TRAINABLE_KEY: name, **merged}
            if item not in resolved:
                resolved.append(item)
        resolved = with_seeds(resolved, args.seeds, reseed_upstream=args.reseed_upstream)
        configs = []
        for item in resolved:
            values = dict(item)
            configs.append(registry.get(values.pop(TRAINABLE_KEY)).build_config(values))
        resolved = _interleave_by_stage(resolved, configs)
        trials, space_json = resolved, json.dumps(sweep.grid if not args.smoke_test else trials, default=str)
        space = None
    else:
        if args.seeds > 1:
            fail("--seeds", args.seeds, "repeats grid points; an Optuna search draws --num-samples points instead")
        (name,) = trainables
        space = {k: v for k, v in space.items() if k not in overrides}
        fixed = {**fixed, **overrides}
        keys = list(space)
        configs = [registry.get(name).build_config({**fixed, **dict(zip(keys, corner))})
                   for corner in itertools.product(*(_domain_corners(space[k]) for k in keys))]
        fixed[TRAINABLE_KEY] = name
        space_json = json.dumps({k: repr(v) for k, v in space.items()})
    datasets = {t.get("dataset") for t in trials} if trials else {fixed.get("dataset")}
    for ds in sorted(d for d in datasets if d) or [d for d in [_default_dataset(trainables)] if d]:
        data_mod.check_available(ds, args.data_root, download=args.download)
    check_configs(configs, args)
    return Plan(sweep, fixed, trials, space, num_samples, space_json)


SEED_KEY = "seed"                  # every trainable's own seed
UPSTREAM_SEED_KEYS = ("victim_seed",)  # seeds of upstream stages a trainable's config names


def with_seeds(trials: list[dict[str, Any]], n: int, *, reseed_upstream: bool = False) -> list[dict[str, Any]]:
    """Every trial repeated with `n` seeds: `seed` = its seed (default 0) + 0 .. n-1.

    Upstream stages (the backdoored model) are shared by the repeats unless `reseed_upstream`, which
    sets each upstream seed the trial's config has to the same value, so every repeat trains its own.
    """
    if n == 1:
        return trials
    out = []
    for t in trials:
        fields = _config_fields(t[TRAINABLE_KEY])
        base = int(t.get(SEED_KEY, 0))
        for i in range(n):
            item = {**t, SEED_KEY: base + i}
            if reseed_upstream:
                item.update({k: base + i for k in UPSTREAM_SEED_KEYS if k in fields})
                # a StageRef field's stage is re-seeded through its own seed (`ref.seed`)
                item.update({f"{k}.{SEED_KEY}": base + i for k, tp in fields.items() if is_ref_field(tp)})
            out.append(item)
    return out


def _interleave_by_stage(trials: list[dict], configs: list[Any]) -> list[dict]:
    """Order trials round-robin over their upstream stage (the backdoored model they need).

    The first trials to start then compute different stages in parallel instead of queueing on
    one stage's lock while the other CPUs idle.
    """
    from .stages import stage_key

    groups: dict[str, list[dict]] = {}
    for trial, cfg in zip(trials, configs):
        ups = refs.upstream(cfg)
        key = stage_key(*ups[0]) if ups else ""
        groups.setdefault(key, []).append(trial)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _default_dataset(trainables: Sequence[str]) -> str:
    cfg = registry.get(trainables[0]).config
    # None for a trainable without a dataset of its own (EncoderMI: its data are its upstream stages')
    return next((f.default for f in dataclasses.fields(cfg) if f.name == "dataset"), None)


# -- running --------------------------------------------------------------------------------------

def _find_resume_dir(storage: Path, sweep: Sweep, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume).expanduser().resolve()
        if not (path / STATE_FILE).is_file():
            fail("--resume", resume, f"is not a {sweep.name} results folder (no {STATE_FILE} in it)")
        return path
    found = sorted(storage.glob(f"{sweep.name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        fail("--resume", "latest", f"no earlier {sweep.name} sweep under {storage}")
    return found[-1].parent


# Flags about this invocation only, which a --resume may change: where Ray and MLflow are reached now
# (the MLflow store must still hold the sweep's parent run), where to also write the table, whether to
# download missing data, how long to wait for MLflow at the end. Every other flag defines the sweep;
# on --resume the saved command line supplies them, and a different value is refused (Tuner.restore
# keeps the saved Tune settings, so e.g. a new --max-concurrent would be silently ignored).
INVOCATION_FLAGS = {"address", "tracking_uri", "results_csv", "download", "tracking_drain_timeout"}
PATH_FLAGS = {"storage_path", "data_root", "results_csv"}


def _abs_path(value: Any, cwd: str | None) -> Any:
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    return str((Path(cwd) / path if cwd and not path.is_absolute() else path).resolve())


def _given_flags(sweep: Sweep, argv: Sequence[str]) -> dict[str, Any]:
    """dest -> value of the flags `argv` gives explicitly (defaults left out)."""
    p = build_parser(sweep)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def resume_args(sweep: Sweep, argv: Sequence[str], args: argparse.Namespace) -> argparse.Namespace:
    """The saved command line of the sweep `args.resume` names, with this invocation's own flags.

    A flag in `argv` that defines the sweep must equal the saved value; otherwise one-line error.
    """
    parser = build_parser(sweep)
    exp_dir = _find_resume_dir(Path(args.storage_path).expanduser().resolve(), sweep, args.resume)
    state = json.loads((exp_dir / STATE_FILE).read_text())
    saved_argv = [str(a) for a in state.get("argv", [])]
    saved = parser.parse_args(saved_argv)
    saved_cwd = state.get("cwd")
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    given = _given_flags(sweep, argv)
    for dest, value in given.items():
        if dest == "resume":
            continue
        if dest in INVOCATION_FLAGS:
            setattr(saved, dest, value)
            continue
        old = getattr(saved, dest, None)
        if dest == "storage_path":  # the sweep lives where --resume found it
            same = _abs_path(value, None) == str(exp_dir.parent)
            old = str(exp_dir.parent)
        elif dest in PATH_FLAGS:
            same = _abs_path(value, None) == _abs_path(old, saved_cwd)
        elif dest == "set":
            same = parse_assignments(value) == parse_assignments(old)
        else:
            same = value == old
        if not same:
            fail(flag[dest], value, f"conflicts with the resumed sweep's {old!r} (its command line: "
                 f"{' '.join(saved_argv) or 'no flags'}); drop the flag or start a new sweep")
    for dest in PATH_FLAGS - set(given):  # saved relative paths meant the saved working directory
        setattr(saved, dest, _abs_path(getattr(saved, dest, None), saved_cwd))
    saved.storage_path = str(exp_dir.parent)
    saved.resume = str(exp_dir)
    saved.argv = saved_argv
    saved.resume_state = state
    saved.given = set(given)
    return saved


def _build_tune_config(plan_: Plan, args):
    from ray import tune

    # reuse_actors: a trial process serves the next trial, so torch, the trainables and the decoded
    # dataset are loaded once per worker rather than once per trial
    kw: dict[str, Any] = {"num_samples": plan_.num_samples, "reuse_actors": True}
    if args.max_concurrent:
        kw["max_concurrent_trials"] = args.max_concurrent
    metrics, modes = list(plan_.sweep.objectives), list(plan_.sweep.objectives.values())
    if plan_.space is not None:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        seed = int(plan_.fixed.get("seed", 0))
        multi = len(metrics) > 1
        sampler = optuna.samplers.NSGAIISampler(seed=seed) if multi else optuna.samplers.TPESampler(seed=seed)
        kw["search_alg"] = OptunaSearch(
            metric=metrics if multi else metrics[0], mode=modes if multi else modes[0], sampler=sampler
        )
    if args.asha:
        from ray.tune.schedulers import ASHAScheduler

        metric, mode = plan_.sweep.selection
        kw["scheduler"] = ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration", grace_period=2)
    return tune.TuneConfig(**kw)


def _param_space(plan_: Plan) -> dict[str, Any]:
    from ray import tune

    if plan_.trials is not None:
        return {PARAMS_KEY: tune.grid_search(plan_.trials)}
    return {PARAMS_KEY: {**plan_.fixed, **plan_.space}}


def run(sweep: Sweep, argv: Sequence[str] | None = None) -> int:
    """Parse the CLI, validate, run the sweep on Ray Tune with MLflow tracking; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(sweep).parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.resume:  # replay the saved command line; a conflicting flag stops here
            args = resume_args(sweep, argv, args)
        plan_ = plan(sweep, args)
        cluster_gpu_check(args)  # --address with GPUs: can the cluster ever provide one?
    except SecsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _launch(plan_, args)


def _launch(plan_: Plan, args) -> int:
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials see the user's relative paths
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # a checkpoint per epoch forces experiment-state snapshots; that is intended, not a bottleneck here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    from .report import histories_from_results, results_frame, write_sweep_report
    from .runtime import RuntimeSettings, trial_entry
    from .tracking import (MlflowTrialCallback, ParentRun, TrackingQueue, client_for, resolve_tracking_uri,
                           short_http_retries, ui_url)

    sweep = plan_.sweep
    storage = Path(args.storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    state = getattr(args, "resume_state", None)  # set by resume_args
    if args.resume:
        exp_dir = Path(args.resume)
        given = getattr(args, "given", set())
        tracking_uri = resolve_tracking_uri(args.tracking_uri) if "tracking_uri" in given else state["tracking_uri"]
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        exp_dir = storage / f"{sweep.name}-{stamp}"
        tracking_uri = resolve_tracking_uri(args.tracking_uri)

    # MLflow is needed now, before launch (a down server is one line here); after launch every write
    # goes through the TrackingQueue and a tracking problem fails nothing
    short_http_retries()
    try:
        # in the try: MLflow 3 refuses a file store (file:/bare path) when the client is made, unless
        # MLFLOW_ALLOW_FILE_STORE=true; that is a one-line error too
        client = client_for(tracking_uri)
        if args.resume:
            parent = ParentRun(client, state["parent_run_id"])
            parent.reopen()
        else:
            parent = ParentRun.start(
                client, sweep.name, run_name=exp_dir.name,
                tags={**provenance.current().run_tags(provenance.script_name(sweep.source)),  # commit, dirty, user
                      "sweep_script": f"sweeps/{sweep.name}.py", "search_space": plan_.search_space_json,
                      "preset": args.preset, "smoke_test": str(args.smoke_test),
                      "command": " ".join(["python", f"sweeps/{sweep.name}.py", *args.argv])},
                params={k: v for k, v in plan_.fixed.items()},
            )
        experiment_id = parent.experiment_id
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "cannot track this sweep"
        print(f"error: --tracking-uri={tracking_uri!r}: MLflow did not accept the sweep's parent run "
              f"({(str(e).splitlines() or [type(e).__name__])[0][:300]})", file=sys.stderr)
        return EXIT_USAGE
    if not args.resume:
        exp_dir.mkdir(parents=True)
        (exp_dir / STATE_FILE).write_text(json.dumps({
            "sweep": sweep.name, "parent_run_id": parent.run_id, "tracking_uri": tracking_uri,
            "argv": args.argv, "cwd": os.getcwd(), "created": _dt.datetime.now().isoformat(timespec="seconds"),
        }, indent=2))
    queue = TrackingQueue(tracking_uri, exp_dir, experiment_id, parent.run_id)
    if not args.resume:
        queue.log_artifacts([Path(sweep.source)], run=parent.run_id)
    log.info("MLflow: %s (experiment %s, parent run %s); runs in the UI: %s", tracking_uri, sweep.name,
             parent.run_id, ui_url(tracking_uri, experiment_id))

    settings = RuntimeSettings(
        stage_root=str(storage / "stages"), data_root=str(Path(args.data_root).resolve()) if args.data_root else None,
        download=args.download, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        num_workers=args.num_workers, storage_path=str(storage / "train"),
        objectives=tuple(dict.fromkeys([*sweep.objectives, sweep.selection[0]])),
        fast_path=args.fast_path,
    )
    if args.num_workers > 1:  # the Train workers hold the resources; the Tune trial only coordinates
        resources = {"cpu": 0.01}
    else:
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        if custom_resources(args):  # e.g. a node type's custom resource, which makes the autoscaler add it
            resources["custom_resources"] = custom_resources(args)
    # trials read the driver's ledger (secsweep.ledger) in the experiment folder: on --resume a trial
    # the driver saw finish is not run again, and one it saw checkpoint resumes from that checkpoint
    trainable = tune.with_resources(tune.with_parameters(trial_entry, settings=settings, ledger_dir=str(exp_dir)),
                                    resources)
    callback = MlflowTrialCallback(tracking_uri, experiment_id, parent.run_id, sweep.name, str(exp_dir),
                                   source=provenance.script_name(sweep.source))

    status = "FAILED"  # unless the code below says otherwise
    try:
        try:
            # the driver's git commit/dirty flag and the sweep's name reach every trial process, also
            # on cluster nodes whose synced code has no .git (secsweep.provenance). A local Ray inherits
            # the driver's environment; a runtime_env there would cost fresh worker processes (~2 s)
            worker_env = provenance.worker_env(exp_dir.name)
            if args.address is None:
                os.environ.update(worker_env)
            ray.init(address=args.address, include_dashboard=False if args.address is None else None,
                     logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                     runtime_env=None if args.address is None else {"env_vars": worker_env})
            if args.resume:
                tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, param_space=_param_space(plan_),
                                           resume_unfinished=True, resume_errored=False)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=_param_space(plan_),
                    tune_config=_build_tune_config(plan_, args),
                    run_config=tune.RunConfig(
                        name=exp_dir.name, storage_path=str(storage),
                        failure_config=tune.FailureConfig(max_failures=args.max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                        callbacks=[callback], verbose=1,
                    ),
                )
            results = tuner.fit()
        finally:
            _shutdown_ray(ray)  # first and always: the report needs no Ray, and none may be left running
        frame = results_frame(results)
        if len(frame):
            # after Ctrl-C Tune marks the trials it stopped TERMINATED; only those the driver saw
            # complete (the ledger) are finished, the rest are resumed by --resume
            from .ledger import completed

            done = set(completed(exp_dir))
            stopped = frame["status"].eq("TERMINATED") & ~frame["trial_id"].astype(str).isin(done)
            frame.loc[stopped, "status"] = "UNFINISHED"
        unfinished = int((frame["status"] == "UNFINISHED").sum()) if len(frame) else 0
        # a trial resumed from an older checkpoint repeats epochs in Tune's history; MLflow keeps the first
        histories = {tid: df.drop_duplicates(subset="epoch", keep="first")
                     for tid, df in histories_from_results(results).items()}
        paths = write_sweep_report(frame, exp_dir, sweep, csv_path=args.results_csv, histories=histories)
        queue.log_artifacts(paths, run=parent.run_id)
        queue.set_tags({"trials": len(frame), "failed_trials": int((frame["status"] == "ERROR").sum()) if len(frame) else 0},
                       run=parent.run_id)
        print_table(frame, sweep)
        status = "KILLED" if unfinished else "FINISHED"
        if unfinished:
            print(f"\n{unfinished} trial(s) unfinished: continue with  python sweeps/{sweep.name}.py --resume {exp_dir}")
            return EXIT_INTERRUPTED
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"\ninterrupted: continue with  python sweeps/{sweep.name}.py --resume {exp_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        queue.terminate(status, run=parent.run_id)
        if not queue.drain(args.tracking_drain_timeout):
            log.warning("MLflow: %d write(s) not delivered within --tracking-drain-timeout %.0f s; they are kept in "
                        "%s and replayed by  python sweeps/%s.py --resume %s", queue.pending(),
                        args.tracking_drain_timeout, queue.journal, sweep.name, exp_dir)
        queue.close()


def _shutdown_ray(ray) -> None:
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the sweep's result does not depend on a clean shutdown
        log.exception("ray.shutdown failed")


def print_table(frame, sweep: Sweep) -> None:
    from .names import IMPLANTED
    from .report import NOT_IMPLANTED_NOTE, declared_metrics, display_columns, seed_summary, summary_markdown, \
        trainable_metrics

    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        print()
        print(frame[display_columns(frame, sweep.columns)].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    declared = [*sweep.objectives, sweep.selection[0], *sweep.columns, *trainable_metrics(frame)]
    summary = seed_summary(frame, metrics=declared_metrics(frame, declared))
    if len(summary) and summary["n"].max() > 1:
        print("\nper grid point over seeds:\n" + summary_markdown(summary))
    elif IMPLANTED in frame.columns and frame[IMPLANTED].eq(0.0).any():
        print(f"\n{IMPLANTED} = 0: {NOT_IMPLANTED_NOTE}")


def main(sweep: Sweep) -> None:
    sys.exit(run(sweep))
