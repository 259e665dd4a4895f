"""A kubelet in miniature: runs rendered pod templates as real processes on this machine.

What a kubelet does with a container, done the same way here:

- **Process**: ``command`` replaces the image's ENTRYPOINT and ``args`` its CMD (with
  ``command`` alone the CMD is dropped); ``$(VAR)`` references are expanded from the
  container's environment. The environment is the image's ENV, then the container's
  ``env``/``envFrom`` in order, with ``secretKeyRef``/``configMapKeyRef``/``fieldRef``
  resolved from the rendered objects (or from test values for Secrets made out of band),
  plus what Kubernetes always adds (``HOSTNAME``, ``KUBERNETES_SERVICE_*``). Nothing of the
  test's own environment leaks in.
- **Volumes**: ConfigMap and Secret volumes are written out with their ``items`` and
  modes (and checked readable by the pod's user, with ``fsGroup`` as their group),
  emptyDir and volume claims are empty directories.
- **Probes**: gRPC health (``grpc.health.v1.Health/Check`` with the declared service
  name), ``exec`` and ``tcpSocket``, with the declared ``initialDelaySeconds``,
  ``periodSeconds``, ``timeoutSeconds`` and ``failureThreshold`` (Kubernetes' defaults
  where absent). A container that exits, or fails its startup probe ``failureThreshold``
  times, fails the boot with its output.

What a container runtime would give and one machine cannot, emulated and said so:

- **Image**: the spendgate image is this checkout's Dockerfile (its ENTRYPOINT, CMD and
  ENV, parsed with BuildKit's parser) over this venv: ``/opt/venv/bin`` is the venv's
  ``bin``. Other images (Redis) are the same program from the host's PATH.
- **Pod network**: each pod would have its own IP; here every declared ``containerPort``
  gets a free port on 127.0.0.1 and the process is told it where the port is given
  (an env value or argument equal to the declared port) or, for programs that listen
  on their default port, by their port flag (``PORT_FLAGS``). Probes go to that port.
- **Cluster DNS**: ``<service>[.<namespace>[.svc[.cluster.local]]]:<port>`` in env values and
  arguments becomes 127.0.0.1 and the mapped ``targetPort`` of a ready pod the Service
  selects, so a wrong selector or port name fails the boot.
- **Mounts**: paths under a ``mountPath`` in env values and arguments point into the
  volume's directory (there is no private filesystem to mount into).
- Not emulated: the user ID (processes run as the test's user), the read-only root
  filesystem, resource limits, NetworkPolicy and scheduling.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]  # compiled (BuildKit's parser), no stubs
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
# The spendgate image's venv, and the base image's PATH (python:3.11-slim) before the Dockerfile's ENV.
IMAGE_VENV_BIN = "/opt/venv/bin"
BASE_IMAGE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# Programs that listen on (or connect to) their default port unless told: how to tell them
# (redis-server takes options after its optional config file, redis-cli before its command).
PORT_FLAGS = {"redis-server": ("--port", "last"), "redis-cli": ("-p", "first")}
# Kubernetes' probe defaults (core/v1 Probe).
PROBE_DEFAULTS = {
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class BootError(AssertionError):
    """A pod would not have become ready, or a container would have been restarted: says why."""


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Image:
    """What a container gets from its image when the pod spec does not say."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: Mapping[str, str]
    # Image directory -> host directory, for executables and PATH.
    paths: Mapping[str, str] = field(default_factory=dict)


def spendgate_image() -> Image:
    """The final stage of this checkout's Dockerfile, its venv being this test's venv."""
    commands: list[Any] = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    final = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM") :]
    env = dict(BASE_IMAGE_ENV)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    for command in final:
        if command.cmd == "ENV":
            pairs = command.value
            for name, value in zip(pairs[::2], pairs[1::2], strict=True):
                env[name] = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], ""), value)
        elif command.cmd == "ENTRYPOINT":
            entrypoint = tuple(command.value)
        elif command.cmd == "CMD":
            cmd = tuple(command.value)
    return Image(entrypoint, cmd, env, {IMAGE_VENV_BIN: str(Path(sys.executable).parent)})


