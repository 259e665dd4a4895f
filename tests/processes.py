"""Real processes for tests: redis-server and spendgate servers on free ports, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from spendgate_server.store import SessionKey
from spendgate_server.store.redis import load_script, session_keys

STARTUP_SECONDS = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Stop the processes as :func:`stop_process` does, side by side: each drains while the others do."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RedisServer:
    """A private redis-server on a free port."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra_args: Sequence[str] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, *extra_args: str, port: int | None = None, workdir: Path | None = None) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run 'make test' (it installs it)")
        port = port or free_port()
        workdir = workdir or Path(tempfile.mkdtemp(prefix="sg-redis-"))
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *extra_args,
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(port, process, workdir, extra_args)
        server.wait_ready()
        return server

    def wait_ready(self) -> None:
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class SpendgateServer:
    """A ``spendgate serve`` process; ``target`` is its host:port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, *args: str, port: int = 0, env: dict[str, str] | None = None) -> SpendgateServer:
        log = Path(tempfile.mkstemp(prefix="sg-server-", suffix=".log")[1])
        # Metrics are off unless a test asks for them, so parallel servers never clash on a port.
        defaults = [] if "--metrics-port" in args else ["--metrics-port", "0"]
        argv = [
            *(sys.executable, "-m", "spendgate_server", "serve", "--port", str(port)),
            *("--log-format", "json", "--drain-seconds", "0", *defaults, *args),
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=sink, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "serving":
                    bound = json.loads(line)["port"]
                    if port == 0 or bound == port:
                        return cls(process, bound, log, argv)
            if process.poll() is not None:
                raise RuntimeError(f"spendgate exited {process.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        stop_process(process)
        raise RuntimeError(f"spendgate did not report serving:\n{log.read_text()}")

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        stop_process(self.process)


@contextlib.contextmanager
def server_on_store(store: str, *args: str) -> Iterator[SpendgateServer]:
    """A ``spendgate serve`` on ``store`` (``memory``, or ``redis`` on a private redis-server of its
    own), stopped on leaving.

    For a module-scoped fixture whose tests use sessions of their own: one server start instead
    of one per test, and no other test's ``redis_url`` (which empties the shared Redis) reaches it.
    """
    redis_server = RedisServer.start() if store == "redis" else None
    try:
        backend = ["--store", "redis", "--redis-url", redis_server.url] if redis_server else []
        server = SpendgateServer.start(*backend, *args)
        try:
            yield server
        finally:
            server.stop()
    finally:
        if redis_server is not None:
            redis_server.stop()


def restart_redis(server: RedisServer) -> RedisServer:
    """Stop ``server`` gracefully (SIGTERM: Redis flushes its AOF) and start it again.

    Same port, directory and arguments, so with ``--appendonly yes`` the data comes
    back; without persistence it comes back empty.
    """
    server.stop()
    return RedisServer.start(*server.extra_args, port=server.port, workdir=server.workdir)


class TcpProxy:
    """A loopback TCP proxy to ``upstream_port`` that can lose script replies in flight.

    While ``drop_replies`` is set, a connection that sends a script call (EVALSHA)
    still reaches Redis, which runs it, but hears nothing back from then on: the
    window in which a caller can die after its command ran and before it heard the
    result. Other traffic (connection handshakes) still flows, so fresh pooled
    connections can get that far.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop_replies = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        # socket -> (its peer, True when it is the upstream side)
        peers: dict[socket.socket, tuple[socket.socket, bool]] = {}
        muted: set[socket.socket] = set()  # upstream sockets whose replies are dropped

        def drop(sock: socket.socket) -> None:
            peer, _ = peers.pop(sock)
            peers.pop(peer, None)
            muted.difference_update((sock, peer))
            for s in (sock, peer):
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(s)
                s.close()

        try:
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        client, _ = sock.accept()
                        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                        peers[client] = (upstream, False)
                        peers[upstream] = (client, True)
                        selector.register(client, selectors.EVENT_READ)
                        selector.register(upstream, selectors.EVENT_READ)
                        continue
                    if sock not in peers:
                        continue
                    peer, from_upstream = peers[sock]
                    try:
                        data = sock.recv(65536)
                        if not from_upstream and self.drop_replies.is_set() and b"EVALSHA" in data:
                            muted.add(peer)
                        if data and sock not in muted:
                            peer.sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        drop(sock)
        finally:
            for sock in list(peers):
                if sock in peers:
                    drop(sock)
            selector.close()
            self._listener.close()

    def close(self) -> None:
        """Stop forwarding and close every socket."""
        self._stop.set()
        self._thread.join()


