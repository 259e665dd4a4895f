"""A fake LLM provider: a real HTTP server on a free port speaking enough of two APIs.

* Anthropic Messages: ``POST /v1/messages``, JSON or SSE (``stream: true``).
* OpenAI: ``POST /v1/chat/completions`` (JSON or SSE, with the usage chunk only
  when ``stream_options.include_usage`` is set) and ``POST /v1/responses``.

The real ``anthropic`` and ``openai`` SDKs talk to it through ``base_url``. It
records every request it receives, so a test can prove a blocked call never
reached it and see which model a call ran on. The usage it reports is set per
test, so settle amounts are known in advance.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEXT_PIECES = ("Hel", "lo", ", ", "wor", "ld")


@dataclass(frozen=True)
class Recorded:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model"))


@dataclass
class Usage:
    """What the fake bills: uncached input, output, cache reads and cache writes."""

    input_tokens: int = 100
    output_tokens: int = 50
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0


@dataclass
class FakeProvider:
    """The server; ``base_url`` for Anthropic, ``openai_base_url`` for OpenAI."""

    usage: Usage = field(default_factory=Usage)
    requests: list[Recorded] = field(default_factory=list)
    # Called with each request before it is answered (e.g. to stop spendgate mid-call).
    on_request: Callable[[Recorded], None] | None = None
    _failures: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.server_address[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, status: int) -> None:
        """Answer the next request with an HTTP error of this status."""
        with self._lock:
            self._failures.append(status)

    def start(self) -> FakeProvider:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # http.server's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll keeps stop() (shutdown waits for one poll) from slowing every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), name="fake-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}")
        recorded = Recorded(handler.path, dict(handler.headers.items()), body)
        with self._lock:
            self.requests.append(recorded)
            failure = self._failures.pop(0) if self._failures else None
        if self.on_request is not None:
            self.on_request(recorded)
        if failure is not None:
            error = {"type": "invalid_request_error", "message": "fake provider failure"}
            self._send_json(handler, {"type": "error", "error": error}, failure)
            return
        path = handler.path.split("?", 1)[0]
        model = str(body.get("model", "unknown"))
        stream = bool(body.get("stream"))
        if path == "/v1/messages":
            if stream:
                self._send_sse(handler, self._anthropic_events(model))
            else:
                self._send_json(handler, self._anthropic_message(model))
        elif path == "/v1/chat/completions":
            if stream:
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._send_sse(handler, self._chat_chunks(model, include_usage), done=True)
            else:
                self._send_json(handler, self._chat_completion(model))
        elif path == "/v1/responses":
            if stream:
                self._send_sse(handler, self._response_events(model))
            else:
                self._send_json(handler, self._response(model, "completed"))
        else:
            self._send_json(handler, {"error": {"message": f"no route {path}"}}, 404)

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, payload: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _send_sse(
        handler: BaseHTTPRequestHandler,
        events: Iterator[tuple[str | None, dict[str, Any]]],
        done: bool = False,
    ) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.end_headers()
        for name, payload in events:
            prefix = f"event: {name}\n" if name else ""
            handler.wfile.write(f"{prefix}data: {json.dumps(payload)}\n\n".encode())
        if done:
            handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()

    # --- Anthropic -----------------------------------------------------------------

    def _anthropic_usage(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.usage.input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": self.usage.cache_write_input_tokens,
            "cache_read_input_tokens": self.usage.cache_read_input_tokens,
        }

    def _anthropic_message(self, model: str) -> dict[str, Any]:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(TEXT_PIECES)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self._anthropic_usage(self.usage.output_tokens),
        }

    def _anthropic_events(self, model: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
        start = {**self._anthropic_message(model), "content": [], "stop_reason": None}
        start["usage"] = self._anthropic_usage(1)
        yield "message_start", {"type": "message_start", "message": start}
        block = {"type": "text", "text": ""}
        yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
        for piece in TEXT_PIECES:
            delta = {"type": "text_delta", "text": piece}
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": self.usage.output_tokens},
            },
        )
        yield "message_stop", {"type": "message_stop"}

    # --- OpenAI --------------------------------------------------------------------

    def _chat_usage(self) -> dict[str, Any]:
        u = self.usage
        prompt = u.input_tokens + u.cache_read_input_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": u.output_tokens,
            "total_tokens": prompt + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cache_read_input_tokens},
        }

    def _chat_completion(self, model: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(TEXT_PIECES)}
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": self._chat_usage(),
        }

    def _chat_chunks(self, model: str, include_usage: bool) -> Iterator[tuple[str | None, dict[str, Any]]]:
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
        }
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        for i, piece in enumerate(TEXT_PIECES):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            yield None, {**base, "choices": [choice], **extra}
        yield None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra}
        if include_usage:
            yield None, {**base, "choices": [], "usage": self._chat_usage()}

    def _response(self, model: str, status: str) -> dict[str, Any]:
        u = self.usage
        prompt = u.input_tokens + u.cache_read_input_tokens
        text = {"type": "output_text", "text": "".join(TEXT_PIECES), "annotations": []}
        message = {
            "type": "message",
            "id": "msg_fake",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": 1_700_000_000,
            "model": model,
            "status": status,
            "output": [message] if status == "completed" else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": u.cache_read_input_tokens},
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + u.output_tokens,
            }
            if status == "completed"
            else None,
        }

    def _response_events(self, model: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
        seq = 0
        yield (
            "response.created",
            {
                "type": "response.created",
                "sequence_number": seq,
                "response": self._response(model, "in_progress"),
            },
        )
        for piece in TEXT_PIECES:
            seq += 1
            yield (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                    "sequence_number": seq,
                },
            )
        yield (
            "response.completed",
            {
                "type": "response.completed",
                "sequence_number": seq + 1,
                "response": self._response(model, "completed"),
            },
        )


# --- helpers shared by the wrapper tests ---------------------------------------------

# Round prices (USD per million tokens) so every settle amount is easy to check:
# "big" models cost 1,000 nano-USD per input token, 2,000 per output token, 100 per
# cache read and 1,250 per cache write; "small" ones a tenth of that.
PRICES_YAML = """\
prices:
  claude-test-big: &big
    input_usd_per_mtok: 1
    output_usd_per_mtok: 2
    cache_read_usd_per_mtok: 0.1
    cache_write_usd_per_mtok: 1.25
  claude-test-small: &small
    input_usd_per_mtok: 0.1
    output_usd_per_mtok: 0.2
    cache_read_usd_per_mtok: 0.01
    cache_write_usd_per_mtok: 0.125
  gpt-test-big: *big
  gpt-test-small: *small
"""
BIG = {"input": 1_000, "output": 2_000, "cache_read": 100, "cache_write": 1_250}
SMALL = {key: value // 10 for key, value in BIG.items()}


def cost(prices: dict[str, int], usage: Usage) -> int:
    """What the server counts for ``usage`` at ``prices`` (nano-USD per token)."""
    return (
        usage.input_tokens * prices["input"]
        + usage.output_tokens * prices["output"]
        + usage.cache_read_input_tokens * prices["cache_read"]
        + usage.cache_write_input_tokens * prices["cache_write"]
    )


def session_spend(target: str, session_id: str) -> int:
    """The session's settled spend plus open reservations, read with a zero-cost Decide."""
    from spendgate_client import DecisionClient

    with DecisionClient(target, timeout=5) as client:
        probe = client.decide(session_id, "claude-test-big", 0, 0, os.urandom(32))
    assert not probe.fail_open
    return probe.session_spend_nano_usd


def new_session() -> str:
    """A session id no other test uses."""
    return f"test-{uuid.uuid4().hex[:16]}"
