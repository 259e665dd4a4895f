"""Reading what a provider billed: response bodies → :class:`~spendgate_client.Usage` counts.

Every billed dimension is reported to Settle as ``Usage.counts``, keyed by
genai-prices usage key (``input_tokens``, ``cache_write_1h_tokens``,
``output_audio_tokens``, ``audio_seconds``, ``input_characters``,
``web_searches``, …) with genai-prices' meaning: ``input_tokens`` is *all* input
tokens, cache reads and writes included, and the narrower keys say which part of
them was which. The reading is genai-prices' own ``extract_usage`` for each
provider API it knows (Anthropic Messages, OpenAI Chat, Responses, Images,
Embeddings, and duration-billed audio); the few counts no provider usage object
carries (characters of a speech request, images of a DALL·E call, web searches
of a Responses call) are added by the routes.

Reading runs on the settle thread (:class:`Reading` is resolved there), so the
caller's thread never imports genai-prices or parses a body twice.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spendgate_client._client import Usage

__all__ = ["Reading", "extract", "field_of", "merge_usage", "usage_from_counts"]

_log = logging.getLogger("spendgate_client")

# Counts whose key genai-prices reports as part of input_tokens (its "input_tokens" is the whole input).
_CACHE_READ = "cache_read_tokens"
_CACHE_WRITE = "cache_write_tokens"
_extract_lock = threading.Lock()


def field_of(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]…`` through dicts or SDK objects alike; None when any step is missing."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
    return obj


def as_plain(obj: Any) -> Any:
    """A JSON-like copy of an SDK (pydantic) object; dicts and scalars unchanged."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if dump is not None else obj


def merge_usage(base: Mapping[str, Any] | None, update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the keys ``update`` reports; a None in ``update`` keeps the earlier value."""
    merged = dict(base or {})
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_usage(merged[key], value)
        else:
            merged[key] = value
    return merged


def usage_from_counts(counts: Mapping[str, int], service_tier: str = "") -> Usage:
    """A Usage carrying ``counts`` and, for servers that read only them, the four token fields.

    genai-prices' ``input_tokens`` includes cache reads and writes; the token fields
    do not (``input_tokens`` there is the uncached part).
    """
    clean = {k: int(v) for k, v in counts.items() if v}
    total_in = clean.get("input_tokens", 0)
    read = clean.get(_CACHE_READ, 0)
    write = clean.get(_CACHE_WRITE, 0)
    return Usage(
        input_tokens=max(0, total_in - read - write),
        output_tokens=clean.get("output_tokens", 0),
        cache_read_input_tokens=read,
        cache_write_input_tokens=write,
        counts=clean,
        service_tier=service_tier,
    )


def extract(provider_id: str, api_flavor: str, body: Mapping[str, Any]) -> dict[str, int]:
    """genai-prices' usage counts of one response body (an empty dict when it reports none).

    Raises:
        ValueError: the body's usage is malformed for that API.
    """
    from genai_prices import extract_usage  # heavy (its price data): only ever on the settle thread

    # Without its model: the counts do not depend on it, and a name genai-prices does not
    # know (a fine-tune, a new model, an operator's own) must still be read.
    anonymous = {key: value for key, value in body.items() if key != "model"}
    with _extract_lock:  # the first call loads the data snapshot; once is enough
        extracted = extract_usage(anonymous, provider_id=provider_id, api_flavor=api_flavor)
    # Its Usage keeps exactly the reported keys as attributes (the others are inferred on access).
    return {key: int(value) for key, value in vars(extracted.usage).items() if isinstance(value, int | float)}


@dataclass(frozen=True, slots=True)
class Reading:
    """Usage still to be read from what a provider answered; :meth:`resolve` runs on the settle thread.

    Attributes:
        read: body → usage (None when the body reports none).
        body: a parsed JSON body, or its raw bytes (parsed here, once).
    """

    read: Callable[[Mapping[str, Any]], Usage | None]
    body: Mapping[str, Any] | bytes = field(default_factory=dict)

    def resolve(self) -> Usage | None:
        """The usage, or None when the body reports none (or is not JSON)."""
        body = _parse(self.body) if isinstance(self.body, bytes) else self.body
        return None if body is None else self.read(body)


def _parse(content: bytes) -> Mapping[str, Any] | None:
    """A JSON object, or JSON lines as ``{"lines": [...]}``; empty when neither (plain text, audio)."""
    try:
        body = json.loads(content)
    except ValueError:
        lines = []
        for raw in content.splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    return {}
        return {"lines": lines}
    return body if isinstance(body, Mapping) else {}
