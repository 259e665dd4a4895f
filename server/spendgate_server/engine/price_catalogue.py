"""genai-prices' catalogue: which entry a model id names, and its prices in each service tier.

Everything here runs at start-up or the first time a model name is seen, never per call.

Model ids resolve deterministically, by the first rule that applies (the README has
the same table):

1. A Bedrock ARN (``arn:aws:bedrock:…/us.anthropic.claude-…``) is read as the id after
   its last ``/``.
2. A Google resource name (``publishers/anthropic/models/claude-…@20250929``,
   ``models/gemini-2.5-flash``) is read as the model after ``models/``, looked up in
   Google's catalogue (which falls back to Anthropic's for Claude on Vertex).
3. A router prefix (``anthropic/claude-sonnet-4-5``, ``openrouter/…``, ``bedrock/…``,
   ``vertex_ai/…``): when the prefix names a catalogue provider (or an alias in
   :data:`PROVIDER_ALIASES`), the rest is looked up in that provider's catalogue, then
   resolved by these rules; any other prefix is looked up whole in OpenRouter's
   catalogue, then dropped.
4. A Bedrock id (``[geo.]vendor.model[-vN[:M]]``, vendor in :data:`BEDROCK_VENDORS`)
   is looked up in AWS's catalogue, which prices cross-region (``global.``) and
   regional (``us.``, ``eu.``, in-region) endpoints apart; failing that, the bare
   model in the vendor's catalogue.
5. A Vertex id (``model@version``) is looked up as ``model`` in Google's catalogue.
6. Anything else goes to genai-prices' own matching (provider by model name), and
   when that finds nothing, to Anthropic's, OpenAI's and Google's catalogues in turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import combinations

from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider

from spendgate_server.engine.price_units import (
    ANCESTORS,
    JOINS,
    REGISTRY,
    REQUESTS_KEY,
    PriceValue,
    flat_max,
    unit_of_price_key,
)

__all__ = [
    "BEDROCK_VENDORS",
    "MAX_PRICE_PROVIDERS",
    "PROVIDER_ALIASES",
    "STANDARD_TIERS",
    "TIER_CONTEXT_KEYS",
    "CatalogueEntry",
    "close_prices",
    "max_prices",
    "resolve",
    "tier_context",
    "tier_prices",
]

MAX_PRICE_PROVIDERS = ("anthropic", "openai", "google")
"""Whose prices bound an unknown model's: the highest any of their models charges, per dimension."""

TIER_CONTEXT_KEYS = ("service_tier", "processing", "speed")
"""genai-prices price-variant keys a service tier name is matched against (``flex``, ``batch``, ``fast``)."""

STANDARD_TIERS = frozenset({"", "standard", "default"})
"""Tier names that mean the standard prices (Anthropic says ``standard``, OpenAI ``default``)."""

PROVIDER_ALIASES: Mapping[str, str] = {
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "vertex_ai": "google",
    "vertex": "google",
    "vertexai": "google",
    "gemini": "google",
    "azure_ai": "azure",
}
"""Router prefixes (LiteLLM's and others') that name a catalogue provider by another name."""

BEDROCK_VENDORS = (
    "anthropic",
    "amazon",
    "meta",
    "mistral",
    "cohere",
    "ai21",
    "deepseek",
    "openai",
    "qwen",
    "writer",
    "moonshot",
    "moonshotai",
    "minimax",
    "google",
    "nvidia",
    "zai",
)
"""The model-vendor segments of Bedrock ids."""

_ARN = re.compile(r"arn:aws[a-z-]*:bedrock:[^/]*/(?P<id>[^/]+)")
_GOOGLE_RESOURCE = re.compile(r"(?:.*/)?models/(?P<model>[^/]+)")
_BEDROCK = re.compile(
    r"(?:(?P<geo>[a-z]{2,4}|us-gov|global)\.)?(?P<vendor>" + "|".join(BEDROCK_VENDORS) + r")\.(?P<model>.+)"
)
_BEDROCK_VERSION = re.compile(r"(?:-v\d+)?(?::\d+)?$")


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """A catalogue model, the provider whose catalogue holds it, and the rule that found it."""

    provider: Provider
    model: ModelInfo
    rule: str

    @property
    def key(self) -> str:
        """``provider/model id``: what the entry is called in logs and the price CLI."""
        return f"{self.provider.id}/{self.model.id}"


