"""What an application installs: ``make dist``'s wheels and npm tarball, used the way the README says.

A fresh venv (no editable installs, no checkout on the path) installs the two wheels,
runs the README's quick-start snippet against a real server and the fake provider, is
told by the client what to install for the missing provider SDK, installs exactly that,
and runs the snippet again. A fresh Node project installs the tarball and decides.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from tests.fake_provider import TEXT_PIECES, FakeProvider
from tests.processes import SpendgateServer

ROOT = Path(__file__).resolve().parents[2]
QUICK_START = re.compile(r"^### One line in your code.*?\n```python\n(.*?)```", re.MULTILINE | re.DOTALL)
INSTALL_TIMEOUT_SECONDS = 600
# claude-sonnet-5-5 (the README's model) at $2 / $10 per million input / output tokens (genai-prices),
# in nano-USD per token.
SONNET_NANO_USD_PER_TOKEN = (2_000, 10_000)


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make dist`` into a scratch directory (the venv is left as it is: -o)."""
    out = tmp_path_factory.mktemp("dist")
    listing = run(
        ["make", "-s", "-o", ".venv/.installed", "dist", f"DIST={out}"], ROOT, timeout=INSTALL_TIMEOUT_SECONDS
    )
    assert sorted(listing.split()) == [
        "spendgate-client-0.1.0.tgz",
        "spendgate_client-0.1.0-py3-none-any.whl",
        "spendgate_protos-0.1.0-py3-none-any.whl",
    ]
    return out


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


def quick_start_snippet() -> str:
    match = QUICK_START.search((ROOT / "README.md").read_text())
    assert match, "README has no quick-start python block under 'One line in your code'"
    return match[1]


@pytest.mark.timeout(INSTALL_TIMEOUT_SECONDS)
def test_fresh_venv_installs_the_wheels_and_runs_the_quick_start(
    dist: Path, tmp_path: Path, spendgate: Callable[..., SpendgateServer], fake: FakeProvider
) -> None:
    """The wheels install into a fresh venv; the snippet first names the SDK to install, then runs, and the
    call is decided before and settled after it reaches the provider."""
    server = spendgate()
    venv = tmp_path / "app-venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    pip, python = str(venv / "bin" / "pip"), str(venv / "bin" / "python")
    wheels = sorted(str(p) for p in dist.glob("*.whl"))
    run([pip, "install", "--quiet", *wheels], tmp_path, timeout=INSTALL_TIMEOUT_SECONDS)
    # Installed from the wheels, not linked to the checkout.
    for name in ("spendgate-client", "spendgate-protos"):
        code = f"import importlib.metadata as m; print(m.distribution({name!r}).read_text('direct_url.json'))"
        direct = json.loads(run([python, "-c", code], tmp_path))
        assert direct["url"].endswith(".whl") and "dir_info" not in direct, direct
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text(quick_start_snippet())
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "SPENDGATE_TARGET": server.target,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "sk-ant-test",
    }

    first = subprocess.run(
        [python, "main.py"], cwd=app, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert first.returncode == 1
    message = first.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: spendgate_client.JournaledAnthropic needs the anthropic SDK"), (
        message
    )
    (requirement,) = re.findall(r"pip install '([^']+)'", message)
    run([pip, "install", "--quiet", requirement], tmp_path, timeout=INSTALL_TIMEOUT_SECONDS)

    assert run([python, "main.py"], app, env) == "".join(TEXT_PIECES) + "\n"
    assert [r.model for r in fake.requests] == ["claude-sonnet-5-5"]
    with grpc.insecure_channel(server.target) as channel:
        after = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            pb.DecideRequest(
                session_id="my-session", model="claude-sonnet-5-5", input_tokens=1, fingerprint=bytes(16)
            ),
            timeout=10,
        )
    usage = fake.usage
    expected = (
        usage.input_tokens * SONNET_NANO_USD_PER_TOKEN[0] + usage.output_tokens * SONNET_NANO_USD_PER_TOKEN[1]
    )
    # The snippet's call was settled (at interpreter exit): the session holds its cost plus this reservation.
    assert after.session_spend_nano_usd == expected + after.estimated_cost_nano_usd


NODE_DECIDE = """
import { DecisionClient } from '@spendgate/client';
const client = new DecisionClient({ target: process.env.SPENDGATE_TARGET });
const decision = await client.decide({
  sessionId: 'node-session', model: 'claude-sonnet-4-5', inputTokens: 100, maxOutputTokens: 100,
  fingerprint: new Uint8Array(32), enforcementConfig: { token_ceiling: 50 },
});
console.log(decision.verdict, decision.rule);
client.close();
"""


@pytest.mark.timeout(INSTALL_TIMEOUT_SECONDS)
def test_fresh_node_project_installs_the_tarball_and_decides(
    dist: Path, tmp_path: Path, spendgate: Callable[..., SpendgateServer]
) -> None:
    """``npm install`` of the packed tarball gives a working @spendgate/client (built JS and .proto files)."""
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are part of the development set-up (README)"
    server = spendgate()
    project = tmp_path / "node-app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    (tarball,) = dist.glob("*.tgz")
    run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", str(tarball)],
        project,
        timeout=INSTALL_TIMEOUT_SECONDS,
    )
    (project / "decide.mjs").write_text(NODE_DECIDE)
    output = run(
        ["node", "decide.mjs"],
        project,
        {"PATH": f"{Path(npm).parent}:/usr/bin:/bin", "SPENDGATE_TARGET": server.target},
    )
    assert output.split() == ["block", "token_ceiling"]
