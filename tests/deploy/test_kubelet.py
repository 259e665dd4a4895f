"""Each rendered overlay booted as a kubelet would, then the README's path to an authenticated Decide.

For both overlays: every workload's containers run as real processes (tests/deploy/kubelet.py
says what is emulated and how) with command, args and env taken from the rendered
manifests, Secrets and ConfigMaps resolved from the rendered objects (test values for the
Secrets the README creates by hand), against a real Redis (dev: the overlay's own Redis
StatefulSet; prod: the test's redis-server as the external Redis). Startup, readiness and
liveness probes run exactly as declared. Then, as the README's Kubernetes section says: a
client key is minted by exec in a server pod, stored in the Secret the example Job reads,
and the Job's Decide is allowed; the admin key from its Secret can do admin calls.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import grpc
import pytest
import yaml
from spendgate.v1 import config_pb2, config_pb2_grpc, decision_pb2_grpc, violation_pb2, violation_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate_server.store.keys import generate_key

from tests.deploy.kubelet import BootError, Cluster, Pod, boot_pod, exec_in, run_job, workloads
from tests.deploy.test_deploy import EXAMPLES, EXTERNAL_SECRETS, OVERLAYS, ROOT, rendered

# At most this many pods per workload: two server pods prove the start-up is safe to repeat.
MAX_PODS = 2
KUBERNETES_SECTION = re.compile(r"^### Kubernetes\n(.*?)(?=^#{2,3} )", re.MULTILINE | re.DOTALL)


def readme_kubernetes_commands() -> str:
    """The shell commands of the README's Kubernetes section, continuation lines joined."""
    section = KUBERNETES_SECTION.search((ROOT / "README.md").read_text())
    assert section, "README has no '### Kubernetes' section"
    blocks = re.findall(r"```sh[^\n]*\n(.*?)```", section[1], re.DOTALL)
    return "\n".join(blocks).replace("\\\n", " ")


def documented_client_key_command() -> list[str]:
    """What the README runs in a server pod to mint the client key (after ``exec deploy/spendgate --``)."""
    match = re.search(
        r"exec deploy/spendgate --\s+(spendgate keys create [^|)\n]*)", readme_kubernetes_commands()
    )
    assert match, "the README does not mint a client key with kubectl exec"
    return shlex.split(match[1])


def test_readme_creates_every_secret_the_manifests_read() -> None:
    """The Secrets the README creates by hand are exactly those the overlay and the example Job need."""
    created = set(re.findall(r"create secret generic (\S+)", readme_kubernetes_commands()))
    job = yaml.safe_load((EXAMPLES / "decide-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    job_secrets = {v["valueFrom"]["secretKeyRef"]["name"] for v in container["env"] if "valueFrom" in v}
    assert created == EXTERNAL_SECRETS["dev"] | job_secrets
    assert "deploy/k8s/examples/decide-job.yaml" in readme_kubernetes_commands()


def wait_until_key_is_loaded(pod: Pod, key: str) -> None:
    """Poll the pod with ``key`` until it accepts it: servers reload keys every --key-reload-seconds."""
    env = pod.containers[0].env
    deadline = time.monotonic() + float(env.get("SPENDGATE_KEY_RELOAD_SECONDS", "5")) + 10
    with grpc.insecure_channel(f"127.0.0.1:{pod.mapped_port('grpc')}") as channel:
        get_config = config_pb2_grpc.ConfigServiceStub(channel).GetConfig
        while True:
            try:
                get_config(
                    config_pb2.GetConfigRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=5
                )
                return
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


def _server_pods(pods: list[Pod]) -> list[Pod]:
    return [p for p in pods if p.labels.get("app.kubernetes.io/component") == "server"]


@pytest.mark.redis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_boots_as_a_kubelet_would_and_serves_an_authenticated_decide(
    overlay: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every pod of the overlay starts and passes its declared probes; the README's client key decides."""
    admin_key = generate_key()
    secrets = {"spendgate-admin-key": {"key": admin_key}}
    if overlay == "prod":
        secrets["spendgate-redis"] = {"url": request.getfixturevalue("redis_url")}
    assert set(secrets) == EXTERNAL_SECRETS[overlay], "every Secret made by hand needs a test value"
    objects = rendered(overlay)
    cluster = Cluster(OVERLAYS[overlay], objects, tmp_path, secrets)
    try:
        # Stores first, as their pods would be ready before the servers' startup probes give up.
        for workload in workloads(objects, ("StatefulSet", "Deployment")):
            for index in range(min(workload["spec"].get("replicas", 1), MAX_PODS)):
                boot_pod(cluster, workload, index)
        servers = _server_pods(cluster.pods)
        assert len(servers) == MAX_PODS
        (server,) = servers[0].containers

        minted = exec_in(server, documented_client_key_command())
        assert minted.returncode == 0, minted.stderr
        client_key = minted.stdout.splitlines()[0]
        cluster.secrets["spendgate-client-key"] = {"key": client_key}
        for pod in servers:
            wait_until_key_is_loaded(pod, client_key)
        job = yaml.safe_load((EXAMPLES / "decide-job.yaml").read_text())
        code, output = run_job(cluster, job)
        assert code == 0, output
        assert output.startswith("ALLOW  rule=-  model=claude-sonnet-5-5  reason: allowed\n"), output

        # Authentication is on in every pod, and the Secret's admin key is an admin of its tenant.
        for pod in servers:
            port = pod.mapped_port("grpc")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                decide = decision_pb2_grpc.DecisionServiceStub(channel).Decide
                request_ = pb.DecideRequest(
                    session_id="s", model="claude-sonnet-4-5", input_tokens=1, fingerprint=bytes(16)
                )
                with pytest.raises(grpc.RpcError) as refused:
                    decide(request_, timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                listing = violation_pb2_grpc.ViolationServiceStub(channel).ListViolations
                as_admin = (("authorization", f"Bearer {admin_key}"),)
                assert (
                    list(
                        listing(
                            violation_pb2.ListViolationsRequest(), metadata=as_admin, timeout=10
                        ).violations
                    )
                    == []
                )
                with pytest.raises(grpc.RpcError) as denied:
                    listing(
                        violation_pb2.ListViolationsRequest(),
                        metadata=(("authorization", f"Bearer {client_key}"),),
                        timeout=10,
                    )
                assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        for pod in cluster.pods:
            pod.stop()


def test_a_pod_without_its_admin_key_secret_does_not_start(tmp_path: Path) -> None:
    """The kubelet check is not vacuous: without the admin key Secret the server pod cannot be created."""
    objects = rendered("prod")
    cluster = Cluster(
        OVERLAYS["prod"], objects, tmp_path, {"spendgate-redis": {"url": "redis://127.0.0.1:1/0"}}
    )
    (deployment,) = [w for w in workloads(objects, ("Deployment",))]
    with pytest.raises(BootError, match="Secret spendgate-admin-key does not exist"):
        boot_pod(cluster, deployment, 0)
    for pod in cluster.pods:
        pod.stop()