_index: tuple[object, dict[str, Provider]] | None = None


def _providers() -> dict[str, Provider]:
    """The catalogue's providers by id (rebuilt only if genai-prices' snapshot is replaced)."""
    global _index
    snapshot = data_snapshot.get_snapshot()
    if _index is None or _index[0] is not snapshot:
        _index = (snapshot, {p.id: p for p in snapshot.providers})
    return _index[1]


def _in(provider_id: str, ref: str, rule: str) -> CatalogueEntry | None:
    """The entry of ``ref`` in one provider's catalogue (with that provider's own fallbacks)."""
    providers = _providers()
    provider = providers.get(provider_id)
    if provider is None:
        return None
    model = provider.find_model(ref, all_providers=list(providers.values()))
    if model is None:
        return None
    owner = provider
    if not any(m is model for m in provider.models):
        # A fallback (a Claude model Google's catalogue lacks, say) is priced by the provider that lists it.
        owner = next(
            (
                p
                for pid in provider.fallback_model_providers or ()
                if (p := providers.get(pid)) is not None and any(m is model for m in p.models)
            ),
            provider,
        )
    return CatalogueEntry(owner, model, rule)


def resolve(name: str) -> CatalogueEntry | None:
    """The catalogue entry a model id names, by the module's rules; None when there is none."""
    return _resolve(name.strip().lower(), 0)


def _resolve(ref: str, depth: int) -> CatalogueEntry | None:
    if depth > 4 or not ref:  # prefixes nest a few levels at most (openrouter/anthropic/...)
        return None
    if (arn := _ARN.fullmatch(ref)) is not None:
        return _resolve(arn["id"], depth + 1)
    if (resource := _GOOGLE_RESOURCE.fullmatch(ref)) is not None:
        model = resource["model"]
        return _in("google", model.partition("@")[0], "google-resource") or _resolve(model, depth + 1)
    if "/" in ref:
        prefix, _, rest = ref.partition("/")
        provider = PROVIDER_ALIASES.get(prefix, prefix)
        if provider in _providers():
            return _in(provider, rest, "router-prefix") or _resolve(rest, depth + 1)
        return _in("openrouter", ref, "router") or _resolve(rest, depth + 1)
    if (bedrock := _BEDROCK.fullmatch(ref)) is not None:
        bare = _BEDROCK_VERSION.sub("", bedrock["model"], count=1)
        vendor = PROVIDER_ALIASES.get(bedrock["vendor"], bedrock["vendor"])
        return _in("aws", ref, "bedrock") or _in(vendor, bare, "bedrock-vendor") or _resolve(bare, depth + 1)
    if "@" in ref:
        model = ref.partition("@")[0]
        return _in("google", model, "vertex") or _resolve(model, depth + 1)
    try:
        provider_, model_ = data_snapshot.get_snapshot().find_provider_model(ref, None, None, None)
    except LookupError:
        # genai-prices picks a provider by name patterns that miss some of their own entries
        # (text-embedding-3-small, chatgpt-4o-latest, ft:gpt-4o-...): ask the three in turn.
        for provider_id in MAX_PRICE_PROVIDERS:
            if (entry := _in(provider_id, ref, "catalogue")) is not None:
                return entry
        return None
    return CatalogueEntry(provider_, model_, "catalogue")


def price_map(prices: ModelPrice) -> dict[str, PriceValue]:
    """The price keys a genai-prices ModelPrice sets."""
    return {k: v for k, v in vars(prices).items() if v is not None and not k.startswith("_")}


def _tier_names(model: ModelInfo, now: datetime) -> dict[str, dict[str, str]]:
    names: dict[str, dict[str, str]] = {}
    for variant in model.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        if len(variant.when) != 1:
            continue
        ((key, value),) = variant.when.items()
        if key in TIER_CONTEXT_KEYS:
            names.setdefault(value.lower(), {})[key] = value
    return names


