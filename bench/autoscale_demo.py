"""Autoscaling, simulated: cluster.yaml's node types on Ray's fake multi-node provider, on this machine.

    python bench/autoscale_demo.py                 # start the fake cluster, run a tiny sweep, report, tear down
    python bench/autoscale_demo.py --print-config  # only print the derived autoscaler config (YAML)

Nobody can launch the AWS cluster from a development machine, so this starts Ray's autoscaler in its
local test mode (`provider: type: fake_multinode`, `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`): the autoscaler runs on the head as it does on AWS, and "launching a node"
starts another raylet on this machine. The fake config is generated from cluster.yaml by
`fake_cluster_config` (max_workers, upscaling_speed, idle_timeout_minutes, every worker type's
min/max_workers and resources), so the two cannot drift apart (tests/test_cluster_sim.py). The
fake nodes have no CUDA device, so each worker type's `GPU` becomes the custom resource `fake_gpu`,
and the sweep's trials ask for it with `--resources-per-trial '{"fake_gpu": 1}'`, as trials ask for
`GPU` with `--gpus-per-trial 1` on AWS. Minutes become seconds: idle_timeout_minutes is multiplied
by `--time-scale` (default 0.02: 10 minutes -> 12 s).

Isolation (other Ray sessions may run on the same machine): the fake cluster has its own temp dir
(its address file is there, so a plain `ray.init()` elsewhere never joins it), its own GCS port,
node IP 127.0.0.1, no dashboard; teardown kills exactly the processes of that temp dir (by pid,
not `ray stop`, which would stop every Ray on the machine) and checks with `ps` that none is left.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
FAKE_GPU = "fake_gpu"  # the custom resource standing in for a GPU on the fake nodes
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider names its head node type so (node_provider.py)
# every fake node's object store (bytes): the tiny sweep moves kilobytes; Ray's default (30 % of RAM
# per node) would reserve /dev/shm for each of several raylets on one machine. Ray's minimum: 75 MB
SIM_OBJECT_STORE_BYTES = 100_000_000
# Ray starts one idle Python worker per CPU when the first driver connects (8 on the head): on one
# small machine hosting every node that is seconds of CPU and ~100 MB each for nothing
SIM_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
# the autoscaler's update period in the simulation (s; Ray's default is 5)
SIM_UPDATE_INTERVAL_S = 1
# the command lists and file-sync keys the autoscaler reads; empty: the fake nodes share this machine
_EMPTY_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                "rsync_exclude", "rsync_filter")


def load_cluster_yaml(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def _fake_resources(resources: dict[str, Any]) -> dict[str, Any]:
    """A node type's resources with `GPU` renamed to FAKE_GPU (a fake node has no CUDA device, and a
    trial holding a Ray GPU would be handed one it cannot use)."""
    out = {k: v for k, v in resources.items() if k != "GPU"}
    if resources.get("GPU", 0):
        out[FAKE_GPU] = resources["GPU"]
    return out


def fake_cluster_config(cluster: dict[str, Any], *, gcs_address: str, time_scale: float = 1.0) -> dict[str, Any]:
    """The fake_multinode autoscaler config for `cluster` (cluster.yaml, parsed).

    Taken from `cluster`: max_workers, upscaling_speed, idle_timeout_minutes (times `time_scale`),
    the head's CPUs, and every worker type under its own name with its min_workers, max_workers and
    resources (GPU -> FAKE_GPU). Added for the simulation only: the provider settings Ray's fake
    provider needs, `gcs_address` (host:port of the fake head's GCS), a small object store per node.
    """
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale!r}: must be > 0")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    if head["resources"].get("GPU", 0):
        raise ValueError("cluster.yaml's head advertises GPUs; the simulation models a CPU-only head")
    nodes: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": {**_fake_resources(head["resources"])}, "node_config": {}, "max_workers": 0},
    }
    for name, t in types.items():
        if name == cluster["head_node_type"]:
            continue
        nodes[name] = {
            "resources": {**_fake_resources(t["resources"]), "object_store_memory": SIM_OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": t.get("min_workers", 0),
            "max_workers": t.get("max_workers", cluster["max_workers"]),
        }
    cfg: dict[str, Any] = {
        "cluster_name": f"{cluster['cluster_name']}-sim",
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": cluster["idle_timeout_minutes"] * time_scale,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,  # nothing to install: the nodes are processes here
            "disable_launch_config_check": True,
            # start all the nodes the autoscaler asks for in one call, as an EC2 launch does (the fake
            # provider's default starts one per call, whatever the count)
            "launch_multiple": True,
        },
        "auth": {},
        "available_node_types": nodes,
        "head_node_type": FAKE_HEAD_TYPE,
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    cfg.update({key: [] for key in _EMPTY_LISTS})
    return cfg


# ---------------------------------------------------------------------------------------- running

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(temp_dir: str) -> dict[str, str]:
    """Environment of every process of the fake cluster and of its drivers. Token authentication
    with a token of the cluster's own (a file in its temp dir, 0600): only holders of it can join
    or drive the cluster, and no token of another Ray on this machine is used or touched."""
    token = Path(temp_dir) / "auth_token"
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": str(SIM_UPDATE_INTERVAL_S),
        # Ray's switch for single-machine mode: every node address resolves to 127.0.0.1, also for the
        # worker raylets the autoscaler starts and for the drivers, instead of this machine's LAN IP
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _ps() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process, from /proc (no `ps` needed, no width limit)."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it exited meanwhile
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
        rows.append((int(entry), ppid, args))
    return rows


def cluster_processes(temp_dir: str) -> dict[int, str]:
    """pid -> command line of every process of the fake cluster: those naming its temp dir (GCS,
    raylets, agents, the autoscaler monitor) and all their descendants (Ray's worker processes,
    whose titles read `ray::...`)."""
    rows = _ps()
    ours = {pid: args for pid, _, args in rows if temp_dir in args}
    grew = True
    while grew:
        grew = False
        for pid, ppid, args in rows:
            if ppid in ours and pid not in ours:
                ours[pid] = args
                grew = True
    ours.pop(os.getpid(), None)
    return ours


def _proc_net_address(hex_address: str) -> str:
    """`0100007F:1F90` (IPv4) or a 32-digit IPv6 address and port, as /proc/net/tcp{,6} write them
    (host-order 32-bit words), to `127.0.0.1:8080` / `[::1]:8080`."""
    host, port = hex_address.split(":")
    raw = b"".join(int(host[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(host), 8))
    ip = ipaddress.ip_address(raw)
    return f"{ip}:{int(port, 16)}" if ip.version == 4 else f"[{ip}]:{int(port, 16)}"


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every TCP socket a pid in `pids` listens on (/proc: the pids'
    socket inodes, matched with the LISTEN entries of /proc/net/tcp and tcp6)."""
    owner: dict[str, str] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode(errors="replace").rsplit("/", 1)[-1][:40]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[len("socket:["):-1]] = name
        except OSError:  # exited meanwhile
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in owner:  # 0A: TCP_LISTEN
                found.add((_proc_net_address(cols[1]), owner[cols[9]]))
    return sorted(found)


