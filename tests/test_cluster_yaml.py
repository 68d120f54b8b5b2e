"""cluster.yaml: valid for Ray's own autoscaler, opens nothing but SSH, shaped as documented.

Offline and fast: nothing here contacts AWS. Validation runs the same two functions `ray up`
runs before the provider bootstrap (prepare_config merges the AWS defaults, validate_config
checks Ray's ray-schema.json plus its own cross-field rules).
"""

from __future__ import annotations

import ast
import copy
import ipaddress
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# Ports that must only ever be reachable through SSH port-forwarding or from cluster members:
# dashboard, MLflow, GCS, Ray client server.
PRIVATE_PORTS = (8265, 5000, 6379, 10001)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------- schema


def test_validates_against_rays_autoscaler_schema(config):
    prepared = _ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "secsweep"


def _unknown_top_level_key(c):
    c["max_wokers"] = 4


def _wrong_type(c):
    c["idle_timeout_minutes"] = "ten"


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _unknown_security_group_key(c):
    c["provider"]["security_group"]["IpPermission"] = []


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu_worker"]["min_worker"] = 0


def _head_type_missing(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_above_max_workers(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "break_it, error",
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_wrong_type, jsonschema.ValidationError),
        (_fractional_gpu_resource, jsonschema.ValidationError),
        (_unknown_security_group_key, jsonschema.ValidationError),
        (_unknown_node_type_key, jsonschema.ValidationError),
        (_head_type_missing, ValueError),
        (_min_workers_above_max_workers, ValueError),
    ],
    ids=lambda v: getattr(v, "__name__", "").lstrip("_"),
)
def test_validator_rejects_broken_copies(config, break_it, error):
    """Proves the validation above has teeth: small breakages of the real file fail."""
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(error):
        _ray_validate(broken)


# ---------------------------------------------------------------------------- security


def _ray_default_ssh_rules() -> list[dict]:
    """The SSH rule Ray's AWS bootstrap always adds, read from the installed Ray source.

    Parsed rather than imported: the module needs boto3, which the test env lacks.
    """
    import ray.autoscaler

    src = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_create_default_ssh_inbound_rules":
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            return ast.literal_eval(returns[0].value)
    pytest.fail(f"Ray's default SSH rule not found in {src}; re-check the security tests")


def _cidrs(rule: dict) -> list[str]:
    return [r["CidrIp"] for r in rule.get("IpRanges", [])] + [
        r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])
    ]


def _is_world(cidr: str) -> bool:
    return ipaddress.ip_network(cidr, strict=False).prefixlen == 0


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))


def _is_ssh_only(rule: dict) -> bool:
    return (
        str(rule.get("IpProtocol")) == "tcp"
        and int(rule.get("FromPort", -1)) == 22
        and int(rule.get("ToPort", -1)) == 22
    )


def test_ingress_opens_only_ssh_to_the_world(config):
    extra = config["provider"]["security_group"].get("IpPermissions", [])
    effective = _ray_default_ssh_rules() + extra  # what Ray sends to authorize_ingress
    assert effective, "expected at least Ray's SSH rule"
    for rule in effective:
        if any(_is_world(c) for c in _cidrs(rule)):
            assert _is_ssh_only(rule), f"rule opens more than tcp/22 to the world: {rule}"
    for rule in extra:
        # Extra rules may only reach other ports through group membership, never an IP range
        # (and therefore never the dashboard or MLflow).
        if _cidrs(rule) or rule.get("PrefixListIds"):
            assert _is_ssh_only(rule), f"IP-range rule for a port other than 22: {rule}"
        for port in PRIVATE_PORTS:
            if _cidrs(rule):
                assert not _covers(rule, port), f"rule exposes port {port}: {rule}"


def test_extra_rules_do_not_repeat_rays_defaults(config):
    # AWS rejects an authorize_ingress call that carries the same permission twice.
    extra = config["provider"]["security_group"].get("IpPermissions", [])
    for rule in _ray_default_ssh_rules():
        assert rule not in extra, "Ray already adds this rule; repeating it breaks `ray up`"
    assert len({repr(sorted(r.items())) for r in extra}) == len(extra)


