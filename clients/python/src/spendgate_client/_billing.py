"""Worst-case estimates of the endpoints not billed as a chat model's input and output tokens.

Each function turns one request body (and, for uploads, its files) into the
:class:`~spendgate_client._estimate.PreparedRequest` Decide needs, with
``max_usage`` in the unit the endpoint bills (genai-prices usage keys):

================================  ==========================================================
endpoint                          worst case reserved
================================  ==========================================================
embeddings                        ``input_tokens``: the input's estimate (token arrays exact)
legacy completions                prompt estimate in, ``max_tokens`` (API default 16) x ``n``
                                  (or ``best_of``) out
images, gpt-image models          prompt in; output image tokens by quality and size
                                  (:data:`GPT_IMAGE_OUTPUT_TOKENS`, ``auto`` = the largest)
images, DALL·E                    ``requests``: one per image, on the model id
                                  ``dall-e-3-<quality>-<size>`` (priced per image)
audio transcriptions              ``audio_seconds``: exact for WAV, else an upper bound from the
                                  file size at :data:`MIN_AUDIO_BYTES_PER_SECOND`
audio speech                      ``input_characters`` (exact) for tts-1 models; tokens for
                                  the gpt-4o ones
message / OpenAI batches          every request's estimate summed, at the ``batch`` tier
================================  ==========================================================
"""

from __future__ import annotations

import hashlib
import io
import os
import wave
from collections.abc import Mapping, Sequence
from typing import Any, Final

from spendgate_client._estimate import (
    BYTES_PER_TOKEN,
    MAX_INPUT_TOKENS,
    PreparedRequest,
    _materialize,
    _positive_int,
    canonical_json,
    prepare_anthropic,
    prepare_openai_chat,
    prepare_openai_responses,
)
from spendgate_client._usage import usage_from_counts

__all__ = [
    "GPT_IMAGE_OUTPUT_TOKENS",
    "MIN_AUDIO_BYTES_PER_SECOND",
    "dalle_model_id",
    "prepare_anthropic_batch",
    "prepare_openai_batch_lines",
    "prepare_openai_completions",
    "prepare_openai_embeddings",
    "prepare_openai_image",
    "prepare_openai_speech",
    "prepare_openai_transcription",
    "text_tokens",
]

# OpenAI's image output tokens per image of gpt-image-1 by quality and size (its image
# generation guide); "auto" takes the largest of its row or column.
GPT_IMAGE_OUTPUT_TOKENS: Final = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1_056, "1024x1536": 1_584, "1536x1024": 1_568},
    "high": {"1024x1024": 4_160, "1024x1536": 6_240, "1536x1024": 6_208},
}
# An input image of a gpt-image edit: at most this many tokens (high fidelity, largest tile set).
GPT_IMAGE_INPUT_TOKENS: Final = 6_240
# No speech codec the audio endpoints take goes below ~8 kbit/s, so a file lasts at most
# bytes / 1,000 seconds: a safe upper bound when its header says nothing simpler.
MIN_AUDIO_BYTES_PER_SECOND: Final = 1_000
# Audio-in models bill ~10 tokens per second of speech; a transcript is well under 5 tokens per second.
AUDIO_TOKENS_PER_SECOND: Final = 10
TRANSCRIPT_TOKENS_PER_SECOND: Final = 5
# A speech model's audio output: well under 2 tokens per input character.
SPEECH_AUDIO_TOKENS_PER_CHARACTER: Final = 2
# The Completions API's default max_tokens.
LEGACY_DEFAULT_MAX_TOKENS: Final = 16


