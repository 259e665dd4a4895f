"""A fake LLM provider: a real HTTP server on a free port speaking enough of two APIs.

* Anthropic Messages: ``POST /v1/messages``, JSON or SSE (``stream: true``);
  ``count_tokens``; Message Batches (create, retrieve, JSONL results).
* OpenAI: ``POST /v1/chat/completions`` (JSON or SSE, with the usage chunk only
  when ``stream_options.include_usage`` is set), ``/v1/responses`` (also
  ``background``, retrieved or streamed by id), legacy ``/v1/completions``,
  ``/v1/embeddings``, ``/v1/images/*``, ``/v1/audio/transcriptions`` (multipart),
  ``/v1/audio/speech``, ``/v1/moderations``, files and batches.

The real ``anthropic`` and ``openai`` SDKs talk to it through ``base_url``. It
records every request it receives, so a test can prove a blocked call never
reached it and see which model a call ran on. The usage it reports is set per
test, so settle amounts are known in advance.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import os
import struct
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
    method: str = "POST"

    @property
    def model(self) -> str:
        return str(self.body.get("model"))


@dataclass
class Usage:
    """What the fake bills: uncached input, output, cache reads and cache writes.

    ``cache_write_1h_input_tokens`` (part of the cache writes) and ``web_search_requests``
    appear in Anthropic usage; ``audio_seconds`` in a whisper transcription's.
    """

    input_tokens: int = 100
    output_tokens: int = 50
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0
    web_search_requests: int = 0
    audio_seconds: float = 60.0


@dataclass
class FakeProvider:
    """The server; ``base_url`` for Anthropic, ``openai_base_url`` for OpenAI."""

    usage: Usage = field(default_factory=Usage)
    requests: list[Recorded] = field(default_factory=list)
    # Called with each request before it is answered (e.g. to stop spendgate mid-call).
    on_request: Callable[[Recorded], None] | None = None
    # Streamed Anthropic answers: how many text deltas before message_delta.
    text_deltas: int = len(TEXT_PIECES)
    # A chat completion's finish_reason (``"length"`` makes ``.parse`` raise after the 2xx).
    finish_reason: str = "stop"
    _failures: list[int] = field(default_factory=list)
    _files: dict[str, bytes] = field(default_factory=dict)
    _batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    _responses: dict[str, str] = field(default_factory=dict)
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

            def do_GET(self) -> None:  # http.server's naming
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
        raw = handler.rfile.read(length)
        files: dict[str, bytes] = {}
        content_type = handler.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body, files = _multipart(content_type, raw)
        else:
            body = json.loads(raw or b"{}")
        recorded = Recorded(handler.path, dict(handler.headers.items()), body, handler.command)
        with self._lock:
            self.requests.append(recorded)
            failure = self._failures.pop(0) if self._failures else None
        if self.on_request is not None:
            self.on_request(recorded)
        if failure is not None:
            error = {"type": "invalid_request_error", "message": "fake provider failure"}
            self._send_json(handler, {"type": "error", "error": error}, failure)
            return
        path, _, query = handler.path.partition("?")
        if handler.command == "GET":
            self._handle_get(handler, path, query)
            return
        model = str(body.get("model", "unknown"))
        stream = bool(body.get("stream"))
        if path == "/v1/messages":
            if stream:
                self._send_sse(handler, self._anthropic_events(model))
            else:
                self._send_json(handler, self._anthropic_message(model))
        elif path == "/v1/messages/count_tokens":
            self._send_json(handler, {"input_tokens": self.usage.input_tokens})
        elif path == "/v1/messages/batches":
            self._send_json(handler, self._anthropic_batch_created(body))
        elif path == "/v1/chat/completions":
            if stream:
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._send_sse(handler, self._chat_chunks(model, include_usage), done=True)
            else:
                self._send_json(handler, self._chat_completion(model))
        elif path == "/v1/responses":
            if stream:
                self._send_sse(handler, self._response_events(model))
            elif body.get("background"):
                answer = self._response(model, "queued")
                with self._lock:
                    self._responses[answer["id"]] = model
                self._send_json(handler, answer)
            else:
                self._send_json(handler, self._response(model, "completed"))
        elif path == "/v1/completions":
            self._send_json(handler, self._legacy_completion(model, body))
        elif path == "/v1/embeddings":
            self._send_json(handler, self._embeddings(model, body))
        elif path.startswith("/v1/images/"):
            self._send_json(handler, self._images(model, body))
        elif path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            self._transcription(handler, model, body)
        elif path == "/v1/audio/speech":
            self._send_bytes(handler, b"ID3" + b"\0" * 256, "audio/mpeg")
        elif path == "/v1/moderations":
            self._send_json(handler, {"id": "modr-fake", "model": "omni-moderation-latest", "results": []})
        elif path == "/v1/files":
            self._send_json(handler, self._file_created(body, files))
        elif path == "/v1/batches":
            self._send_json(handler, self._openai_batch_created(body))
        else:
            self._send_json(handler, {"error": {"message": f"no route {path}"}}, 404)

    def _handle_get(self, handler: BaseHTTPRequestHandler, path: str, query: str) -> None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "responses"] and len(parts) == 3:
            model = self._responses.get(parts[2], "unknown")
            if "stream=true" in query:
                self._send_sse(handler, self._response_events(model))
            else:
                self._send_json(handler, {**self._response(model, "completed"), "id": parts[2]})
        elif parts[:3] == ["v1", "messages", "batches"] and len(parts) == 4:
            self._send_json(handler, self._anthropic_batch_ended(parts[3]))
        elif parts[:3] == ["v1", "messages", "batches"] and parts[-1] == "results":
            self._send_bytes(handler, self._anthropic_batch_results(parts[3]), "application/binary")
        elif parts[:2] == ["v1", "batches"] and len(parts) == 3:
            self._send_json(handler, self._openai_batch_completed(parts[2]))
        elif parts[:2] == ["v1", "files"] and parts[-1] == "content":
            self._send_bytes(handler, self._files.get(parts[2], b""), "application/octet-stream")
        else:
            self._send_json(handler, {"error": {"message": f"no route {path}"}}, 404)

    @staticmethod
    def _send_bytes(handler: BaseHTTPRequestHandler, data: bytes, content_type: str) -> None:
        handler.send_response(200)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

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

    def _anthropic_usage(self, output_tokens: int) -> dict[str, Any]:
        u = self.usage
        usage: dict[str, Any] = {
            "input_tokens": u.input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": u.cache_write_input_tokens,
            "cache_read_input_tokens": u.cache_read_input_tokens,
        }
        if u.cache_write_1h_input_tokens:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": u.cache_write_input_tokens - u.cache_write_1h_input_tokens,
                "ephemeral_1h_input_tokens": u.cache_write_1h_input_tokens,
            }
        if u.web_search_requests:
            usage["server_tool_use"] = {"web_search_requests": u.web_search_requests}
        return usage

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
        for i in range(self.text_deltas):
            delta = {"type": "text_delta", "text": TEXT_PIECES[i % len(TEXT_PIECES)]}
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
            "choices": [
                {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
            ],
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
            "id": f"resp_{uuid.uuid4().hex[:12]}",
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
            "background": status != "completed",
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

    # --- the other OpenAI endpoints -------------------------------------------------

    def _legacy_completion(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {"index": 0, "text": "".join(TEXT_PIECES), "finish_reason": "stop", "logprobs": None}
            ],
            "usage": self._chat_usage(),
        }

    def _embeddings(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        vector = struct.pack("<3f", 0.25, 0.5, 0.75)
        encoded = (
            base64.b64encode(vector).decode()
            if body.get("encoding_format") == "base64"
            else [0.25, 0.5, 0.75]
        )
        return {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded} for i in range(count)],
            "usage": {"prompt_tokens": self.usage.input_tokens, "total_tokens": self.usage.input_tokens},
        }

    def _images(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        answer: dict[str, Any] = {"created": 1_700_000_000, "data": [{"b64_json": "aW1n"} for _ in range(n)]}
        if model.startswith("gpt-image"):
            answer["usage"] = {
                "input_tokens": self.usage.input_tokens,
                "input_tokens_details": {"text_tokens": self.usage.input_tokens, "image_tokens": 0},
                "output_tokens": self.usage.output_tokens,
                "total_tokens": self.usage.input_tokens + self.usage.output_tokens,
            }
        return answer

    def _transcription(self, handler: BaseHTTPRequestHandler, model: str, body: dict[str, Any]) -> None:
        text = "".join(TEXT_PIECES)
        if body.get("response_format") in ("text", "srt", "vtt"):
            self._send_bytes(handler, text.encode(), "text/plain")
            return
        if model.startswith("whisper"):
            usage: dict[str, Any] = {"type": "duration", "seconds": self.usage.audio_seconds}
        else:
            usage = {
                "type": "tokens",
                "input_tokens": self.usage.input_tokens,
                "input_token_details": {"audio_tokens": self.usage.input_tokens, "text_tokens": 0},
                "output_tokens": self.usage.output_tokens,
                "total_tokens": self.usage.input_tokens + self.usage.output_tokens,
            }
        self._send_json(handler, {"text": text, "usage": usage})

    def _file_created(self, body: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._files[file_id] = files.get("file", b"")
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self._files[file_id]),
            "created_at": 1_700_000_000,
            "filename": "input.jsonl",
            "purpose": body.get("purpose", "batch"),
            "status": "processed",
        }

    def _openai_batch_created(self, body: dict[str, Any]) -> dict[str, Any]:
        batch_id = f"batch_{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._batches[batch_id] = dict(body)
        return self._openai_batch(batch_id, "validating", None)

    def _openai_batch_completed(self, batch_id: str) -> dict[str, Any]:
        batch = self._batches[batch_id]
        if "output_file_id" not in batch:
            lines: list[dict[str, Any]] = []
            for raw in self._files.get(str(batch["input_file_id"]), b"").splitlines():
                request = json.loads(raw)
                model = str(request["body"].get("model"))
                answer = (
                    self._embeddings(model, request["body"])
                    if request["url"] == "/v1/embeddings"
                    else self._chat_completion(model)
                )
                lines.append(
                    {
                        "id": f"batch_req_{len(lines)}",
                        "custom_id": request["custom_id"],
                        "response": {"status_code": 200, "request_id": "req", "body": answer},
                        "error": None,
                    }
                )
            output = f"file-{uuid.uuid4().hex[:12]}"
            with self._lock:
                self._files[output] = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                batch["output_file_id"] = output
        return self._openai_batch(batch_id, "completed", str(batch["output_file_id"]))

    def _openai_batch(self, batch_id: str, status: str, output: str | None) -> dict[str, Any]:
        batch = self._batches[batch_id]
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": batch.get("endpoint"),
            "input_file_id": batch.get("input_file_id"),
            "completion_window": "24h",
            "status": status,
            "output_file_id": output,
            "created_at": 1_700_000_000,
        }

    # --- Anthropic batches -----------------------------------------------------------

    def _anthropic_batch_created(self, body: dict[str, Any]) -> dict[str, Any]:
        batch_id = f"msgbatch_{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._batches[batch_id] = dict(body)
        return self._anthropic_batch(batch_id, "in_progress")

    def _anthropic_batch_ended(self, batch_id: str) -> dict[str, Any]:
        return self._anthropic_batch(batch_id, "ended")

    def _anthropic_batch(self, batch_id: str, status: str) -> dict[str, Any]:
        count = len(self._batches[batch_id].get("requests") or ())
        done = status == "ended"
        return {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {
                "processing": 0 if done else count,
                "succeeded": count if done else 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "created_at": "2026-01-01T00:00:00Z",
            "expires_at": "2026-01-02T00:00:00Z",
            "ended_at": "2026-01-01T01:00:00Z" if done else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch_id}/results" if done else None,
        }

    def _anthropic_batch_results(self, batch_id: str) -> bytes:
        lines = []
        for request in self._batches[batch_id].get("requests") or ():
            message = self._anthropic_message(str(request["params"].get("model")))
            line = {"custom_id": request["custom_id"], "result": {"type": "succeeded", "message": message}}
            lines.append(json.dumps(line).encode())
        return b"\n".join(lines) + b"\n"


def _multipart(content_type: str, raw: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The fields and files of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        decoded = part.get_payload(decode=True)
        payload = decoded if isinstance(decoded, bytes) else b""
        if part.get_filename() is not None:
            files[name] = payload
        else:
            fields[name] = payload.decode()
    return fields, files


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
