"""``spendgate price MODEL [usage flags] [--tier T]``: how a model name is priced, before trusting a budget.

Runs locally, with the same catalogue, resolution rules, overrides (``--config``) and
unknown-model policy as ``spendgate serve``: it shows which catalogue entry the name
resolved to and by which rule, the rates of the tier, and the cost of the usage given.

Exit codes: 0 when every dimension has a known price; 2 for a bad flag, bad counts (the
model, counts and tier are bounded as Settle bounds them) or a bad ``--config``; 3 when
the model, the tier or a usage unit has no known price (the cost shown is then the
never-undercount maximum, or, with ``--unknown-model-price reject``, the refusal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal

from genai_prices.units import UnitDef

from spendgate_server.admin.flags import count, flag_errors
from spendgate_server.engine.price_units import REGISTRY, USAGE_KEYS, PriceValue, unit_of_price_key
from spendgate_server.engine.pricing import PriceOverride, PriceTable, Quote, UnknownModelPolicy
from spendgate_server.errors import InvalidArgument
from spendgate_server.money import NANO_PER_USD, format_usd
from spendgate_server.rpc.validation import priced_usage

__all__ = ["EXIT_UNPRICED", "add_price_arguments", "run_price_command"]

EXIT_UNPRICED = 3
"""``spendgate price`` exits with this when something had no known price."""

_SCALE = {1_000: "K", 1_000_000: "M", 1_000_000_000: "G"}
_FAMILY = {
    "tool_calls": "calls",
    "requests": "requests",
    "document_pages": "pages",
    "rerank": "searches",
}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_price_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``price``: the model, the tier, one flag per genai-prices usage key, and the price settings."""
    parser.add_argument("model", help="a model id as sent to the provider, a cloud or a router")
    parser.add_argument("--tier", default="", help="the service tier that ran (priority, flex, batch, ...)")
    parser.add_argument(
        "--config",
        default=os.environ.get("SPENDGATE_CONFIG", ""),
        help="the server's --config file, for its prices: overrides (env SPENDGATE_CONFIG)",
    )
    parser.add_argument(
        "--unknown-model-price",
        default=os.environ.get("SPENDGATE_UNKNOWN_MODEL_PRICE", UnknownModelPolicy.MAX.value),
        choices=[p.value for p in UnknownModelPolicy],
        help="as spendgate serve's (env SPENDGATE_UNKNOWN_MODEL_PRICE)",
    )
    parser.add_argument("--json", action="store_true", help="print the quote as JSON")
    usage = parser.add_argument_group(
        "usage",
        "counts by genai-prices usage key; a count includes its parts (--input-tokens counts all input)",
    )
    for key in REGISTRY.units:
        if key in USAGE_KEYS:
            usage.add_argument(_flag(key), dest=f"usage_{key}", type=count, metavar="N")


def _per(unit: UnitDef) -> str:
    """How a price's unit reads: MTok, hour, K calls, M characters, ..."""
    family = unit.dimensions.get("family", "")
    if family == "tokens" and unit.per == 1_000_000:
        return "MTok"
    if family == "durations" and unit.per == 3_600:
        return "hour"
    return f"{_SCALE.get(unit.per, str(unit.per))} {_FAMILY.get(family, family)}"


def _rate(value: PriceValue, unit_def: UnitDef) -> str:
    unit = _per(unit_def)

    def one(price: Decimal) -> str:
        return f"${price.normalize():f}/{unit}"

    if isinstance(value, Decimal):
        return one(value)
    tiers = ", ".join(f"past {t.start:,} {one(t.price)}" for t in value.tiers)
    return f"{one(value.base)} ({tiers})"


def _rates(prices: Mapping[str, PriceValue]) -> dict[str, str]:
    return {
        key: _rate(value, unit)
        for key, value in prices.items()
        if (unit := unit_of_price_key(key)) is not None
    }


def _tier_name(tier: str) -> str:
    """The tier's name in both outputs: the default tier ("" in the price data) is "standard"."""
    return tier or "standard"


