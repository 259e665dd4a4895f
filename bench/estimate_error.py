"""The input-token estimate's error before and after the wrappers' calibration.

A corpus of requests of six kinds (English prose, Python code, JSON, Chinese text,
tool schemas, images) is built here from fixed pieces with a seeded generator, as
Anthropic Messages and OpenAI Chat Completions bodies. Each request is estimated
by the client's own byte count (``prepare_anthropic`` / ``prepare_openai_chat``),
then again through a :class:`~spendgate_client._calibrate.Calibrator` fed, call by
call, the reference count of the requests before it (as the settles would).

The reference ("what the provider would report") is **not a real tokenizer**:
none runs offline (``tiktoken`` downloads its BPE files at first use and its
wheel ships none; Anthropic publishes no local tokenizer for current models). It
is a documented model per kind: the characters of the text divided by a
characters-per-token figure (:data:`CHARS_PER_TOKEN`, from the providers' docs
and public measurements), jittered per request by up to :data:`JITTER` either
way (real texts of one kind differ), plus a few tokens per message, the
providers' per-image counts and Anthropic's tool-use system prompt. So the
"before" column shows how the byte count sits against typical ratios, and the
"after" column how quickly and how tightly the calibration follows a stream of
that kind; neither is a substitute for checking against a provider's bill.

Run ``python -m bench.estimate_error``; ``make bench`` imports :func:`measure`.
"""

from __future__ import annotations

import base64
import json
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from spendgate_client._calibrate import MIN_CALLS, Calibrator
from spendgate_client._estimate import PreparedRequest, prepare_anthropic, prepare_openai_chat

__all__ = ["CHARS_PER_TOKEN", "JITTER", "KINDS", "measure", "table"]

PROVIDERS: Final = ("anthropic", "openai")
KINDS: Final = ("prose", "code", "json", "cjk", "tools", "images")
# Characters per token of the text, (Claude, GPT-4o / o200k). Prose: Anthropic's "about 3.5",
# OpenAI's "about 4". Code and JSON: ~2.8-3.2 in public measurements. Chinese: about one token per
# character on o200k, more on Claude. Tool schemas: JSON.
CHARS_PER_TOKEN: Final = {
    "prose": (3.5, 4.0),
    "code": (2.8, 3.2),
    "json": (2.6, 3.0),
    "cjk": (0.9, 1.1),
    "tools": (2.6, 3.0),
    "images": (3.5, 4.0),
}
JITTER: Final = 0.08
# Tokens each message's role and separators cost (OpenAI's cookbook counts 3, plus 3 to prime the reply).
MESSAGE_TOKENS: Final = 4
# Anthropic's documented tool-use system prompt (tool_choice auto); OpenAI publishes none.
ANTHROPIC_TOOL_PROMPT: Final = 346
# A 1092x1092 image: Anthropic (w*h)/750; OpenAI gpt-4o high detail 85 + 170 per 512-px tile (4).
IMAGE_TOKENS: Final = {"anthropic": 1_590, "openai": 765}
CALLS_PER_KIND: Final = 40