def image_for(reference: str) -> Image:
    """The image a container names: ours (any registry, any tag) or a program from the host."""
    repository = reference.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
    if repository == "spendgate":
        return spendgate_image()
    return Image((), (), dict(BASE_IMAGE_ENV))


@dataclass
class Cluster:
    """The rendered objects of one namespace plus what was created out of band (test values)."""

    namespace: str
    objects: list[Obj]
    workdir: Path
    # Secrets created with kubectl (never rendered): name -> key -> value.
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)

    def find(self, kind: str, name: str) -> Obj | None:
        """The rendered object of ``kind`` named ``name`` (kustomize's hash suffix included in the name)."""
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        return None

    def secret_value(self, name: str, key: str) -> str:
        """One key of a Secret, rendered or created out of band."""
        if name in self.secrets:
            return self.secrets[name][key]
        secret = self.find("Secret", name)
        if secret is None:
            raise BootError(f"Secret {name} does not exist (create it before applying, as the README says)")
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        return base64.b64decode(secret["data"][key]).decode()

    def secret_items(self, name: str) -> dict[str, str]:
        """Every key of a Secret."""
        if name in self.secrets:
            return dict(self.secrets[name])
        secret = self.find("Secret", name)
        if secret is None:
            raise BootError(f"Secret {name} does not exist (create it before applying, as the README says)")
        items = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        return {**items, **secret.get("stringData", {})}

    def config_map_items(self, name: str) -> dict[str, str]:
        """Every key of a ConfigMap."""
        config_map = self.find("ConfigMap", name)
        if config_map is None:
            raise BootError(f"ConfigMap {name} does not exist")
        return dict(config_map.get("data", {}))

    def resolve_service(self, host: str, port: int) -> tuple[str, int] | None:
        """Cluster DNS plus kube-proxy: a Service name and port to a ready pod's mapped address."""
        parts = host.split(".")
        name = parts[0]
        if len(parts) > 1 and parts[1] != self.namespace:
            return None
        if parts[2:] not in ([], ["svc"], ["svc", "cluster", "local"]):
            return None
        service = self.find("Service", name)
        if service is None:
            return None
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port] or [None]
        if service_port is None:
            raise BootError(f"Service {name} has no port {port}")
        target = service_port.get("targetPort", port)
        for pod in self.pods:
            if pod.ready and all(pod.labels.get(k) == v for k, v in service["spec"]["selector"].items()):
                mapped = pod.mapped_port(target)
                if mapped is not None:
                    return "127.0.0.1", mapped
        raise BootError(f"Service {name}:{port} has no ready pod with port {target!r}")


@dataclass
class Container:
    """One running container: its process, log and port map."""

    name: str
    spec: Obj
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    ports: dict[int, int]  # containerPort -> host port
    port_names: dict[str, int]
    mounts: dict[str, Path]  # mountPath -> host directory

    def output(self) -> str:
        """What the container printed (stdout and stderr), the last 4,000 characters."""
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Pod:
    """A pod of a workload: its labels, containers and readiness."""

    name: str
    labels: dict[str, str]
    containers: list[Container] = field(default_factory=list)
    ready: bool = False

    def mapped_port(self, port: int | str) -> int | None:
        """The host port of a container port given by number or name."""
        for container in self.containers:
            number = container.port_names.get(port, port) if isinstance(port, str) else port
            if isinstance(number, int) and number in container.ports:
                return container.ports[number]
        return None

    def stop(self) -> None:
        """Delete the pod: SIGKILL every process we started (by PID) and reap it."""
        for container in self.containers:
            if container.process.poll() is None:
                container.process.send_signal(signal.SIGKILL)
            container.process.wait(30)


