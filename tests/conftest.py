import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def python_env(tmp_path: Path) -> dict:
    """Environment for sweep subprocesses: the repo importable, no inherited Ray cluster address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = env.get("HOME", str(tmp_path))
    return env


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors: intra-op threads only add contention on a 2-core CI machine.
    (Sweep subprocesses and the behaviour test set their own thread counts.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sweep_env(tmp_path):
    return python_env(tmp_path)


def pytest_configure(config):
    sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]


# The suite runs on two pytest-xdist workers (pyproject: -n 2 --dist loadfile): each test file runs on
# one worker, so its module-scoped fixtures (trained models, shared stages) are built once. Tests
# that start local Ray clusters may run on both workers at once: each `ray.init()` without an
# address starts its own cluster (only `ray start` publishes one that a later `ray.init()` would
# join). The fake multi-node autoscaler test times its nodes' idle shutdown and checks every socket,
# so it takes the machine-wide lock exclusively and no other Ray test runs beside it.
RAY_FILES = {"test_sweeps.py", "test_track_sweeps.py", "test_tracking_outage.py", "test_cluster_sim.py"}
RAY_EXCLUSIVE = {"test_cluster_sim.py"}
RAY_LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "secsweep-tests-ray.lock"


@pytest.fixture(autouse=True)
def _one_ray_cluster_at_a_time(request):
    name = request.node.path.name
    if name not in RAY_FILES:
        yield
        return
    import fcntl

    with open(RAY_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if name in RAY_EXCLUSIVE else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# In CI (CI=true, as .ci/run is run) a skipped test is a hole: only tests that need a CUDA device,
# which CI never has, may skip; any other skip is turned into a failure that says why.
ALLOWED_CI_SKIP = "CUDA"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() in ("1", "true") and report.skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if ALLOWED_CI_SKIP not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, which must run every test but the CUDA ones: {reason}"


def processes_with(token: str) -> list[int]:
    """Live processes whose environment holds `token` (a sweep's driver, Ray's raylet, GCS, workers
    all inherit it), whatever process group or session they moved to."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token.encode() in env.read_bytes() and Path(env.parent, "stat").read_text().split()[2] != "Z":
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def processes_after(token: str, grace_s: float = 30) -> list[int]:
    """processes_with(token) once they had `grace_s` seconds to exit (Ray's stop asynchronously)."""
    deadline = time.time() + grace_s
    while (left := processes_with(token)) and time.time() < deadline:
        time.sleep(0.5)
    return left