def _cluster_ok(port: int) -> bool:
    """The node sees a healthy cluster and, if it is a replica, is in sync with its master."""
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        # redis-py parses CLUSTER INFO into a dict of strings.
        if client.cluster("INFO").get("cluster_state") != "ok":
            return False
        replication = client.info("replication")
        return replication["role"] == "master" or replication.get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisClusterNodes:
    """A real Redis Cluster on loopback: ``masters`` primaries, each with ``replicas`` replicas.

    Built from plain ``redis-server --cluster-enabled yes`` processes and
    ``redis-cli --cluster create``. ``node_timeout_ms`` is how long a master may be
    silent before its replica takes over (short, so failover tests take seconds).
    """

    nodes: list[RedisServer]
    node_timeout_ms: int

    @property
    def url(self) -> str:
        """A spendgate ``--redis-url`` naming every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @classmethod
    def start(cls, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> RedisClusterNodes:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed; run 'make test' (it installs it)")
        nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                nodes.append(
                    RedisServer.start(
                        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                        *("--cluster-node-timeout", str(node_timeout_ms)),
                        # The bus port is chosen like the client port, not port+10000.
                        *("--cluster-port", str(free_port())),
                        # Replicas sync at once (the default waits 5 s for more replicas to
                        # join), so a failover test can start as soon as the cluster is up.
                        *("--repl-diskless-sync-delay", "0"),
                    )
                )
            subprocess.run(
                [
                    *(cli, "--cluster", "create"),
                    *(f"127.0.0.1:{n.port}" for n in nodes),
                    *("--cluster-replicas", str(replicas), "--cluster-yes"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=STARTUP_SECONDS,
            )
            cluster = cls(nodes, node_timeout_ms)
            cluster.wait_ok()
            return cluster
        except BaseException:
            for node in nodes:
                node.stop()
            raise

    def wait_ok(self, nodes: Sequence[RedisServer] | None = None) -> None:
        """Poll until every (live) node reports cluster_state:ok and every replica is in sync."""
        deadline = time.monotonic() + STARTUP_SECONDS
        for node in nodes if nodes is not None else self.nodes:
            while not _cluster_ok(node.port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} never reported cluster_state:ok")
                time.sleep(0.05)

    def role(self, node: RedisServer) -> str:
        """``master`` or ``slave``, as the node itself reports it."""
        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            reply = client.role()
            role = reply[0]
            return role.decode() if isinstance(role, bytes) else str(role)
        finally:
            client.close()

    def master_of(self, key: str) -> RedisServer:
        """The node that currently serves ``key``'s hash slot."""
        client = redis.Redis(port=self.nodes[0].port, socket_timeout=1)
        try:
            slot = int(client.cluster("KEYSLOT", key))
        finally:
            client.close()
        for node in self.nodes:
            if node.process.poll() is None and self.role(node) == "master" and self._serves(node, slot):
                return node
        raise RuntimeError(f"no live master serves slot {slot}")

    @staticmethod
    def _serves(node: RedisServer, slot: int) -> bool:
        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            # redis-py parses CLUSTER NODES into {address: {flags, slots: [[low, high]], ...}}.
            nodes = client.cluster("NODES")
        finally:
            client.close()
        myself = next(info for info in nodes.values() if "myself" in info["flags"])
        return any(int(low) <= slot <= int(high) for low, high in myself["slots"])

    def wait_replicated(self) -> None:
        """Poll until every live master's replicas have every write it acknowledged.

        Replication is asynchronous: a failover test waits for it, so what it checks is
        the failover, not the last-writes window that asynchronous replication leaves.
        """
        deadline = time.monotonic() + STARTUP_SECONDS
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            client = redis.Redis(port=node.port, socket_timeout=1)
            try:
                while True:
                    info = client.info("replication")
                    if info["role"] != "master":
                        break
                    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
                    if all(int(r["offset"]) >= int(info["master_repl_offset"]) for r in replicas):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replicas of {node.port} never caught up")
                    time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# How long the ledger reader's state call remembers expired reservations (as a server would).
LEDGER_FORGET_MS = 86_400_000


@dataclass
class Ledger:
    """One session as Redis holds it, with due reservations already counted."""

    spent: int
    reserved: int
    open: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)


def read_ledger(redis_at: int | redis.Redis, session: str, tenant: str = "default") -> Ledger:
    """Count due reservations (the state script, as any server would) and read the session hash.

    ``redis_at`` is a port, or a client to reuse when reading many sessions.
    """
    keys = session_keys(SessionKey(tenant, session), "sg")
    client = redis.Redis(port=redis_at) if isinstance(redis_at, int) else redis_at
    try:
        client.register_script(load_script("state"))(
            keys=keys, args=[time.time_ns() // 1_000_000, LEDGER_FORGET_MS]
        )
        raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in client.hgetall(keys[0]).items()}
    finally:
        if client is not redis_at:
            client.close()
    ledger = Ledger(int(raw.get("spent", 0)), int(raw.get("reserved", 0)))
    kinds = {"r": ledger.open, "x": ledger.expired, "d": ledger.settled}
    for name, value in raw.items():
        kind, _, rid = name.partition(":")
        if kind in kinds:
            kinds[kind][rid] = int(value)
    return ledger


def scrape_metrics(port: int) -> dict[str, float]:
    """The samples of the /metrics page on loopback ``port``, by ``name{labels}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # loopback
        body = response.read().decode()
    return {
        name: float(value)
        for line in body.splitlines()
        if line and not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
    }


def ended(pid: int) -> bool:
    """True once ``pid`` runs no more (gone, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the evaluator child, multiprocessing's resource tracker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
