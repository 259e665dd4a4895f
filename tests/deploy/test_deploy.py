"""Deploy artefacts checked offline: kustomize overlays, Kubernetes schemas, image, dashboards, alerts.

Rendering uses the real kustomize (`kustomize build`, or the one built into `kubectl
kustomize`); every rendered object is validated against the Kubernetes OpenAPI schemas
bundled in ``kubernetes-validate`` (strict: unknown fields fail) for the oldest and newest
supported Kubernetes versions. The other tests check what schemas cannot: that the pieces
fit each other and the server (ports, probes, selectors, drain timing, env flags, metric
names).
"""

from __future__ import annotations

import argparse
import base64
import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]  # compiled (BuildKit's parser), no stubs
import kubernetes_validate  # type: ignore[import-untyped]  # no py.typed upstream
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from spendgate_server.app import SERVICE_NAMES
from spendgate_server.metrics import Metrics
from spendgate_server.settings import ServeSettings, add_serve_arguments, settings_from_args
from spendgate_server.store.keys import generate_key

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = {"dev": "spendgate-dev", "prod": "spendgate"}  # overlay -> namespace
# Oldest Kubernetes minor we support, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Secrets an overlay expects to exist in the cluster instead of rendering them (README "Kubernetes").
EXTERNAL_SECRETS = {"dev": {"spendgate-admin-key"}, "prod": {"spendgate-redis", "spendgate-admin-key"}}
# Manifests applied by hand after an overlay (README "Kubernetes").
EXAMPLES = DEPLOY / "k8s" / "examples"
SERVER = "spendgate"  # Deployment and container-owning workload names
GRPC_PORT = 50051
METRICS_PORT = 9464
CLIENT_LABEL = {"spendgate.dev/client": "true"}
# Drain, then server.stop(grace=drain): a SIGTERMed server exits within 2 x drain; this
# much more covers closing the store and interpreter shutdown.
SHUTDOWN_SLACK_SECONDS = 5
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --- rendering ---------------------------------------------------------------------


