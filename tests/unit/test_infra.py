"""infra/ kept true: manifests parse, versions match the pins, commands exist in the CLI.

Nothing here needs a cluster, Docker or network: the manifests are read as data, the cluster
launcher config is validated against the JSON schema that ships with the pinned Ray, and every
command line in them (and in infra/README.md) is parsed by the real CLI without running it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml

from jobs.cli import app
from jobs.submit import install_submission

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())


def _pinned_ray() -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no ray==X")


RAY = _pinned_ray()
PYTHON_TAG = PYPROJECT["tool"]["ruff"]["target-version"]  # py311: the Python the project targets
VERSION = PYPROJECT["project"]["version"]


def _documents(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((INFRA / name).read_text()))


def _one(name: str, kind: str) -> dict[str, Any]:
    (document,) = [d for d in _documents(name) if d.get("kind") == kind]
    return document


def test_the_promised_files_exist() -> None:
    for name in ("docker/Dockerfile", "k8s/raycluster.yaml", "k8s/rayjob-train.yaml",
                 "k8s/nightly-cronjob.yaml", "aws/cluster.yaml", "README.md"):  # fmt: skip
        assert (INFRA / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents
    assert all(isinstance(document, dict) and document for document in documents)


def test_cluster_launcher_config_validates_against_the_pinned_rays_schema() -> None:
    spec = importlib.util.find_spec("ray")  # finds the package without importing Ray
    assert spec is not None
    assert spec.origin is not None
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    (config,) = _documents("aws/cluster.yaml")
    jsonschema.validate(config, schema)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in command for command in config["head_start_ray_commands"])
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu
    assert all(t["min_workers"] == 0 for t in gpu)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def _images(text: str) -> list[str]:
    """Image references: YAML `image:` fields and Dockerfile FROM lines (not prose)."""
    pattern = r"^\s*(?:-\s+)?(?:image:\s*|FROM\s+)[\"']?([^\s\"']+)"
    return re.findall(pattern, text, re.MULTILINE)


def test_image_tags_and_ray_versions_match_the_pins() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert args["RAY_VERSION"] == RAY
    assert args["PYTHON_TAG"] == PYTHON_TAG
    assert args["TORCH_INDEX_URL"].endswith("/" + args["CUDA_TAG"])  # torch built for that CUDA
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}\n" in dockerfile
    ours = f"chromascan:{VERSION}-ray{RAY}-{PYTHON_TAG}-{args['CUDA_TAG']}"

    seen = 0
    for path in TEXT_FILES:
        text = path.read_text()
        for image in _images(text) + re.findall(r"\S+/chromascan:\S+", text):
            if image.startswith("rayproject/ray:$"):
                continue  # the Dockerfile's FROM, checked above
            name = image.rsplit("/", 1)[-1]
            if image.startswith("rayproject/"):
                assert name.split(":")[1].startswith(f"{RAY}-"), (path, image)
            else:
                assert name == ours, (path, image)
            seen += 1
        # Any x.y.z Ray version written anywhere in infra/ is the pinned one.
        for found in re.findall(r"(?<![\w.])2\.\d+\.\d+(?![\w.])", text):
            assert found == RAY, (path, found)
    assert seen >= 5
    assert _one("k8s/raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == RAY


def _cli() -> Any:
    group = typer.main.get_command(app)
    install_submission(group, [])  # --address, --no-wait and --forward-env on job commands
    return group


def parse_command_line(argv: list[str]) -> str:
    """Parse ``chromascan ARGV`` with the real CLI, without running it; returns the command path.

    Raises the CLI's usage error for an unknown command or option, a missing argument or a bad
    value, exactly as a user would see it.
    """
    command, words, path = _cli(), list(argv), ["chromascan"]
    while getattr(command, "commands", None) and words and words[0] in command.commands:
        path.append(words[0])
        command = command.commands[words.pop(0)]
    if getattr(command, "commands", None):
        raise typer.BadParameter(f"no such command: {' '.join(argv[: len(path)])}")
    command.make_context(" ".join(path), words)
    return " ".join(path[1:])


def _after_python_m_jobs(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "jobs"], entrypoint
    return words[3:]


def _readme_command_lines() -> list[list[str]]:
    """Every chromascan command line in infra/README.md's code blocks, comments dropped."""
    text = (INFRA / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            if line.startswith("chromascan "):
                lines.append(shlex.split(line)[1:])
            elif line.startswith("ray job submit "):
                words = shlex.split(line)
                lines.append(_after_python_m_jobs(shlex.join(words[words.index("--") + 1 :])))
    return lines


def test_manifest_and_readme_commands_exist_in_the_cli() -> None:
    train = _one("k8s/rayjob-train.yaml", "RayJob")
    assert parse_command_line(_after_python_m_jobs(train["spec"]["entrypoint"])) == "train"

    cron = _one("k8s/nightly-cronjob.yaml", "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[0] == "chromascan"
    assert parse_command_line(command[1:]) == "nightly"

    readme = _readme_command_lines()
    parsed = {parse_command_line(argv) for argv in readme}
    assert {"colorize", "jobs list", "jobs status", "jobs logs", "jobs stop"} <= parsed


def test_a_bad_command_line_is_caught() -> None:
    # The check above would let nothing through that the CLI refuses.
    for argv in (["colourize", "a", "b"], ["nightly", "a", "b", "--model", "m", "--bogus"],
                 ["nightly", "a"], ["train", "a", "--output", "o", "--workers", "0"]):  # fmt: skip
        with pytest.raises(typer.TyperException):
            parse_command_line(argv)


def test_manifests_agree_with_each_other() -> None:
    cluster = _one("k8s/raycluster.yaml", "RayCluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    spec = cluster["spec"]

    # A CPU head that takes no work; GPU and CPU worker groups that scale from 0.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for group in groups.values():
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] > 0
    (gpu_container,) = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (cpu_container,) = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]

    # The training job runs on that cluster; the nightly submitter reaches its dashboard with
    # its token, and needs no storage identity of its own.
    train = _one("k8s/rayjob-train.yaml", "RayJob")
    assert train["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    cron = _one("k8s/nightly-cronjob.yaml", "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    address = container["command"][container["command"].index("--address") + 1]
    assert address == f"http://{name}-head-svc.{namespace}.svc.cluster.local:8265"
    env = {item["name"]: item for item in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": spec["authOptions"]["secretName"], "key": "auth_token"}
    assert not [key for key in env if key.startswith("AWS_")]
    assert "--forward-env" not in container["command"]

    accounts = {d["metadata"]["name"] for d in _documents("k8s/namespace.yaml")
                if d["kind"] == "ServiceAccount"}  # fmt: skip
    assert pod["serviceAccountName"] in accounts
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in groups.values()]
    assert {p["serviceAccountName"] for p in pods} <= accounts
    for document in [cluster, train, cron]:
        assert document["metadata"]["namespace"] == namespace
    kustomization = _documents("k8s/kustomization.yaml")[0]
    assert "rayjob-train.yaml" not in kustomization["resources"]  # started on demand
    for resource in kustomization["resources"]:
        assert (INFRA / "k8s" / resource).is_file()


# --- Nothing in infra/ puts the head's ports on a network outside the cluster ---------------

# Dashboard and Jobs API, GCS, Ray client. Whoever reaches 8265 can run any command with the
# nodes' storage identity; without token auth it has no authentication at all (infra/README.md).
HEAD_PORTS = (8265, 6379, 10001)
# Kinds that route traffic from outside a Kubernetes cluster to a Service.
EXPOSING_KINDS = frozenset(
    {"Ingress", "IngressRoute", "Route", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute"}
)
WORLD = frozenset({"0.0.0.0/0", "::/0"})


def _mappings(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping inside a parsed YAML document, with its path for the failure message."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _mappings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _mappings(value, f"{where}[{index}]")


def _k8s_exposures(document: dict[str, Any]) -> list[str]:
    """Ways a Kubernetes document makes a port reachable from outside the cluster."""
    found = []
    if document.get("kind") in EXPOSING_KINDS:
        found.append(f"{document['kind']} {document.get('metadata', {}).get('name')}")
    for where, mapping in _mappings(document, str(document.get("kind"))):
        # Service.spec.type, KubeRay's headGroupSpec.serviceType and headService.spec.type.
        for key in ("type", "serviceType"):
            if mapping.get(key) in ("LoadBalancer", "NodePort"):
                found.append(f"{where}.{key}: {mapping[key]}")
        # KubeRay makes an Ingress for the head itself when asked.
        for key in ("enableIngress", "hostNetwork"):
            if mapping.get(key) is True:
                found.append(f"{where}.{key}: true")
        for key in ("hostPort", "externalIPs", "loadBalancerSourceRanges"):
            if key in mapping:
                found.append(f"{where}.{key}")
    return found


def _aws_exposures(config: dict[str, Any]) -> list[str]:
    """Security-group settings of a cluster launcher config that open a head port to anyone."""
    found = []
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        ranges |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if not ranges & WORLD:
            continue
        every_port = str(rule.get("IpProtocol")) == "-1"
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        for port in HEAD_PORTS:
            if every_port or low <= port <= high:
                found.append(f"provider.security_group: port {port} open to {sorted(ranges)}")
    # Our own group replaces the launcher's default (intra-cluster traffic and SSH only); its
    # rules live in AWS, where this test cannot see them.
    for name, node_type in config.get("available_node_types", {}).items():
        if "SecurityGroupIds" in node_type.get("node_config", {}):
            found.append(f"available_node_types.{name}.node_config.SecurityGroupIds")
    return found


def test_the_dashboard_and_jobs_api_stay_inside_the_cluster() -> None:
    cluster = _one("k8s/raycluster.yaml", "RayCluster")
    # Said explicitly rather than left to KubeRay's default, and reachable by the CronJob.
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    k8s = sorted((INFRA / "k8s").glob("*.y*ml"))
    assert len(k8s) >= 4
    for path in k8s:
        for document in yaml.safe_load_all(path.read_text()):
            assert _k8s_exposures(document) == [], path
    (config,) = _documents("aws/cluster.yaml")
    assert _aws_exposures(config) == []

    # The README says why, and how to reach the dashboard instead.
    readme = (INFRA / "README.md").read_text()
    section = readme.split("## Who can reach the cluster", 1)[1].split("\n## ", 1)[0]
    for words in ("8265", "unauthenticated", "ClusterIP", "port-forward", "ray dashboard"):
        assert words in section, words


def test_an_exposed_dashboard_is_caught() -> None:
    # The checks above must see each way of exposing the head, or they could pass by accident.
    cluster = _one("k8s/raycluster.yaml", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    exposed = [
        {"kind": "Ingress", "metadata": {"name": "dashboard"}, "spec": {}},
        {"kind": "Service", "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}},
        {**cluster, "spec": {**cluster["spec"], "headGroupSpec": {**head,
                                                                  "serviceType": "NodePort"}}},
        {**cluster, "spec": {**cluster["spec"], "headGroupSpec": {**head, "enableIngress": True}}},
        {**cluster, "spec": {**cluster["spec"], "headGroupSpec": {
            **head, "headService": {"spec": {"type": "LoadBalancer"}}}}},
        {"kind": "Pod", "spec": {"containers": [{"ports": [{"containerPort": 8265,
                                                            "hostPort": 8265}]}]}},
    ]  # fmt: skip
    for document in exposed:
        assert _k8s_exposures(document), document

    (config,) = _documents("aws/cluster.yaml")
    world_8265 = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                  "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}  # fmt: skip
    everything_v6 = {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    office_only = {**world_8265, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}
    for rule, caught in ((world_8265, True), (everything_v6, True), (office_only, False)):
        provider = {**config["provider"], "security_group": {"IpPermissions": [rule]}}
        assert bool(_aws_exposures({**config, "provider": provider})) is caught, rule
    types = {**config["available_node_types"]}
    types["head"] = {**types["head"], "node_config": {**types["head"]["node_config"],
                                                      "SecurityGroupIds": ["sg-0123"]}}  # fmt: skip
    assert _aws_exposures({**config, "available_node_types": types})