def text_tokens(value: Any) -> int:
    """Estimated tokens of a text input: a string, a list of strings, or token id arrays (exact)."""
    if isinstance(value, str):
        return -(-len(value.encode()) // BYTES_PER_TOKEN)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(text_tokens(v) for v in value)
    return 0


def _prepared(
    body: dict[str, Any],
    model: str,
    counts: Mapping[str, int],
    *,
    input_tokens: int,
    max_output_tokens: int = 0,
    extra: bytes = b"",
    tier: str = "",
) -> PreparedRequest:
    canonical = canonical_json(body)
    return PreparedRequest(
        body=body,
        model=model,
        input_tokens=max(0, min(input_tokens, MAX_INPUT_TOKENS)),
        max_output_tokens=max_output_tokens,
        fingerprint=hashlib.sha256(canonical + extra).digest(),
        tool_call_count=0,
        max_usage=usage_from_counts(counts, tier),
    )


def _model(body: Mapping[str, Any], default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def prepare_openai_embeddings(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of an embeddings request (``/embeddings``): input tokens only."""
    body = _materialize(body, ("input",))
    tokens = text_tokens(body.get("input"))
    return _prepared(body, _model(body, "unknown"), {"input_tokens": tokens}, input_tokens=tokens)


def prepare_openai_completions(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a legacy completions request (``/completions``), priced like chat."""
    body = _materialize(body, ("prompt",))
    tokens = text_tokens(body.get("prompt")) + text_tokens(body.get("suffix"))
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    cap = (_positive_int(body.get("max_tokens")) or LEGACY_DEFAULT_MAX_TOKENS) * choices
    counts = {"input_tokens": tokens, "output_tokens": cap}
    return _prepared(body, _model(body, "unknown"), counts, input_tokens=tokens, max_output_tokens=cap)


def dalle_model_id(model: str, quality: str, size: str) -> str:
    """The id a DALL·E call is priced under: one price per image of that quality and size."""
    return f"{model}-{quality}-{size}"


def _is_gpt_image(model: str) -> bool:
    return model.startswith(("gpt-image", "chatgpt-image"))


def prepare_openai_image(body: Mapping[str, Any], files: Any) -> PreparedRequest:
    """Facts of an image generation, edit or variation (``/images/...``)."""
    body = dict(body)
    model = _model(body, "dall-e-2")
    images = _positive_int(body.get("n")) or 1
    prompt = text_tokens(body.get("prompt"))
    digest, _size, _head = _files_digest(files)
    if _is_gpt_image(model):
        quality = str(body.get("quality") or "auto")
        row = GPT_IMAGE_OUTPUT_TOKENS.get(quality, GPT_IMAGE_OUTPUT_TOKENS["high"])
        size = str(body.get("size") or "auto")
        per_image = row.get(size, max(row.values()))
        inputs = len(files or ())
        counts = {
            "input_tokens": prompt + inputs * GPT_IMAGE_INPUT_TOKENS,
            "input_image_tokens": inputs * GPT_IMAGE_INPUT_TOKENS,
            "output_tokens": images * per_image,
        }
        return _prepared(
            body, model, counts, input_tokens=prompt, max_output_tokens=images * per_image, extra=digest
        )
    quality = str(body.get("quality") or "standard")
    if quality not in ("standard", "hd"):
        quality = "standard"
    size = str(body.get("size") or "1024x1024")
    return _prepared(
        body, dalle_model_id(model, quality, size), {"requests": images}, input_tokens=prompt, extra=digest
    )


def _file_content(value: Any) -> bytes:
    """The bytes of one SDK file argument: bytes, a (name, content, ...) tuple, a file or a path."""
    if isinstance(value, tuple) and len(value) >= 2:
        value = value[1]
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, os.PathLike | str):
        with open(value, "rb") as handle:
            return handle.read()
    read = getattr(value, "read", None)
    if read is not None:
        position = value.tell() if hasattr(value, "tell") else None
        data = read()
        if position is not None:
            value.seek(position)  # the SDK still has to send it
        return data if isinstance(data, bytes) else str(data).encode()
    return b""


def _files_digest(files: Any) -> tuple[bytes, int, bytes]:
    """(SHA-256 of every file's bytes, their total size, the first file's bytes)."""
    if not files:
        return b"", 0, b""
    digest = hashlib.sha256()
    total = 0
    first = b""
    for _name, value in files:
        data = _file_content(value)
        digest.update(data)
        total += len(data)
        first = first or data
    return digest.digest(), total, first


def audio_seconds(data: bytes) -> int:
    """Seconds of audio in ``data``, rounded up: exact for WAV, else an upper bound by size."""
    try:
        with wave.open(io.BytesIO(data)) as clip:
            rate: int = clip.getframerate()
            frames: int = clip.getnframes()
            if rate > 0:
                return max(1, -(-frames // rate))
    except (wave.Error, EOFError):
        pass
    return max(1, -(-len(data) // MIN_AUDIO_BYTES_PER_SECOND))


def prepare_openai_transcription(body: Mapping[str, Any], files: Any) -> PreparedRequest:
    """Facts of an audio transcription or translation (``/audio/transcriptions`` / ``translations``).

    whisper-1 bills seconds of audio; the gpt-4o transcribe models bill audio tokens in and
    text tokens out.
    """
    body = dict(body)
    model = _model(body, "whisper-1")
    digest, _total, first = _files_digest(files)
    seconds = audio_seconds(first)
    prompt = text_tokens(body.get("prompt"))
    if model.startswith("whisper"):
        counts = {"audio_seconds": seconds}
        return _prepared(body, model, counts, input_tokens=0, extra=digest)
    audio = seconds * AUDIO_TOKENS_PER_SECOND
    out = seconds * TRANSCRIPT_TOKENS_PER_SECOND
    counts = {"input_tokens": audio + prompt, "input_audio_tokens": audio, "output_tokens": out}
    return _prepared(body, model, counts, input_tokens=0, max_output_tokens=out, extra=digest)


def prepare_openai_speech(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a speech request (``/audio/speech``): tts-1 models bill input characters."""
    body = dict(body)
    model = _model(body, "tts-1")
    text = body.get("input")
    characters = len(text) if isinstance(text, str) else 0
    tokens = text_tokens(text) + text_tokens(body.get("instructions"))
    if model.startswith("tts-1"):
        return _prepared(body, model, {"input_characters": characters}, input_tokens=tokens)
    out = characters * SPEECH_AUDIO_TOKENS_PER_CHARACTER
    counts = {"input_tokens": tokens, "output_tokens": out, "output_audio_tokens": out}
    return _prepared(body, model, counts, input_tokens=tokens, max_output_tokens=out)


def _batch(body: dict[str, Any], parts: Sequence[PreparedRequest]) -> PreparedRequest:
    """One reservation for a batch: every request's worst case summed, at the batch tier.

    The batch is priced on its first request's model. ``input_tokens`` is the largest
    single request (what ``token_ceiling`` means for a batch: no request above it).
    """
    counts: dict[str, int] = {}
    for part in parts:
        part_counts = part.max_usage.counts if part.max_usage is not None else None
        if part_counts is None:
            part_counts = {"input_tokens": part.input_tokens, "output_tokens": part.max_output_tokens}
        for key, value in part_counts.items():
            counts[key] = counts.get(key, 0) + value
    model = parts[0].model if parts else "unknown"
    largest = max((p.input_tokens for p in parts), default=0)
    return _prepared(body, model, counts, input_tokens=largest, tier="batch")


def prepare_anthropic_batch(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a Message Batch (``/v1/messages/batches``): its requests' params are in the body."""
    body = _materialize(body, ("requests",))
    parts = []
    for item in body.get("requests") or ():
        params = item.get("params") if isinstance(item, Mapping) else getattr(item, "params", None)
        if isinstance(params, Mapping):
            prepared = prepare_anthropic(params)
            parts.append(
                _prepared(
                    dict(params),
                    prepared.model,
                    {"input_tokens": prepared.input_tokens, "output_tokens": prepared.max_output_tokens},
                    input_tokens=prepared.input_tokens,
                )
            )
    return _batch(body, parts)


_OPENAI_BATCH_ENDPOINTS: Final = {
    "/v1/chat/completions": prepare_openai_chat,
    "/v1/responses": prepare_openai_responses,
    "/v1/embeddings": prepare_openai_embeddings,
    "/v1/completions": prepare_openai_completions,
}


def prepare_openai_batch_lines(
    body: Mapping[str, Any], lines: Sequence[Mapping[str, Any]]
) -> PreparedRequest:
    """Facts of an OpenAI batch (``/batches``) whose input file holds ``lines`` (parsed JSONL)."""
    parts = []
    for line in lines:
        prepare = _OPENAI_BATCH_ENDPOINTS.get(str(line.get("url", "")))
        request = line.get("body")
        if prepare is None or not isinstance(request, Mapping):
            continue
        prepared = prepare(request)
        counts = (
            prepared.max_usage.counts
            if prepared.max_usage is not None
            else {"input_tokens": prepared.input_tokens, "output_tokens": prepared.max_output_tokens}
        )
        parts.append(_prepared(dict(request), prepared.model, counts, input_tokens=prepared.input_tokens))
    return _batch(dict(body), parts)