def is_loopback(address: str) -> bool:
    """Whether a local address (`127.0.0.1:6379`, `[::1]:6379`, IPv4-mapped `[::ffff:127.0.0.1]:6379`)
    is loopback; `0.0.0.0`, `[::]` (every address) and `*` are not."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:  # `*` or a name
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def teardown(temp_dir: str, grace_s: float = 10.0) -> list[str]:
    """Stop the fake cluster: SIGTERM to each of its processes by pid, SIGKILL to those still there
    after `grace_s`; returns the command lines of any that survived (should be none)."""
    procs = cluster_processes(temp_dir)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and cluster_processes(temp_dir):
        time.sleep(0.5)
    for pid in cluster_processes(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    left = cluster_processes(temp_dir)
    # reap the zombies of processes this one started (`ray start` daemonises, so normally none)
    return [f"{pid} {args[:120]}" for pid, args in left.items()]


class Watcher(threading.Thread):
    """Polls the fake cluster (GCS node table, process table) every `period_s` and records when each
    worker node came and went and on which node each Ray worker process ran."""

    def __init__(self, gcs_address: str, temp_dir: str, t0: float, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.gcs_address, self.temp_dir, self.t0, self.period_s = gcs_address, temp_dir, t0, period_s
        self.stop = threading.Event()
        self.up: dict[str, float] = {}  # node id -> seconds after t0 it was first alive
        self.down: dict[str, float] = {}  # node id -> seconds after t0 it was first seen dead
        self.node_type: dict[str, str] = {}
        self.pid_node: dict[int, str] = {}  # Ray worker pid -> node id (from its raylet's --node_id)
        self.pid_last: dict[int, float] = {}  # Ray worker pid -> seconds after t0 it was last seen
        self.listening: set[tuple[str, str]] = set()  # (address, process) any cluster process listened on
        self.errors: list[str] = []

    def _poll_nodes(self, now: float) -> None:
        import ray

        for node in ray.nodes():
            nid, resources = node["NodeID"], node.get("Resources", {})
            self.node_type.setdefault(nid, "head" if "node:__internal_head__" in resources else
                                      ("worker, " + ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())
                                                              if k in ("CPU", FAKE_GPU))))
            if node["Alive"]:
                self.up.setdefault(nid, now)
            elif nid in self.up:
                self.down.setdefault(nid, now)

    def _poll_processes(self, now: float) -> None:
        rows = _ps()
        raylets = {pid: m.group(1) for pid, _, args in rows if self.temp_dir in args and "raylet/raylet" in args
                   for m in [re.search(r"--node_id=([0-9a-f]+)", args)] if m}
        for pid, ppid, args in rows:
            if ppid in raylets and args.startswith("ray::"):
                self.pid_node.setdefault(pid, raylets[ppid])
                self.pid_last[pid] = now
        self.listening.update(_listening(set(cluster_processes(self.temp_dir))))

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic() - self.t0
            try:
                self._poll_nodes(now)
                self._poll_processes(now)
            except Exception as e:  # noqa: BLE001 - a missed poll only blurs a timing
                self.errors.append(f"{now:.1f}s {type(e).__name__}: {e}")
            self.stop.wait(self.period_s)


def _trial_results(storage: Path) -> list[dict[str, Any]]:
    """Last result of every trial of the sweep under `storage` (Tune's result.json files)."""
    out = []
    for path in sorted(storage.glob("tiny_sweep-*/*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out.append({"trial": lines[-1].get("trial_id", path.parent.name),
                        "pid": lines[-1].get("pid"), "epochs": len(lines),
                        "poison_ratio": lines[-1].get("config", {}).get("params", {}).get("poison_ratio"),
                        "asr": lines[-1].get("asr"), "clean_acc": lines[-1].get("clean_acc"),
                        "first": lines[0].get("timestamp"), "last": lines[-1].get("timestamp")})
    return out


def run_demo(cluster_yaml: Path, time_scale: float, sweep_argv: list[str], max_wait_s: float,
             keep: bool) -> dict[str, Any]:
    """Start the fake cluster, run the tiny sweep on it, wait for the workers to be removed, tear
    down. Returns what happened (also printed)."""
    port = _free_port()
    gcs = f"127.0.0.1:{port}"
    cfg = fake_cluster_config(load_cluster_yaml(cluster_yaml), gcs_address=gcs, time_scale=time_scale)
    # short: Ray puts Unix sockets under it (108-byte path limit)
    temp_dir = tempfile.mkdtemp(prefix="ssfake-", dir="/tmp")
    cfg_path = Path(temp_dir) / "autoscaling.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    head = cfg["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    env = _ray_env(temp_dir)
    report: dict[str, Any] = {"gcs_address": gcs, "temp_dir": temp_dir,
                              "idle_timeout_s": cfg["idle_timeout_minutes"] * 60, "config": cfg}
    t0 = time.monotonic()
    watcher = None
    try:
        start = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                 "--node-ip-address=127.0.0.1", f"--num-cpus={head.get('CPU', 1)}", "--num-gpus=0",
                 f"--object-store-memory={SIM_OBJECT_STORE_BYTES}", "--include-dashboard=false",
                 # Ray still runs a minimal dashboard process (no UI) on the head: a free port, not 8265,
                 # which another Ray on this machine may hold
                 f"--dashboard-port={_free_port()}",
                 f"--temp-dir={temp_dir}", f"--autoscaling-config={cfg_path}", "--disable-usage-stats",
                 f"--system-config={json.dumps(SIM_SYSTEM_CONFIG)}"]
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=120)
        report["head_up_s"] = time.monotonic() - t0
        print(f"[{report['head_up_s']:6.1f}s] head up at {gcs} (temp dir {temp_dir}); worker types: "
              + ", ".join(f"{n} {t['min_workers']}..{t['max_workers']} x {t['resources']}"
                          for n, t in cfg["available_node_types"].items() if n != FAKE_HEAD_TYPE)
              + f"; idle timeout {report['idle_timeout_s']:.0f} s", flush=True)
        os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_")})  # before ray is imported
        import ray

        # this process only reads the node table (a driver that asks for no resources)
        ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
        watcher = Watcher(gcs, temp_dir, t0)
        watcher.start()
        storage = Path(temp_dir) / "results"
        argv = [sys.executable, str(ROOT / "tests" / "scripts" / "tiny_sweep.py"), "--address", gcs,
                "--resources-per-trial", json.dumps({FAKE_GPU: 1}), "--storage-path", str(storage),
                "--tracking-uri", f"sqlite:///{temp_dir}/mlflow.db", "--set", "attack_epochs=2",
                "--tracking-drain-timeout", "30", *sweep_argv]
        sweep_start = time.monotonic() - t0
        print(f"[{sweep_start:6.1f}s] sweep: {' '.join(argv[1:])}", flush=True)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=max_wait_s, cwd=temp_dir)
        sweep_end = time.monotonic() - t0
        report.update(sweep_rc=proc.returncode, sweep_start_s=sweep_start, sweep_end_s=sweep_end)
        print(f"[{sweep_end:6.1f}s] sweep exited {proc.returncode}", flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        # wait for the autoscaler to remove every idle worker (min_workers 0 everywhere)
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            workers = [n for n in watcher.up if watcher.node_type.get(n) != "head"]
            if workers and all(n in watcher.down for n in workers):
                break
            time.sleep(0.5)
        watcher.stop.set()
        watcher.join(timeout=5)
        report["listening"] = sorted(watcher.listening)
        report["trials"] = _trial_results(storage)
    finally:
        if watcher is not None:
            watcher.stop.set()
        if "ray" in sys.modules:  # this process's own driver first, then the cluster
            sys.modules["ray"].shutdown()
        report["left_over"] = teardown(temp_dir)
        report["teardown_s"] = time.monotonic() - t0
        if not keep and not report["left_over"]:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if watcher is not None:
        report.update(up=watcher.up, down=watcher.down, node_type=watcher.node_type, poll_errors=watcher.errors)
        # each trial's node, and until when a trial process lived there (Tune ends a trial's actor,
        # and frees its resources, when it is done): a node is idle from then until it is removed
        busy: dict[str, float] = {}
        for t in report.get("trials", []):
            t["node"] = watcher.pid_node.get(t["pid"])
            if t["node"] is not None:
                busy[t["node"]] = max(busy.get(t["node"], 0.0), watcher.pid_last[t["pid"]])
        report["busy_until"] = busy
    _print_report(report)
    return report


def _print_report(r: dict[str, Any]) -> None:
    up, down, kind = r.get("up", {}), r.get("down", {}), r.get("node_type", {})
    workers = sorted((n for n in up if kind.get(n) != "head"), key=lambda n: up[n])
    short = {n: f"node ...{n[-5:]}" for n in up}
    print("\nnodes (seconds since the head started):")
    for n in sorted(up, key=lambda n: up[n]):
        gone = f"removed at {down[n]:6.1f}s" if n in down else "still up at the end"
        print(f"  {short[n]}  {kind.get(n, '?'):<28} up at {up[n]:6.1f}s  {gone}")
    print("trials:")
    for t in r.get("trials", []):
        node = t.get("node")
        print(f"  {t['trial']}  poison_ratio={t['poison_ratio']}  epochs={t['epochs']}  asr={t['asr']:.3f}  "
              f"clean_acc={t['clean_acc']:.3f}  on {short.get(node, 'unknown node') if node else 'unknown node'}"
              f" ({kind.get(node, '?') if node else 'pid ' + str(t['pid'])})")
    print(f"sweep exit code {r.get('sweep_rc')}; {len(workers)} worker(s) started, "
          f"{sum(n in down for n in workers)} removed; idle timeout {r['idle_timeout_s']:.0f} s")
    if workers and "sweep_end_s" in r:
        print(f"  first worker up {up[workers[0]] - r['sweep_start_s']:.1f} s after the sweep started; "
              + "; ".join(f"{short[n]} removed {down[n] - r['busy_until'][n]:.1f} s after its last trial ended"
                          for n in workers if n in down and n in r["busy_until"]))
    non_local = [a for a, _ in r.get("listening", []) if not is_loopback(a)]
    print(f"listening sockets of the cluster: {len(r.get('listening', []))}, not on loopback: "
          f"{non_local or 'none'}")
    print(f"teardown done at {r['teardown_s']:.1f}s; processes left: {r['left_over'] or 'none'}")
    for e in r.get("poll_errors", [])[:5]:
        print("  poll error:", e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-yaml", type=Path, default=CLUSTER_YAML)
    p.add_argument("--time-scale", type=float, default=0.02, help="idle_timeout_minutes multiplier (0.02: 10 min -> 12 s)")
    p.add_argument("--print-config", action="store_true", help="print the derived fake config and exit")
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for the sweep, then for scale-down")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, results) after teardown")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.add_argument("sweep_args", nargs="*", help="extra tiny_sweep.py flags (after --)")
    args = p.parse_args(argv)
    if args.print_config:
        cfg = fake_cluster_config(load_cluster_yaml(args.cluster_yaml), gcs_address="127.0.0.1:PORT",
                                  time_scale=args.time_scale)
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    r = run_demo(args.cluster_yaml, args.time_scale, args.sweep_args, args.max_wait, args.keep)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in r.items()}, indent=2, default=str))
    workers = [n for n in r.get("up", {}) if r["node_type"].get(n) != "head"]
    ok = (r.get("sweep_rc") == 0 and workers and all(n in r["down"] for n in workers) and not r["left_over"]
          and all(is_loopback(a) for a, _ in r.get("listening", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