# --- building a container's process --------------------------------------------------


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, unknown ones stay as written."""
    return _VAR_REF.sub(lambda m: env.get(m[1], m[0]), value)


def _env_source(cluster: Cluster, pod_name: str, var: Obj) -> str:
    source = var["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return cluster.secret_value(ref["name"], ref["key"])
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return cluster.config_map_items(ref["name"])[ref["key"]]
    if "fieldRef" in source:
        fields = {
            "metadata.name": pod_name,
            "metadata.namespace": cluster.namespace,
            "status.podIP": "127.0.0.1",
        }
        return fields[source["fieldRef"]["fieldPath"]]
    raise BootError(f"env {var['name']}: unsupported source {sorted(source)}")


def _readable(mode: int, user: int, groups: set[int]) -> bool:
    """Whether a file owned by root with ``groups``' first member as group is readable by ``user``."""
    if user == 0:
        return True
    return bool(mode & 0o004) or bool(groups and mode & 0o040)


def _volumes(cluster: Cluster, pod_dir: Path, spec: Obj) -> dict[str, Path]:
    """Each volume of the pod written out as a directory: name -> host directory."""
    security = spec.get("securityContext", {})
    user = security.get("runAsUser", 0)
    groups = {security["fsGroup"]} if "fsGroup" in security else set()
    directories: dict[str, Path] = {}
    for volume in spec.get("volumes", []):
        directory = pod_dir / "volumes" / volume["name"]
        directory.mkdir(parents=True)
        directories[volume["name"]] = directory
        if "configMap" in volume or "secret" in volume:
            source = volume.get("configMap") or volume["secret"]
            if "configMap" in volume:
                data = cluster.config_map_items(source["name"])
            else:
                data = cluster.secret_items(source["secretName"])
            items = source.get("items") or [{"key": key, "path": key} for key in data]
            for item in items:
                mode = item.get("mode", source.get("defaultMode", 0o644))
                if not _readable(mode, user, groups):
                    raise BootError(
                        f"volume {volume['name']}: {item['path']} (mode {mode:o}, group {groups or 'root'}) "
                        f"is not readable by user {user}"
                    )
                target = directory / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
        elif not ({"emptyDir", "persistentVolumeClaim"} & set(volume)):
            raise BootError(f"volume {volume['name']}: unsupported type {sorted(volume)}")
    return directories


def _map_path(value: str, mounts: Mapping[str, Path]) -> str:
    for mount_path, directory in sorted(mounts.items(), key=lambda m: -len(m[0])):
        base = mount_path.rstrip("/")
        if value == base or value.startswith(base + "/"):
            return str(directory) + value[len(base) :]
    return value


_SERVICE_ADDRESS = re.compile(r"(?<![\w.-])([a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9-]+)*):(\d{1,5})\b")


def _map_value(
    value: str, cluster: Cluster | None, ports: Mapping[int, int], mounts: Mapping[str, Path]
) -> str:
    """An env value or argument as the process on this machine must see it (ports, DNS, mounts)."""
    if value.isdigit() and int(value) in ports:
        return str(ports[int(value)])

    def service(match: re.Match[str]) -> str:
        resolved = None if cluster is None else cluster.resolve_service(match[1], int(match[4]))
        return match[0] if resolved is None else f"{resolved[0]}:{resolved[1]}"

    return _map_path(_SERVICE_ADDRESS.sub(service, value), mounts)


def _executable(name: str, image: Image, env: Mapping[str, str]) -> str:
    if "/" in name:
        for image_dir, host_dir in image.paths.items():
            if name.startswith(image_dir + "/"):
                return host_dir + name[len(image_dir) :]
        return name
    for directory in env.get("PATH", "").split(":"):
        found = shutil.which(name, path=directory)
        if found:
            return found
    raise BootError(f"executable {name!r} not found on the image's PATH {env.get('PATH')!r}")