def tier_context(model: ModelInfo, tier: str, now: datetime) -> dict[str, str] | None:
    """The genai-prices price context that service tier ``tier`` selects; None when no variant names it.

    A tier name selects every price variant, active at ``now``, whose one condition is
    that name under one of :data:`TIER_CONTEXT_KEYS` (``{"processing": "batch"}``,
    ``{"service_tier": "flex"}``).
    """
    return _tier_names(model, now).get(tier.lower())


def tier_prices(model: ModelInfo, now: datetime) -> dict[str, dict[str, PriceValue]]:
    """A model's prices at ``now``: ``""`` for the standard tier, then each tier a variant prices."""
    out = {"": price_map(model.get_prices(now))}
    for name, context in sorted(_tier_names(model, now).items()):
        out[name] = price_map(model.get_prices(now, context))
    return out


def close_prices(prices: Mapping[str, PriceValue]) -> dict[str, PriceValue]:
    """Complete a partial price list so every count is charged once, never less than before.

    genai-prices requires a model that prices a key to price every total it belongs
    to, and the overlap of any two keys it prices. An operator's override may leave
    these out; the missing total gets the price of its nearest priced total (which
    charged those tokens until now), the missing overlap the higher of the two prices.
    A complete list comes back unchanged.
    """
    out = dict(prices)
    while True:
        units = {u.usage_key: u for k in out if (u := unit_of_price_key(k)) is not None}
        added: dict[str, PriceValue] = {}
        for key in units:
            for total in ANCESTORS[key]:
                unit = REGISTRY.units[total]
                if unit.price_key in out or unit.price_key in added:
                    continue
                above = [units[a] for a in ANCESTORS[total] if a in units]
                source = (
                    max(above, key=lambda u: (len(u.dimensions), flat_max(out[u.price_key])))
                    if above
                    else max(
                        (units[d] for d in units if total in ANCESTORS[d]),
                        key=lambda u: flat_max(out[u.price_key]),
                    )
                )
                added[unit.price_key] = out[source.price_key]
        for a, b in combinations(sorted(units), 2):
            join = JOINS.get(frozenset((a, b)))
            if join is None:
                continue
            price_key = REGISTRY.units[join].price_key
            if price_key not in out and price_key not in added:
                added[price_key] = max(out[units[a].price_key], out[units[b].price_key], key=flat_max)
        if not added:
            return out
        out.update(added)


def max_prices(now: datetime) -> dict[str, PriceValue]:
    """The never-undercount price list: per price key, the highest any model of
    :data:`MAX_PRICE_PROVIDERS` charges at ``now``, in any tier, past any long-context threshold,
    and never less than the price of a total the key is part of.

    A unit none of them prices, and no total of which they price, takes the highest
    per-unit price of its family (a per-request fee takes the dearest per-request fee,
    say). Families none of them prices at all (pixels, pages, messages, reranks) stay
    unpriced.
    """
    maxima: dict[str, Decimal] = {}
    providers = _providers()
    for provider_id in MAX_PRICE_PROVIDERS:
        for model in providers[provider_id].models:
            for prices in tier_prices(model, now).values():
                for key, value in prices.items():
                    if unit_of_price_key(key) is not None:
                        maxima[key] = max(maxima.get(key, Decimal(0)), flat_max(value))
    priced = {u.usage_key for k in maxima if (u := unit_of_price_key(k)) is not None}
    # A model without its own price for a part (cached or audio tokens, say) charges the
    # part at its total's price, so no part may cost less than the dearest of its totals.
    for key in priced:
        unit = REGISTRY.units[key]
        for total in ANCESTORS[key] & priced:
            maxima[unit.price_key] = max(maxima[unit.price_key], maxima[REGISTRY.units[total].price_key])
    for unit in REGISTRY.units.values():
        if unit.usage_key == REQUESTS_KEY or unit.usage_key in priced or ANCESTORS[unit.usage_key] & priced:
            continue
        family = unit.dimensions.get("family")
        peers = [
            REGISTRY.units[p]
            for p in priced
            if REGISTRY.units[p].dimensions.get("family") == family and REGISTRY.units[p].per == unit.per
        ]
        if peers:
            maxima[unit.price_key] = max(maxima[p.price_key] for p in peers)
    return close_prices(maxima)