def _as_json(model: str, quote: Quote, counts: Mapping[str, int]) -> str:
    p = quote.pricing
    return json.dumps(
        {
            "model": model,
            "resolved": p.entry or p.name,
            "rule": p.rule,
            "known": p.known,
            "tier": _tier_name(quote.tier),
            "tier_known": quote.tier_known,
            "tiers": [_tier_name(t) for t in p.tiers],
            "rates": _rates(quote.card.prices),
            "usage": dict(counts),
            "lines": [{"key": k, "count": n, "cost_nano_usd": c} for k, n, c in quote.lines],
            "unpriced": list(quote.unpriced),
            "cost_nano_usd": quote.cost_nano_usd,
            "cost_usd": str(Decimal(quote.cost_nano_usd) / NANO_PER_USD),
        },
        indent=2,
    )


def _as_text(model: str, quote: Quote, counts: Mapping[str, int]) -> str:
    p = quote.pricing
    out = [f"model     {model}"]
    if p.known:
        out.append(f"resolved  {p.entry or p.name}  (rule: {p.rule})")
    else:
        out.append("resolved  nothing: no override or catalogue entry; charged the never-undercount maximum")
    tiers = ", ".join(_tier_name(t) for t in p.tiers)
    if quote.tier_known:
        out.append(f"tier      {_tier_name(quote.tier)}  (priced tiers: {tiers})")
    else:
        out.append(
            f"tier      {quote.tier}: no known price (priced tiers: {tiers}); charged the "
            "never-undercount maximum: add it to prices: in --config"
        )
    width = max(len(k) for k in quote.card.prices) if quote.card.prices else 0
    out.append("rates")
    out += [f"  {key:<{width}}  {rate}" for key, rate in _rates(quote.card.prices).items()]
    if counts:
        out.append("usage     " + " ".join(f"{k}={v:,}" for k, v in counts.items()))
        out.append("charged")
        width = max(len(k) for k, _, _ in quote.lines) if quote.lines else 0
        order = list(REGISTRY.units)
        lines = sorted(quote.lines, key=lambda line: order.index(line[0]))
        out += [f"  {k:<{width}}  {n:>12,}  {format_usd(c)}" for k, n, c in lines]
        out += [
            f"  {k}: no known price on this model; charged the never-undercount maximum"
            for k in quote.unpriced
        ]
        out.append(f"cost      {format_usd(quote.cost_nano_usd)}  ({quote.cost_nano_usd} nano-USD)")
    return "\n".join(out)


def run_price_command(
    args: argparse.Namespace, load_prices: Callable[[str], Mapping[str, PriceOverride]]
) -> int:
    """Price ``args.model`` and print the quote; the exit code (see the module docstring).

    ``load_prices`` reads the ``prices:`` of a ``--config`` file.

    Raises:
        ConfigError: a bad ``--config`` file.
    """
    counts = {
        key: value for key in REGISTRY.units if (value := getattr(args, f"usage_{key}", None)) is not None
    }
    # The bounds Settle applies to the same fields: a quote is of a usage a server would take.
    fields = {"model": "MODEL", "usage.service_tier": "--tier"}
    fields.update({f"usage.counts[{key}]": _flag(key) for key in counts})
    with flag_errors(fields):
        usage = priced_usage(args.model, counts or {"input_tokens": 0}, args.tier)
    overrides = load_prices(args.config) if args.config else {}
    table = PriceTable(overrides, UnknownModelPolicy(args.unknown_model_price))
    try:
        quote = table.quote(args.model, usage)
    except InvalidArgument as exc:
        violation = exc.violations[0]
        if violation.field == "model":
            # The description names the model quoted: a name may hold any character.
            print(f"spendgate: {violation.description}", file=sys.stderr)
            return EXIT_UNPRICED
        print(f"spendgate: {violation.field}: {violation.description}", file=sys.stderr)
        return 2
    shown = counts or {}
    print(_as_json(args.model, quote, shown) if args.json else _as_text(args.model, quote, shown))
    if not quote.pricing.known or not quote.tier_known or quote.unpriced:
        return EXIT_UNPRICED
    return 0
