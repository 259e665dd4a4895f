"""The SDK wrappers' own overhead per call, without the Decide RPC and the provider call.

Measured is exactly what a gated ``messages.create`` / ``chat.completions.create``
adds on the caller's thread before the RPC: dropping the SDK's "not given"
sentinels, the token estimate, the canonical-JSON fingerprint, the tool-result
count and building the DecideRequest (with the enforcement config proto made
once at construction and reused). Target: < 50 µs p50 for a typical 2k-token
request.

Run ``python -m bench.wrapper_overhead``; ``make bench`` imports :func:`measure`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from spendgate_client import enforcement_config_to_proto
from spendgate_client._client import DecisionClient
from spendgate_client._estimate import PreparedRequest
from spendgate_client._gate import Provider

_SENTENCE = (
    "The agent reads the ticket, checks the order history and drafts a reply that cites the "
    "refund policy; it keeps the tone plain and the answer short. "
)
_TOOLS = [
    {
        "name": name,
        "description": f"{name.replace('_', ' ').capitalize()} for the current customer.",
        "input_schema": {
            "type": "object",
            "properties": {
                "customer_id": {"type": "string", "description": "The customer's id."},
                "limit": {"type": "integer", "description": "How many records to return."},
            },
            "required": ["customer_id"],
        },
    }
    for name in ("lookup_orders", "issue_refund", "search_policies")
]
_CONFIG = enforcement_config_to_proto(
    {"token_ceiling": 200_000, "max_session_usd": 5, "dedup_ttl_seconds": 60, "max_tool_calls": 50}
)


def _turn(i: int, sentences: int) -> list[dict[str, Any]]:
    """One tool round trip: the assistant calls a tool, the user returns its result."""
    call = {
        "type": "tool_use",
        "id": f"toolu_{i:04d}",
        "name": "lookup_orders",
        "input": {"customer_id": "c-42"},
    }
    result = {"type": "tool_result", "tool_use_id": f"toolu_{i:04d}", "content": _SENTENCE * sentences}
    return [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}, call]},
        {"role": "user", "content": [result]},
    ]


def anthropic_request(turns: int, sentences: int) -> dict[str, Any]:
    """A Messages body: system prompt, a question, ``turns`` tool round trips, three tools."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": _SENTENCE * 4}]
    for i in range(turns):
        messages += _turn(i, sentences)
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": _SENTENCE * 12,
        "messages": messages,
        "tools": _TOOLS,
    }


def chat_request(turns: int, sentences: int) -> dict[str, Any]:
    """The same conversation as a Chat Completions body."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _SENTENCE * 12},
        {"role": "user", "content": _SENTENCE * 4},
    ]
    for i in range(turns):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "lookup_orders", "arguments": "{}"},
        }
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": _SENTENCE * sentences})
    tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
        }
        for t in _TOOLS
    ]
    return {"model": "gpt-4o", "max_completion_tokens": 1024, "messages": messages, "tools": tools}


def _overhead(provider: Provider, path: str, body: dict[str, Any]) -> tuple[Callable[[], object], int]:
    from spendgate_client._gate import _send_body

    route = provider.routes[path]

    def once() -> PreparedRequest:
        request, _observe = _send_body(provider, route, body, None, False)
        DecisionClient._decide_request(
            "bench-session",
            request.model,
            request.input_tokens,
            request.max_output_tokens,
            request.fingerprint,
            request.tool_call_count,
            "",
            _CONFIG,
        )
        return request

    return once, once().input_tokens


def _p50_us(fn: Callable[[], object], iterations: int) -> float:
    for _ in range(min(iterations, 200)):
        fn()
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one sample says nothing about this code
    try:
        for _ in range(iterations):
            start = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(samples) / 1_000


def measure(iterations: int = 2_000) -> dict[str, float]:
    """p50 wrapper overhead in µs per call, for a ~2k-token and a ~100k-token request.

    Keys ending in ``_p50_us`` are timings; ``*_estimated_tokens`` say how large the
    estimator found each request (the cases are sized to ~2,000 and ~100,000).
    """
    from spendgate_client._anthropic import _PROVIDER as ANTHROPIC
    from spendgate_client._openai import _PROVIDER as OPENAI

    cases = {
        "anthropic_2k": (ANTHROPIC, "/v1/messages", anthropic_request(turns=2, sentences=4)),
        "anthropic_100k": (ANTHROPIC, "/v1/messages", anthropic_request(turns=60, sentences=32)),
        "openai_chat_2k": (OPENAI, "/chat/completions", chat_request(turns=2, sentences=4)),
        "openai_chat_100k": (OPENAI, "/chat/completions", chat_request(turns=60, sentences=32)),
    }
    result: dict[str, float] = {}
    for name, (provider, path, body) in cases.items():
        fn, tokens = _overhead(provider, path, body)
        runs = iterations if name.endswith("2k") else max(20, iterations // 20)
        result[f"{name}_p50_us"] = round(_p50_us(fn, runs), 2)
        result[f"{name}_estimated_tokens"] = float(tokens)
    return result


if __name__ == "__main__":
    for key, value in measure().items():
        print(f"{key:36} {value:>12,.2f}")
