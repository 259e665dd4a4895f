"""The naive reference server every target is a ratio of (DESIGN.md, "Targets").

Default ``grpc.aio`` server (no options), default asyncio event loop, and handlers
that do one trivial EVALSHA through ``redis.asyncio`` and return an empty
response: no rules, no validation, no tuning. It serves the spendgate.v1
DecisionService so that the same clients and requests reach it as reach spendgate.

Run: ``python -m bench.floor --redis-url redis://127.0.0.1:6379/0 --port 0``; it
prints ``{"event": "serving", "port": N}`` once it listens and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import grpc
import redis.asyncio as aioredis
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

__all__ = ["main"]

TRIVIAL_SCRIPT = "return 1"

Context = grpc.aio.ServicerContext[Any, Any]


class FloorServicer(decision_pb2_grpc.DecisionServiceServicer):
    """Every method does one EVALSHA of ``return 1`` and answers an empty message."""

    def __init__(self, client: aioredis.Redis, sha: str) -> None:
        self._client = client
        self._sha = sha

    async def Decide(
        self, request: pb.DecideRequest, context: Context
    ) -> pb.DecideResponse:  # gRPC method name
        await self._client.evalsha(self._sha, 0)
        return pb.DecideResponse()

    async def Settle(
        self, request: pb.SettleRequest, context: Context
    ) -> pb.SettleResponse:  # gRPC method name
        await self._client.evalsha(self._sha, 0)
        return pb.SettleResponse()

    async def SettleBatch(
        self, request: pb.SettleBatchRequest, context: Context
    ) -> pb.SettleBatchResponse:  # gRPC method name
        await self._client.evalsha(self._sha, 0)
        return pb.SettleBatchResponse()


async def serve(redis_url: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    client = aioredis.Redis.from_url(redis_url)
    sha: str = await client.script_load(TRIVIAL_SCRIPT)
    server = grpc.aio.server()
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(FloorServicer(client, sha), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"event": "serving", "port": bound, "server": "floor"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0)
    await client.aclose()


def main() -> None:
    """Entry point of ``python -m bench.floor``."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.redis_url, args.port))  # the default event loop: the floor is untuned


if __name__ == "__main__":
    main()