_PROSE = (
    "The committee met on Tuesday to review the quarterly figures and the hiring plan.",
    "After a long discussion it agreed that the new warehouse should open in the spring.",
    "Customers who ordered before the price change will keep the old rate until renewal.",
    "She explained that the delay came from a supplier, not from the team itself.",
    "Please summarise the attached notes in plain language for the board.",
    "The weather turned cold, and most of the visitors left before the last train.",
)
_CODE = (
    "def {name}(items: list[dict[str, int]], limit: int = 10) -> list[int]:",
    '    """Return the first ``limit`` totals of ``items``."""',
    "    totals = [item['price'] * item.get('quantity', 1) for item in items]",
    "    if not totals:\n        raise ValueError('no items')",
    "    return sorted(totals, reverse=True)[:limit]",
    "for index, row in enumerate(rows):\n    cache[row.key] = {name}(row.values)",
)
# Chinese punctuation is full width: the commas are meant.
_CJK = (
    "委员会在星期二开会审查了季度数据和招聘计划。",
    "经过长时间讨论，大家同意新仓库应在春天开业。",  # noqa: RUF001
    "在价格调整前下单的客户将保留原价直到续约。",
    "她解释说延误来自供应商，而不是团队本身。",  # noqa: RUF001
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One corpus request: its body per provider, text characters and media it holds."""

    kind: str
    text: str
    messages: int
    tools: list[dict[str, Any]]
    images: int


def _text(kind: str, rng: random.Random) -> str:
    if kind in ("prose", "tools", "images"):
        words = rng.randint(20, 1_500) if kind == "prose" else rng.randint(5, 40)
        out: list[str] = []
        while sum(len(s.split()) for s in out) < words:
            out.append(rng.choice(_PROSE))
        return " ".join(out)
    if kind == "code":
        lines = [
            rng.choice(_CODE).format(name=f"total_{rng.randint(0, 99)}") for _ in range(rng.randint(5, 300))
        ]
        return "\n".join(lines)
    if kind == "json":
        records = [
            {
                "id": rng.randint(1, 10**6),
                "name": rng.choice(("alpha", "beta", "gamma")),
                "price": rng.random(),
            }
            for _ in range(rng.randint(3, 200))
        ]
        return json.dumps(records, indent=2)
    return "".join(rng.choice(_CJK) for _ in range(rng.randint(5, 400)))


def _tools(count: int, rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "name": f"tool_{i}",
            "description": rng.choice(_PROSE),
            "input_schema": {
                "type": "object",
                "properties": {
                    f"field_{j}": {
                        "type": rng.choice(("string", "integer")),
                        "description": rng.choice(_PROSE),
                    }
                    for j in range(rng.randint(1, 6))
                },
                "required": ["field_0"],
            },
        }
        for i in range(count)
    ]


def corpus(kind: str, seed: int = 7) -> Iterator[Sample]:
    """:data:`CALLS_PER_KIND` requests of ``kind``, the same for the same seed."""
    rng = random.Random(f"{kind}-{seed}")
    for _ in range(CALLS_PER_KIND):
        text = _text(kind, rng)
        messages = rng.randint(1, 3) if kind == "prose" else 1
        tools = _tools(rng.randint(2, 20), rng) if kind == "tools" else []
        images = rng.randint(1, 4) if kind == "images" else 0
        yield Sample(kind, text, messages, tools, images)


_IMAGE = base64.b64encode(random.Random(1).randbytes(150_000)).decode()


def _prepare(provider: str, sample: Sample) -> PreparedRequest:
    pieces = [sample.text[i :: sample.messages] for i in range(sample.messages)]
    if provider == "anthropic":
        image: dict[str, Any] = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": _IMAGE},
        }
        content: list[Any] = [{"type": "text", "text": p} for p in pieces]
        messages = [{"role": "user", "content": [*([image] * sample.images), c]} for c in content]
        body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 1_000, "messages": messages}
        if sample.tools:
            body["tools"] = sample.tools
        return prepare_anthropic(body)
    url = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_IMAGE}", "detail": "high"}}
    messages = [
        {"role": "user", "content": [*([url] * sample.images), {"type": "text", "text": p}]} for p in pieces
    ]
    body = {"model": "gpt-4o", "max_completion_tokens": 1_000, "messages": messages}
    if sample.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t["description"],
                    "parameters": t["input_schema"],
                },
            }
            for t in sample.tools
        ]
    return prepare_openai_chat(body)


def reference(provider: str, sample: Sample, rng: random.Random, spread: float = JITTER) -> int:
    """The modelled provider count of ``sample``, its text ratio jittered by up to ``spread`` either way."""
    cpt = CHARS_PER_TOKEN[sample.kind][PROVIDERS.index(provider)]
    jitter = 1 + rng.uniform(-spread, spread)
    tokens = len(sample.text) / cpt * jitter + MESSAGE_TOKENS * sample.messages + 3
    if sample.tools:
        tokens += len(json.dumps(sample.tools)) / cpt * jitter
        tokens += ANTHROPIC_TOOL_PROMPT if provider == "anthropic" else 0
    tokens += IMAGE_TOKENS[provider] * sample.images
    return round(tokens)


def _errors(
    provider: str, kinds: tuple[str, ...], interleave: bool, spread: float
) -> tuple[list[float], list[float]]:
    """Relative errors (estimate / reference - 1) before calibration, and after ``MIN_CALLS`` calls."""
    rng = random.Random(f"jitter-{provider}-{'-'.join(kinds)}")
    streams = [list(corpus(kind)) for kind in kinds]
    samples = [s for group in zip(*streams, strict=True) for s in group] if interleave else streams[0]
    calibrator = Calibrator()
    before: list[float] = []
    after: list[float] = []
    for n, sample in enumerate(samples):
        raw = _prepare(provider, sample).input_tokens
        truth = reference(provider, sample, rng, spread)
        before.append(raw / truth - 1)
        corrected = calibrator.correct(provider, raw)
        if n >= MIN_CALLS:
            after.append(corrected / truth - 1)
        calibrator.observe(provider, raw, truth)
    return before, after


def _summary(errors: list[float]) -> dict[str, float]:
    return {
        "median_pct": round(100 * statistics.median(errors), 1),
        "min_pct": round(100 * min(errors), 1),
        "max_pct": round(100 * max(errors), 1),
    }


def measure() -> dict[str, Any]:
    """Error of the estimate per kind and provider (and a mixed stream), before and after calibration.

    "after" is measured on calls after the first :data:`MIN_CALLS` of the stream, with the
    reference ratio fixed per kind ("after_stable") and jittered by :data:`JITTER` per request
    ("after"); "before" is the raw estimate against the jittered reference.

    Returns:
        ``{"<kind>/<provider>": {"before": {median_pct, min_pct, max_pct}, "after_stable": {...},
        "after": {...}}}``; percentages are estimate over reference minus one (positive: high).
    """
    out: dict[str, Any] = {}
    for kind in (*KINDS, "mixed"):
        for provider in PROVIDERS:
            kinds = KINDS if kind == "mixed" else (kind,)
            before, after = _errors(provider, kinds, kind == "mixed", JITTER)
            _, stable = _errors(provider, kinds, kind == "mixed", 0.0)
            out[f"{kind}/{provider}"] = {
                "before": _summary(before),
                "after_stable": _summary(stable),
                "after": _summary(after),
            }
    return out


def table(figures: dict[str, Any], fmt: Callable[[str], str] = str) -> str:
    """A Markdown table of :func:`measure`'s figures."""
    rows = [
        "| kind / provider | raw: median (min..max) | calibrated, stable ratio | calibrated, ratio ±8% |",
        "|---|---:|---:|---:|",
    ]
    for key, f in figures.items():
        cells = [
            f"{f[side]['median_pct']:+.1f}% ({f[side]['min_pct']:+.1f}..{f[side]['max_pct']:+.1f})"
            for side in ("before", "after_stable", "after")
        ]
        rows.append(f"| {fmt(key)} | {' | '.join(cells)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(measure()))