def _with_port_flag(argv: list[str], ports: Mapping[int, int]) -> list[str]:
    """Tell a program that listens on its default port which port it has here (PORT_FLAGS)."""
    flag, where = PORT_FLAGS.get(Path(argv[0]).name, ("", ""))
    if not flag or flag in argv or not ports:
        return argv
    (host_port,) = ports.values()
    if where == "first":
        return [argv[0], flag, str(host_port), *argv[1:]]
    return [*argv, flag, str(host_port)]


def start_container(
    cluster: Cluster, pod: Pod, pod_dir: Path, spec: Obj, volumes: Mapping[str, Path]
) -> Container:
    """Start one container of ``pod`` as a process; it is added to the pod."""
    image = image_for(spec["image"])
    ports = {p["containerPort"]: free_port() for p in spec.get("ports", [])}
    port_names = {p["name"]: p["containerPort"] for p in spec.get("ports", []) if "name" in p}
    mounts = {m["mountPath"]: volumes[m["name"]] / m.get("subPath", "") for m in spec.get("volumeMounts", [])}
    env = dict(image.env)
    env["HOSTNAME"] = pod.name
    env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = "127.0.0.1", "443"
    for source in spec.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            env.update(
                {prefix + k: v for k, v in cluster.config_map_items(source["configMapRef"]["name"]).items()}
            )
        if "secretRef" in source:
            env.update({prefix + k: v for k, v in cluster.secret_items(source["secretRef"]["name"]).items()})
    for var in spec.get("env", []):
        env[var["name"]] = (
            _expand(var["value"], env) if "value" in var else _env_source(cluster, pod.name, var)
        )
    process_env = {name: _map_value(value, cluster, ports, mounts) for name, value in env.items()}
    process_env["PATH"] = ":".join(image.paths.get(d, d) for d in env.get("PATH", "").split(":"))
    command = [_expand(part, env) for part in spec.get("command", image.entrypoint)]
    if "args" in spec:
        args = [_expand(part, env) for part in spec["args"]]
    else:
        args = [] if "command" in spec else list(image.cmd)
    argv = [_map_value(part, cluster, ports, mounts) for part in [*command, *args]]
    if not argv:
        raise BootError(f"container {spec['name']}: no command, and its image has no ENTRYPOINT or CMD")
    argv = _with_port_flag([_executable(argv[0], image, process_env), *argv[1:]], ports)
    log = pod_dir / f"{spec['name']}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=process_env,
            cwd=pod_dir,
        )
    container = Container(spec["name"], spec, process, log, process_env, ports, port_names, mounts)
    pod.containers.append(container)
    return container


# --- probes -------------------------------------------------------------------------


