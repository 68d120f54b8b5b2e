"""Autoscaling, simulated (bench/autoscale_demo.py): the fake multi-node config is cluster.yaml's
node types, limits and idle timeout, Ray's autoscaler and fake provider accept it, the sweep CLI's
--resources-per-trial is validated, and an end-to-end run scales a worker type up from zero for a
sweep whose trials ask for `fake_gpu` and back down after the idle timeout, on loopback only,
leaving no process behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

import secsweep.sweep as sw
from conftest import ROOT

_spec = importlib.util.spec_from_file_location("autoscale_demo", ROOT / "bench" / "autoscale_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

GCS = "127.0.0.1:6390"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _workers(cfg: dict, head: str) -> dict:
    return {n: t for n, t in cfg["available_node_types"].items() if n != head}


# ------------------------------------------------------------------------- derived configuration


def test_fake_config_is_cluster_yaml_with_gpus_renamed(cluster):
    fake = demo.fake_cluster_config(cluster, gcs_address=GCS, time_scale=1.0)
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["provider"]["gcs_address"] == GCS
    for key in ("max_workers", "upscaling_speed", "idle_timeout_minutes"):
        assert fake[key] == cluster[key], key
    real_workers = _workers(cluster, cluster["head_node_type"])
    fake_workers = _workers(fake, fake["head_node_type"])
    assert set(fake_workers) == set(real_workers) == {"gpu_worker"}
    for name, real in real_workers.items():
        sim = fake_workers[name]
        assert sim["min_workers"] == real["min_workers"] == 0  # scale from zero, as on AWS
        assert sim["max_workers"] == real["max_workers"]
        assert sim["resources"]["CPU"] == real["resources"]["CPU"]
        assert sim["resources"][demo.FAKE_GPU] == real["resources"]["GPU"] >= 1
        assert "GPU" not in sim["resources"]  # the fake nodes have no CUDA device
    head = fake["available_node_types"][fake["head_node_type"]]
    assert head["resources"] == {"CPU": cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"]}
    assert head["max_workers"] == 0


def test_idle_timeout_is_scaled_not_replaced(cluster):
    fake = demo.fake_cluster_config(cluster, gcs_address=GCS, time_scale=0.02)
    assert fake["idle_timeout_minutes"] == pytest.approx(cluster["idle_timeout_minutes"] * 0.02)
    with pytest.raises(ValueError, match="time_scale"):
        demo.fake_cluster_config(cluster, gcs_address=GCS, time_scale=0)


def test_fake_config_follows_edits_of_cluster_yaml(cluster):
    """Derived, not copied: change cluster.yaml's numbers and node types, the fake config follows."""
    edited = copy.deepcopy(cluster)
    edited["max_workers"] = 7
    edited["idle_timeout_minutes"] = 3
    edited["upscaling_speed"] = 2.5
    edited["available_node_types"]["gpu_worker"].update(min_workers=1, max_workers=3,
                                                         resources={"CPU": 8, "GPU": 2})
    edited["available_node_types"]["cpu_worker"] = {"min_workers": 0, "max_workers": 2,
                                                    "resources": {"CPU": 16}, "node_config": {}}
    edited["available_node_types"]["head"]["resources"] = {"CPU": 4, "GPU": 0}
    fake = demo.fake_cluster_config(edited, gcs_address=GCS, time_scale=0.5)
    assert (fake["max_workers"], fake["upscaling_speed"], fake["idle_timeout_minutes"]) == (7, 2.5, 1.5)
    workers = _workers(fake, fake["head_node_type"])
    assert {n: (t["min_workers"], t["max_workers"]) for n, t in workers.items()} == \
        {"gpu_worker": (1, 3), "cpu_worker": (0, 2)}
    assert {k: v for k, v in workers["gpu_worker"]["resources"].items() if k != "object_store_memory"} == \
        {"CPU": 8, demo.FAKE_GPU: 2}
    assert {k: v for k, v in workers["cpu_worker"]["resources"].items() if k != "object_store_memory"} == {"CPU": 16}
    assert fake["available_node_types"][fake["head_node_type"]]["resources"] == {"CPU": 4}


def test_a_gpu_head_is_refused(cluster):
    edited = copy.deepcopy(cluster)
    edited["available_node_types"]["head"]["resources"]["GPU"] = 1
    with pytest.raises(ValueError, match="CPU-only head"):
        demo.fake_cluster_config(edited, gcs_address=GCS)


def test_rays_autoscaler_and_fake_provider_accept_it(cluster, monkeypatch):
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler._private.util import validate_config
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    fake = demo.fake_cluster_config(cluster, gcs_address=GCS, time_scale=0.02)
    validate_config(fake)  # the checks the autoscaler's monitor runs on the file (schema and cross-field)
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    provider = FakeMultiNodeProvider(fake["provider"], fake["cluster_name"])  # starts nothing yet
    heads = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    # the provider names its head node type itself; the config's head type must be that name
    assert [provider.node_tags(h)[TAG_RAY_USER_NODE_TYPE] for h in heads] == [fake["head_node_type"]]