def test_ray_manages_the_security_group(config):
    # With SecurityGroupIds (or NetworkInterfaces) in a node_config, Ray skips its own group
    # and the rules checked above would not be the rules in force.
    for name, node_type in config["available_node_types"].items():
        nc = node_type["node_config"]
        assert "SecurityGroupIds" not in nc and "NetworkInterfaces" not in nc, name


def _all_commands(cfg: dict) -> list[str]:
    keys = [k for k in cfg if k.endswith("_commands")]
    cmds = [c for k in keys for c in cfg[k]]
    for node_type in cfg["available_node_types"].values():
        cmds += [c for k in node_type if k.endswith("_commands") for c in node_type[k]]
    return cmds


def _flag(cmd: str, *names: str) -> str | None:
    """Value of `--flag value` or `--flag=value` in a shell command, else None."""
    tokens = shlex.split(cmd, posix=True)
    for i, tok in enumerate(tokens):
        for name in names:
            if tok == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return None


def test_dashboard_binds_loopback(config):
    heads = [c for c in config["head_start_ray_commands"] if re.search(r"\bray start\b.*--head", c)]
    assert len(heads) == 1, heads
    assert _flag(heads[0], "--dashboard-host") == "127.0.0.1"
    for cmd in _all_commands(config):
        assert not _ANY_ADDRESS.search(cmd), f"binds or allows every address: {cmd}"


# 0.0.0.0 as an address of its own (not the tail of 10.0.0.0), or "::" as a bind host.
_ANY_ADDRESS = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])|host[= ]::?(?:\s|$)")


def test_mlflow_server_binds_loopback(config):
    servers = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1, "the head must start exactly one MLflow server"
    cmd = servers[0][servers[0].index("mlflow server") :]
    assert _flag(cmd, "--host", "-h") == "127.0.0.1"
    assert _flag(cmd, "--port", "-p") == "5000"
    assert (_flag(cmd, "--backend-store-uri") or "").startswith("sqlite:///")
    for unsafe in ("--disable-security-middleware", "--allowed-hosts", "--cors-allowed-origins"):
        assert unsafe not in cmd, unsafe
    # No other command may start a second, differently bound server.
    assert sum("mlflow server" in c for c in _all_commands(config)) == 1


# ---------------------------------------------------------------------------- structure


def test_cpu_head_and_gpu_workers_scale_from_zero(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] > 0
    assert head.get("min_workers", 0) == 0 and head.get("max_workers", 0) == 0

    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert name != config["head_node_type"]
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert 1 <= t["max_workers"] <= config["max_workers"]
        assert t["resources"]["CPU"] >= 1

    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0


def test_one_ami_for_all_node_types(config):
    amis = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(amis) == 1, amis  # same Python and Ray everywhere
    assert next(iter(amis)).startswith("ami-")


def test_repo_is_mounted_without_local_state(config):
    mounts = config["file_mounts"]
    assert mounts.get("~/secsweep") is not None
    assert (REPO / mounts["~/secsweep"]).resolve() == REPO  # relative to the repo root
    excluded = set(config["rsync_exclude"])
    for name in (".venv", ".git", "mlflow.db", "mlruns", "mlartifacts", "ray_results"):
        assert name in excluded, name


def test_setup_installs_the_project(config):
    assert any(re.search(r"pip install\b.*\s-e ~/secsweep\b", c) for c in config["setup_commands"])


def test_ray_start_commands(config):
    head = " ; ".join(config["head_start_ray_commands"])
    assert "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    workers = " ; ".join(config["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in workers


def test_storage_path_is_shared_with_workers(config):
    # Multi-node Tune/Train need a storage path every node sees: ~/ray_results is exported by
    # the head and mounted by every worker at the same path.
    head = " ; ".join(config["head_setup_commands"])
    assert "$HOME/ray_results" in head and "/etc/exports" in head and "exportfs" in head
    # NFS clients: private ranges only (the security group already limits 2049 to members).
    for client in re.findall(r"([\d.:/a-fA-F*]+)\((?:rw|ro)\b", head):
        assert client != "*" and ipaddress.ip_network(client).is_private, client
    workers = " ; ".join(config["worker_setup_commands"])
    assert re.search(r"mount -t nfs \$RAY_HEAD_IP:\$HOME/ray_results \$HOME/ray_results", workers)
    usage = CLUSTER_YAML.read_text().split("\ncluster_name:")[0]
    assert "--storage-path ~/ray_results" in usage