def _probe_once(container: Container, probe: Obj, timeout: float) -> str | None:
    """One probe attempt: None on success, else what failed."""
    if "grpc" in probe:
        port = container.ports[probe["grpc"]["port"]]
        service = probe["grpc"].get("service", "")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
        except grpc.RpcError as exc:
            return f"grpc {service!r}: {exc.code().name}"
        return (
            None if reply.status == health_pb2.HealthCheckResponse.SERVING else f"grpc {service!r}: {reply}"
        )
    if "tcpSocket" in probe:
        target = probe["tcpSocket"]["port"]
        port = container.ports[container.port_names.get(target, target)]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        except OSError as exc:
            return f"tcp {port}: {exc}"
        return None
    if "exec" in probe:
        argv = [
            _map_value(part, None, container.ports, container.mounts) for part in probe["exec"]["command"]
        ]
        image = image_for(container.spec["image"])
        argv = _with_port_flag([_executable(argv[0], image, container.env), *argv[1:]], container.ports)
        try:
            result = subprocess.run(
                argv, env=container.env, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return f"exec {argv}: timed out after {timeout} s"
        return None if result.returncode == 0 else f"exec {argv}: exit {result.returncode}"
    raise BootError(f"unsupported probe {sorted(probe)}")


def probe_until(
    container: Container,
    kind: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``kind`` (startupProbe, readinessProbe, livenessProbe) as the kubelet does until it succeeds.

    Attempts start after ``initialDelaySeconds`` and are ``periodSeconds`` apart, each
    bounded by ``timeoutSeconds``. Fails (BootError, with the container's output) when the
    process exits or ``failureThreshold`` consecutive attempts fail: for a startup or
    liveness probe that is when the kubelet kills the container; for readiness it is
    when the pod has been unready as long as the probe tolerates.

    Returns:
        The number of attempts it took.
    """
    if kind not in container.spec:
        return 0
    probe = {**PROBE_DEFAULTS, **container.spec[kind]}
    sleep(probe["initialDelaySeconds"])
    failures: list[str] = []
    while True:
        if container.process.poll() is not None:
            raise BootError(
                f"container {container.name} exited {container.process.returncode} "
                f"before its {kind} passed:\n{container.output()}"
            )
        failure = _probe_once(container, probe, probe["timeoutSeconds"])
        if failure is None:
            return len(failures) + 1
        failures.append(failure)
        if len(failures) >= probe["failureThreshold"]:
            raise BootError(
                f"container {container.name}: {kind} failed {len(failures)} times "
                f"(failureThreshold {probe['failureThreshold']}): {failures[-1]}\n{container.output()}"
            )
        sleep(probe["periodSeconds"])


def boot_pod(cluster: Cluster, workload: Obj, index: int) -> Pod:
    """Start pod ``index`` of ``workload`` and wait, probe by probe, until it is ready."""
    template = workload["spec"]["template"]
    name = f"{workload['metadata']['name']}-{index}"
    pod = Pod(name, dict(template["metadata"].get("labels", {})))
    cluster.pods.append(pod)
    pod_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cluster.workdir))
    spec = dict(template["spec"])
    claims = workload["spec"].get("volumeClaimTemplates", [])
    spec["volumes"] = [
        *spec.get("volumes", []),
        *({"name": c["metadata"]["name"], "emptyDir": {}} for c in claims),
    ]
    volumes = _volumes(cluster, pod_dir, spec)
    for init in spec.get("initContainers", []):
        container = start_container(cluster, pod, pod_dir, init, volumes)
        if container.process.wait(300) != 0:
            raise BootError(
                f"init container {init['name']} exited {container.process.returncode}:\n{container.output()}"
            )
    started = [start_container(cluster, pod, pod_dir, c, volumes) for c in spec["containers"]]
    for container in started:
        probe_until(container, "startupProbe")
        probe_until(container, "readinessProbe")
        probe_until(container, "livenessProbe")
    pod.ready = True
    return pod


def exec_in(
    container: Container, argv: Sequence[str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``kubectl exec``: run ``argv`` with the container's environment and image."""
    image = image_for(container.spec["image"])
    return subprocess.run(
        [_executable(argv[0], image, container.env), *argv[1:]],
        env=container.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_job(cluster: Cluster, job: Obj, timeout: float = 120) -> tuple[int, str]:
    """Run a Job's pod to completion: its exit code and output."""
    template = job["spec"]["template"]
    pod = Pod(job["metadata"]["name"], dict(template["metadata"].get("labels", {})))
    pod_dir = Path(tempfile.mkdtemp(prefix=f"{pod.name}-", dir=cluster.workdir))
    volumes = _volumes(cluster, pod_dir, template["spec"])
    (spec,) = template["spec"]["containers"]
    container = start_container(cluster, pod, pod_dir, spec, volumes)
    try:
        code = container.process.wait(timeout)
    finally:
        pod.stop()
    return code, container.output()


def workloads(objects: Sequence[Obj], kinds: Sequence[str]) -> Iterator[Obj]:
    """Workloads of the given kinds, in that order of kinds."""
    for kind in kinds:
        yield from (o for o in objects if o["kind"] == kind)