def _kustomize() -> list[str]:
    if standalone := shutil.which("kustomize"):
        return [standalone, "build"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    pytest.fail(
        "tests/deploy/test_deploy.py needs kustomize or kubectl (which has kustomize built in) on PATH"
    )


@cache
def _render(overlay: str) -> tuple[Obj, ...]:
    result = subprocess.run(
        [*_kustomize(), str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(overlay: str) -> list[Obj]:
    """The overlay's objects, rendered once and deep-copied so tests cannot leak edits."""
    return copy.deepcopy(list(_render(overlay)))


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    """The object of ``kind`` whose name is ``name`` (or starts with ``name-`` + a kustomize hash)."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every workload object."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]


def containers(pod_spec: Obj) -> list[Obj]:
    """Containers and init containers of a pod spec."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def server_container(objects: list[Obj]) -> Obj:
    """The spendgate server container of the overlay's Deployment."""
    spec = one(objects, "Deployment", SERVER)["spec"]["template"]["spec"]
    found: list[Obj] = [c for c in spec["containers"] if c["name"] == "server"]
    (container,) = found
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector matches ``labels``."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def plain_selector(selector: Obj) -> dict[str, str]:
    """matchLabels of a LabelSelector; these manifests use no matchExpressions."""
    assert not selector.get("matchExpressions"), "the tests only understand matchLabels"
    labels: dict[str, str] = selector["matchLabels"]
    return labels


overlays = pytest.mark.parametrize("overlay", sorted(OVERLAYS))


# --- schemas -----------------------------------------------------------------------


@overlays
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(overlay: str, version: str) -> None:
    """Each object of the overlay validates, unknown fields included, against that version's schemas."""
    objects = rendered(overlay)
    assert objects
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {name} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}"
            )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_example_manifest_matches_the_kubernetes_schema(version: str) -> None:
    """The manifests the README applies by hand validate strictly too."""
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert paths
    for path in paths:
        for obj in yaml.safe_load_all(path.read_text()):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{path.name}: invalid for Kubernetes {version}"
                pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    """The validator is not vacuous: a typo in a probe (``periodSecond``) fails strict validation."""
    deployment = one(rendered("dev"), "Deployment", SERVER)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# --- the server workload -------------------------------------------------------------


@overlays
def test_objects_land_in_a_restricted_namespace(overlay: str) -> None:
    """Every namespaced object is in the overlay's namespace, which enforces the restricted Pod Security
    level."""
    objects = rendered(overlay)
    namespace = one(objects, "Namespace", OVERLAYS[overlay])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == OVERLAYS[overlay], obj["metadata"]["name"]


@overlays
def test_server_runs_three_or_more_replicas_spread_over_zones_and_nodes(overlay: str) -> None:
    """At least 3 replicas (Deployment and HPA floor), spread by zone and by node over the server's own
    pods."""
    objects = rendered(overlay)
    deployment = one(objects, "Deployment", SERVER)
    hpa = one(objects, "HorizontalPodAutoscaler", SERVER)
    assert deployment["spec"]["replicas"] >= 3
    assert hpa["spec"]["minReplicas"] >= 3
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    template = deployment["spec"]["template"]
    spread = {c["topologyKey"]: c for c in template["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert selects(plain_selector(constraint["labelSelector"]), template["metadata"]["labels"])


@overlays
def test_probes_ask_the_grpc_port_and_liveness_never_depends_on_redis(overlay: str) -> None:
    """Startup and readiness are native gRPC health checks on the gRPC port; liveness checks that port too,
    never a health name that follows the store (a Redis outage would otherwise restart every pod)."""
    container = server_container(rendered(overlay))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == GRPC_PORT
    for kind in ("startupProbe", "readinessProbe"):
        assert container[kind]["grpc"]["port"] == GRPC_PORT, kind
    assert container["readinessProbe"]["grpc"]["service"] in SERVICE_NAMES
    liveness = container["livenessProbe"]
    if "grpc" in liveness:
        assert liveness["grpc"]["port"] == GRPC_PORT
        assert liveness["grpc"].get("service", "") not in {"", *SERVICE_NAMES}
    else:
        port = liveness["tcpSocket"]["port"]
        assert ports.get(port, port) == GRPC_PORT


@overlays
def test_every_container_has_resources_and_a_locked_down_security_context(overlay: str) -> None:
    """Every container (server and Redis alike) has CPU and memory requests within limits, runs as a non-root
    UID on a read-only root filesystem with no privilege escalation, no capabilities and the RuntimeDefault
    seccomp profile, without a service account token."""
    for workload, template in pod_specs(rendered(overlay)):
        spec = template["spec"]
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for container in containers(spec):
            where = f"{workload['metadata']['name']}/{container['name']}"
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request, limit = resources["requests"][resource], resources["limits"][resource]
                assert _quantity(request) <= _quantity(limit), f"{where}: {resource} request above limit"
            security = {**pod_security, **container["securityContext"]}
            assert security["runAsNonRoot"] is True, where
            assert security["runAsUser"] > 0, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert not security["capabilities"].get("add"), where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``1``, ``384Mi``) as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


@overlays
def test_drain_fits_inside_the_termination_grace_period(overlay: str) -> None:
    """preStop + drain + stop grace (2 x SPENDGATE_DRAIN_SECONDS) + slack fit in
    terminationGracePeriodSeconds, and a NOT_SERVING drain is not long enough to fail liveness."""
    objects = rendered(overlay)
    spec = one(objects, "Deployment", SERVER)["spec"]["template"]["spec"]
    container = server_container(objects)
    env = _env(container)
    drain = float(env["SPENDGATE_DRAIN_SECONDS"]["value"]) if "SPENDGATE_DRAIN_SECONDS" in env else 5.0
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert set(pre_stop) <= {"sleep"}, "only a preStop sleep has a known duration"
    pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds", 0)
    needed = pre_stop_seconds + 2 * drain + SHUTDOWN_SLACK_SECONDS
    assert spec["terminationGracePeriodSeconds"] >= needed
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > 2 * drain


@overlays
def test_selectors_match_the_pods_they_are_meant_for(overlay: str) -> None:
    """Deployment, both Services, PDB, NetworkPolicy and spread constraints select the server pods (and only
    workloads' own pods); the HPA targets the Deployment; Service target ports exist on the container."""
    objects = rendered(overlay)
    deployment = one(objects, "Deployment", SERVER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(plain_selector(deployment["spec"]["selector"]), pod_labels)
    port_names = {p["name"] for p in server_container(objects)["ports"]}
    for name in ("spendgate", "spendgate-headless"):
        service = one(objects, "Service", name)
        assert selects(service["spec"]["selector"], pod_labels), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: {port['targetPort']}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        assert selects(
            plain_selector(
                one(objects, kind, SERVER)["spec"]["selector" if kind != "NetworkPolicy" else "podSelector"]
            ),
            pod_labels,
        ), kind
    target = one(objects, "HorizontalPodAutoscaler", SERVER)["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", SERVER)
    # No workload's selector also matches another workload's pods (a rollout would fight over them).
    workloads = list(pod_specs(objects))
    for owner, _ in workloads:
        for other, template in workloads:
            if other is not owner:
                assert not selects(plain_selector(owner["spec"]["selector"]), template["metadata"]["labels"])


@overlays
def test_headless_service_is_for_clients_and_cluster_ip_for_admin_tools(overlay: str) -> None:
    """spendgate-headless (clusterIP None, only ready pods) serves gRPC on 50051; spendgate is a ClusterIP
    with the gRPC and metrics ports."""
    objects = rendered(overlay)
    headless = one(objects, "Service", "spendgate-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False)
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", GRPC_PORT)]
    admin = one(objects, "Service", "spendgate")["spec"]
    assert admin.get("type", "ClusterIP") == "ClusterIP" and admin.get("clusterIP") != "None"
    assert {(p["name"], p["port"]) for p in admin["ports"]} == {
        ("grpc", GRPC_PORT),
        ("metrics", METRICS_PORT),
    }


@overlays
def test_network_policy_admits_labelled_clients_to_grpc_and_prometheus_to_metrics(overlay: str) -> None:
    """The server's NetworkPolicy has exactly two ingress rules: gRPC from pods labelled
    spendgate.dev/client=true, metrics from Prometheus; no rule admits every source, and nothing reaches the
    other port."""
    objects = rendered(overlay)
    policy = one(objects, "NetworkPolicy", SERVER)["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    container_ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    rules: dict[int, list[Obj]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        (port,) = rule["ports"]
        rules[container_ports.get(port["port"], port["port"])] = rule["from"]
    assert set(rules) == {GRPC_PORT, METRICS_PORT}
    assert all(peer["podSelector"]["matchLabels"] == CLIENT_LABEL for peer in rules[GRPC_PORT])
    assert all(
        peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "prometheus"
        and "namespaceSelector" in peer
        for peer in rules[METRICS_PORT]
    )


@overlays
def test_server_env_is_exactly_what_spendgate_serve_accepts(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SPENDGATE_* variable names a real `spendgate serve` flag and, read the way the server reads them,
    the values (the ConfigMap's rules file included) pass its validation; host is 0.0.0.0 and ports match the
    pod."""
    objects = rendered(overlay)
    container = server_container(objects)
    template = one(objects, "Deployment", SERVER)["spec"]["template"]
    # Service links would define SPENDGATE_PORT=tcp://... from the Service named spendgate.
    assert template["spec"]["enableServiceLinks"] is False
    for name in [name for name in os.environ if name.startswith("SPENDGATE_")]:
        monkeypatch.delenv(name)
    for name, var in _env(container).items():
        value = var.get("value", "redis://redis.invalid:6379/0" if "valueFrom" in var else "")
        if name == "SPENDGATE_ADMIN_KEY_FILE":
            key_file = tmp_path / "admin-key"
            key_file.write_text(generate_key())
            value = str(key_file)
        if name == "SPENDGATE_CONFIG":
            config = tmp_path / "config.yaml"
            config.write_text(_config_map_file(objects, template["spec"], container, value))
            value = str(config)
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)  # reads SPENDGATE_* now, as `spendgate serve` does
    known = {"SPENDGATE_" + action.dest.upper() for action in parser._actions if action.option_strings}
    unknown = set(_env(container)) - known
    assert not unknown, f"not spendgate serve flags: {sorted(unknown)}"
    settings = settings_from_args(parser.parse_args([]))
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", GRPC_PORT, METRICS_PORT)  # noqa: S104
    assert settings.store == "redis"
    assert settings.default_config != ServeSettings().default_config, "the ConfigMap's rules were not loaded"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)


def _config_map_file(objects: list[Obj], spec: Obj, container: Obj, path: str) -> str:
    """The text of the file at ``path`` in the container, read from the ConfigMap volume mounted there."""
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            config_map = next(
                o
                for o in objects
                if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
            )
            text: str = config_map["data"][path.removeprefix(mount["mountPath"].rstrip("/") + "/")]
            return text
    pytest.fail(f"nothing mounted at {path}")


@overlays
def test_every_referenced_config_map_and_secret_exists(overlay: str) -> None:
    """Volumes and env references name a ConfigMap or Secret rendered in the overlay (hash suffix included),
    or a Secret the overlay documents as created out of band."""
    objects = rendered(overlay)
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    external = {("Secret", name) for name in EXTERNAL_SECRETS.get(overlay, set())}
    for workload, template in pod_specs(objects):
        spec = template["spec"]
        wanted = [("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v]
        wanted += [("Secret", v["secret"]["secretName"]) for v in spec.get("volumes", []) if "secret" in v]
        for container in containers(spec):
            for var in container.get("env", []):
                source = var.get("valueFrom", {})
                if "secretKeyRef" in source:
                    wanted.append(("Secret", source["secretKeyRef"]["name"]))
                if "configMapKeyRef" in source:
                    wanted.append(("ConfigMap", source["configMapKeyRef"]["name"]))
        for ref in wanted:
            assert ref in present | external, f"{workload['metadata']['name']} refers to missing {ref}"
    assert external <= {("Secret", "spendgate-redis"), ("Secret", "spendgate-admin-key")}


def test_dev_redis_keeps_budgets_in_an_append_only_file() -> None:
    """The dev Redis writes an AOF fsynced every second to a PersistentVolume, never evicts keys, and is what
    the server's Redis URL Secret points at."""
    objects = rendered("dev")
    redis = one(objects, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["command"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert (mount["name"], mount["mountPath"]) == (claim["metadata"]["name"], options["--dir"])
    secret = one(objects, "Secret", "spendgate-redis")
    url = base64.b64decode(secret["data"]["url"]).decode()
    service = one(objects, "Service", "redis")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])


# --- the container image -------------------------------------------------------------


def _dockerfile() -> list[Any]:
    commands: list[Any] = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    return commands


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in _dockerfile():
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def test_image_is_multi_stage_on_a_pinned_python_311_slim_base() -> None:
    """BuildKit's own parser reads the Dockerfile; both stages build FROM the ARG default, a fully versioned
    python:3.11.N-slim tag (a digest may be added), never a floating tag."""
    commands = _dockerfile()
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"])
    stages = _stages()
    assert len(stages) >= 2
    assert all(stage[0].value[0] == "${PYTHON_IMAGE}" for stage in stages)


def test_final_image_runs_as_the_pods_numeric_non_root_user_without_build_tools() -> None:
    """The last stage runs as UID:GID 10001 (the pods' runAsUser/runAsGroup), installs nothing itself, copies
    only the builder's venv and starts `spendgate serve` in exec form (PID 1 gets SIGTERM)."""
    final = _stages()[-1]
    (user,) = [c.value[0] for c in final if c.cmd == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 0 and gid > 0
    for command in final:
        if command.cmd == "RUN":
            assert not re.search(r"\b(apt-get|apk|pip|gcc|make)\b", command.value[0]), command.original
        if command.cmd in {"COPY", "ADD"}:
            assert command.cmd == "COPY" and "--from=builder" in command.flags, command.original
            assert command.value == ("/opt/venv", "/opt/venv")
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    assert entrypoint.json and cmd.json
    assert [*entrypoint.value, *cmd.value] == ["spendgate", "serve"]
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        security = {
            **one(objects, "Deployment", SERVER)["spec"]["template"]["spec"]["securityContext"],
            **server_container(objects)["securityContext"],
        }
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid), overlay


def test_builder_installs_the_lock_then_spendgate_non_editable() -> None:
    """Dependencies come only from the lock (exact pins, wheels only, --no-deps), spendgate's three packages
    are built as regular wheels, and `pip check` proves nothing is missing."""
    run = " ".join(c.value[0] for c in _stages()[0] if c.cmd == "RUN")
    assert re.search(r"install\s+--no-deps --only-binary=:all: -r /tmp/requirements\.txt", run)
    assert re.search(
        r"wheel --no-deps --no-build-isolation .* /src/protos/python /src/clients/python /src\b", run
    )
    assert " -e " not in run and "--editable" not in run
    assert "check" in run.split("&&")[-2]


def test_lock_lists_exactly_the_runtime_dependencies() -> None:
    """deploy/docker/requirements.txt pins every runtime dependency (no dev tools) at a version its dependents
    accept: `lock.py --check` passes."""
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "docker" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pinned = (DEPLOY / "docker" / "requirements.txt").read_text()
    for dev_tool in ("pytest", "mypy", "ruff", "grpcio-tools", "anthropic", "openai"):
        assert f"\n{dev_tool}==" not in pinned


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (last matching pattern wins; ``!`` re-includes; a directory
    pattern covers what is under it)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(_glob(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


def _glob(path: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        return any(_glob("/".join(path.split("/")[i:]), pattern[3:]) for i in range(len(path.split("/"))))
    return path.count("/") == pattern.count("/") and fnmatch.fnmatchcase(path, pattern)


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_local() -> None:
    """Every COPY source exists and survives .dockerignore; the venv, git metadata, caches and tests do
    not."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [source for c in _dockerfile() if c.cmd == "COPY" and not c.flags for source in c.value[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _docker_ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_deploy.py",
        "server/spendgate_server/__pycache__/x.pyc",
        "server/spendgate.egg-info/PKG-INFO",
        ".mypy_cache/x",
    ):
        assert _docker_ignored(local, patterns), local


# --- metrics: dashboard and alerts ----------------------------------------------------

# Exported by applications that embed the client (counters, no labels of their own).
CLIENT_COUNTERS = (
    "spendgate_client_fail_open_total",
    "spendgate_client_settle_retries_total",
    "spendgate_client_settle_failures_total",
)
# Labels Prometheus attaches to every scraped series (pod discovery / PodMonitor).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service", "endpoint"})
# The list: each must be charted (histograms through their series).
DASHBOARD_METRICS = (
    "spendgate_decisions_total",
    "spendgate_shadow_would_block_total",
    "spendgate_decide_duration_seconds",
    "spendgate_settle_duration_seconds",
    "spendgate_store_duration_seconds",
    "spendgate_store_errors_total",
    "spendgate_rpc_errors_total",
    "spendgate_reservations_total",
    "spendgate_settles_total",
    "spendgate_settle_lag_seconds",
    "spendgate_config_version",
    "spendgate_health_serving",
    "spendgate_journal_lag_seconds",
    "spendgate_evaluator_pending",
    *CLIENT_COUNTERS,
)
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@cache
def _series_labels() -> dict[str, frozenset[str]]:
    """Every series name Prometheus can hold for our metrics, with its labels (read from the server's
    registry)."""
    series: dict[str, frozenset[str]] = {"up": TARGET_LABELS}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = TARGET_LABELS | set(metric._labelnames)
        name, kind = metric._name, metric._type
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series |= {f"{name}_sum": labels, f"{name}_count": labels, f"{name}_bucket": labels | {"le"}}
        else:
            series[name] = labels
    series |= dict.fromkeys(CLIENT_COUNTERS, TARGET_LABELS)
    return series


def _promql(expr: str) -> promql_parser.Expr:
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    try:
        parsed: promql_parser.Expr = promql_parser.parse(expr)
    except ValueError as exc:
        pytest.fail(f"not PromQL ({exc}): {expr}")
    return parsed


def _selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, pre_visit=visit)
    return found


def check_promql(expr: str) -> set[str]:
    """Parse ``expr`` and check every metric and label it names exists; return the metric names."""
    known = _series_labels()
    parsed = _promql(expr)
    for selector in _selectors(parsed):
        assert selector.name in known, f"unknown metric {selector.name} in: {expr}"
        for matcher in selector.matchers.matchers:
            assert matcher.name in known[selector.name], (
                f"{selector.name} has no label {matcher.name}: {expr}"
            )

    def grouping(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            available = set().union(*(known[s.name or ""] for s in _selectors(node.expr)))
            missing = set(node.modifier.labels) - available
            assert not missing, f"grouping by labels no metric inside has ({missing}): {expr}"

    promql_parser.walk(parsed, pre_visit=grouping)
    return {s.name or "" for s in _selectors(parsed)}


def _panels(dashboard: Obj) -> Iterator[Obj]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_queries_are_valid_promql_over_exported_metrics() -> None:
    """deploy/grafana/spendgate.json parses; every query is PromQL over metrics and labels the server (or the
    client) exports, and every metric the issue lists is charted, reservations created vs settled included."""
    dashboard = json.loads((DEPLOY / "grafana" / "spendgate.json").read_text())
    used: set[str] = set()
    ids: list[int] = []
    for panel in _panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used |= check_promql(target["expr"])
    assert len(ids) == len(set(ids)), "panel ids repeat"
    missing = {f for f in DASHBOARD_METRICS if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not missing, f"metrics not on the dashboard: {sorted(missing)}"
    titles = {panel["title"] for panel in _panels(dashboard)}
    assert "Reservations created vs settled" in titles


def test_dashboard_panels_do_not_overlap() -> None:
    """Panels sit on Grafana's 24-column grid without overlapping one another."""
    dashboard = json.loads((DEPLOY / "grafana" / "spendgate.json").read_text())
    taken: set[tuple[int, int]] = set()
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def _alert_rules() -> list[Obj]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete_and_use_exported_metrics() -> None:
    """Every rule in deploy/prometheus/alerts.yaml has a unique name, valid PromQL over known metrics, a `for`
    duration, a severity and summary/description annotations."""
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Spendgate[A-Z]\w+", rule["alert"])
        check_promql(rule["expr"])
        assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize(
    ("concern", "uses"),
    [
        ("fail-open rate", lambda m: "spendgate_client_fail_open_total" in m),
        ("store errors", lambda m: "spendgate_store_errors_total" in m),
        ("p99 Decide latency", lambda m: "spendgate_decide_duration_seconds_bucket" in m),
        ("evaluator lag", lambda m: "spendgate_journal_lag_seconds" in m),
        ("NOT_SERVING", lambda m: "spendgate_health_serving" in m),
        ("no scrape", lambda m: m == {"up"}),
    ],
)
def test_alerts_cover(concern: str, uses: Callable[[set[str]], bool]) -> None:
    """An alert exists for each operational concern the issue names."""
    assert any(uses(check_promql(rule["expr"])) for rule in _alert_rules()), concern