def test_listening_sockets_are_found_in_proc():
    assert demo._proc_net_address("0100007F:1F90") == "127.0.0.1:8080"
    assert demo._proc_net_address("0000000000000000FFFF00000100007F:0050") == "[::ffff:7f00:1]:80"
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        found = {address for address, _ in demo._listening({os.getpid()})}
        assert f"127.0.0.1:{v4.getsockname()[1]}" in found, found
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6) as v6:
            try:
                v6.bind(("::1", 0))
            except OSError:  # no IPv6 loopback here: the IPv4 check above still ran
                return
            v6.listen()
            found = {address for address, _ in demo._listening({os.getpid()})}
            assert f"[::1]:{v6.getsockname()[1]}" in found, found


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("[::ffff:127.0.0.1]:41101", True), ("[::ffff:7f00:1]:41101", True),
    ("[::1]:8265", True),
    ("0.0.0.0:6379", False), ("*:6379", False), ("[::]:6379", False), ("192.0.2.2:6379", False),
])
def test_is_loopback(address, loopback):
    assert demo.is_loopback(address) is loopback


# ------------------------------------------------------------------------- --resources-per-trial


@pytest.fixture
def no_launch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launched = []
    monkeypatch.setattr(sw, "_launch", lambda plan, args: launched.append(args) or 0)
    return launched


def _tiny_sweep():
    import runpy

    return runpy.run_path(str(ROOT / "tests" / "scripts" / "tiny_sweep.py"), run_name="cluster_sim")["SWEEP"]


@pytest.mark.parametrize("value, says", [
    ("{fake_gpu: 1}", "must be a JSON object"),
    ('["fake_gpu"]', "must be a non-empty JSON object"),
    ("{}", "must be a non-empty JSON object"),
    ('{"fake_gpu": -1}', "must be a finite number > 0"),
    ('{"fake_gpu": 0}', "must be a finite number > 0"),
    ('{"fake_gpu": "1"}', "must be a finite number > 0"),
    ('{"fake_gpu": true}', "must be a finite number > 0"),
    ('{"fake_gpu": NaN}', "must be a finite number > 0"),
    ('{"fake_gpu": 1.5}', "whole number"),
    ('{"GPU": 1}', "--gpus-per-trial"),
    ('{"cpu": 1}', "--cpus-per-trial"),
])
def test_bad_resources_per_trial_is_one_line_exit_2(no_launch, capsys, value, says):
    code = sw.run(_tiny_sweep(), ["--resources-per-trial", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not no_launch
    assert len(err) == 1 and err[0].startswith(f"error: --resources-per-trial={value!r}: ") and says in err[0], err


def test_resources_per_trial_with_train_workers_is_refused(no_launch, capsys):
    code = sw.run(_tiny_sweep(), ["--resources-per-trial", '{"fake_gpu": 1}', "--num-workers", "2",
                                  "--set", "attack_batch_size=64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not no_launch and "not supported with --num-workers=2" in err, err


def test_good_resources_per_trial_reaches_the_launch(no_launch):
    assert sw.run(_tiny_sweep(), ["--resources-per-trial", '{"fake_gpu": 1, "accel_slot": 0.5}']) == 0
    (args,) = no_launch
    assert sw.custom_resources(args) == {"fake_gpu": 1.0, "accel_slot": 0.5}
    assert sw.custom_resources(sw.build_parser(_tiny_sweep()).parse_args([])) == {}


# ------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_fake_cluster_scales_up_for_fake_gpu_trials_and_back_down(tmp_path):
    """~1 min on 2 CPUs: a fake cluster from cluster.yaml (idle timeout 10 min x 0.02 = 12 s), the
    tiny sweep's two smoke trials each asking for one fake_gpu. The head has none, so the
    autoscaler must start gpu_worker nodes; each trial runs on one; after the sweep every worker
    is removed once idle for the timeout; every socket is on loopback; no process is left."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "autoscale_demo.py"), "--json", str(out),
                           "--max-wait", "240", "--", "--smoke-test"],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    workers = [n for n in r["up"] if r["node_type"][n] != "head"]
    # from zero, one per pending trial; Ray's autoscaler may add one more while nodes boot (seen with
    # 3 trials: 4 workers, the spare removed unused), never past cluster.yaml's max_workers
    assert 2 <= len(workers) <= r["config"]["max_workers"], (r["up"], r["node_type"])
    assert all(r["node_type"][n].startswith("worker") and "fake_gpu=1" in r["node_type"][n] for n in workers)
    assert all(r["up"][n] > r["sweep_start_s"] for n in workers)  # started for the sweep, not before
    nodes = [t["node"] for t in r["trials"]]
    assert len(r["trials"]) == 2 and len(set(nodes)) == 2 and set(nodes) <= set(workers), r["trials"]  # one each
    assert all(0 <= t["asr"] <= 1 and 0 <= t["clean_acc"] <= 1 for t in r["trials"])
    for n in workers:  # removed, and only after being idle for the timeout (polls: 0.5 s)
        assert n in r["down"], f"worker {n} still up"
        if n in r["busy_until"]:  # it ran a trial: idle from that trial's end until removed
            assert r["down"][n] - r["busy_until"][n] >= r["idle_timeout_s"] - 1.0, (n, r["down"], r["busy_until"])
    assert r["listening"] and all(demo.is_loopback(a) for a, _ in r["listening"]), r["listening"]
    assert r["left_over"] == []
    assert demo.cluster_processes(r["temp_dir"]) == {}  # /proc: nothing names the cluster's temp dir
    if shutil.which("ps"):  # and the same through ps, where the image has it
        assert r["temp_dir"] not in subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout
