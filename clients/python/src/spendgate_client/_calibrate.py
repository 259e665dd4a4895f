"""Self-calibration of the input-token estimate from the usage providers report.

The byte-count estimate of :mod:`spendgate_client._estimate` errs high on English
prose (15-35%) and can err low on dense code for Claude's newer tokenizers. Each
settled call tells the truth for one request: the provider's input tokens (cache
reads and writes included) next to the raw estimate the wrapper made for it. A
:class:`Calibrator` keeps, per model family and endpoint, the ratios of the most
recent such calls and corrects the next estimate by a factor:

* **conservative**: the factor is the *largest* of the last :data:`WINDOW_CALLS`
  ratios plus :data:`MARGIN`, so on a stable stream of requests the corrected
  estimate lies between the provider's count and ``MARGIN`` above it; a prompt
  that tokenizes denser than the recent ones raises the factor at once and it
  falls back only as the dense one leaves the window;
* **slow to lower, quick to raise**: a factor below 1 applies only once
  :data:`MIN_CALLS` calls agree; a factor above 1 (the raw estimate was low)
  applies from the first;
* **bounded**: never below :data:`MIN_FACTOR` nor above :data:`MAX_FACTOR` of the raw
  estimate, whatever the provider reports;
* **learned only where it means something**: requests whose raw estimate is under
  :data:`MIN_LEARN_TOKENS` (the JSON envelope dominates them) and usage that does
  not report input tokens are ignored.

Settles are read on the settle thread while Decide runs on callers' threads or an
event loop: every method takes one short lock and does O(:data:`WINDOW_CALLS`) work.

No offline tokenizer is used: ``tiktoken`` downloads its BPE files at first use (its
wheel ships none), and Anthropic publishes no local tokenizer for its current
models, so the byte count corrected by what the provider reports is the estimate.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Final

__all__ = [
    "MARGIN",
    "MAX_FACTOR",
    "MIN_CALLS",
    "MIN_FACTOR",
    "MIN_LEARN_TOKENS",
    "WINDOW_CALLS",
    "Calibrator",
    "model_family",
    "reported_input_tokens",
]

MIN_FACTOR: Final = 0.5
MAX_FACTOR: Final = 1.5
# Added on top of the largest recent ratio: the corrected estimate errs high by up to this.
MARGIN: Final = 0.02
# Ratios kept per family: how long a denser request keeps the factor up.
WINDOW_CALLS: Final = 16
# Calls that must agree before the estimate is lowered.
MIN_CALLS: Final = 3
MIN_LEARN_TOKENS: Final = 64
# Families remembered; the least recently used beyond this are forgotten.
MAX_FAMILIES: Final = 256

# Cloud and router spellings of one model: a router's "anthropic/", Bedrock's "us.anthropic.",
# "-v1:0", Vertex's "@20250929", and a trailing release date ("-20250929", "-2024-08-06").
_PREFIX = re.compile(r"^(?:[a-z]{2,6}\.)?(?:anthropic|openai|meta|amazon|mistral|cohere)\.")
_SUFFIX = re.compile(r"(?:-v\d+(?::\d+)?|@[\w.-]+|-\d{8}|-\d{4}-\d{2}-\d{2}|-latest)+$")


def model_family(model: str) -> str:
    """The model name without cloud/router prefixes, version or date suffixes (lower case).

    ``us.anthropic.claude-sonnet-4-5-20250929-v1:0``, ``anthropic/claude-sonnet-4-5`` and
    ``claude-sonnet-4-5@20250929`` are all ``claude-sonnet-4-5``: one tokenizer.
    """
    name = _PREFIX.sub("", model.strip().lower().rsplit("/", 1)[-1])
    return _SUFFIX.sub("", name) or name


def reported_input_tokens(counts: Mapping[str, int], uncached: int, cache_read: int, cache_write: int) -> int:
    """All input tokens the provider reported: genai-prices' ``input_tokens`` when given, else the sum."""
    total = counts.get("input_tokens")
    return int(total) if total else uncached + cache_read + cache_write


class Calibrator:
    """Per-family correction factors of the input-token estimate, learned from settled usage.

    Keys are opaque strings (the wrappers use endpoint and :func:`model_family`).
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ratios: OrderedDict[str, deque[float]] = OrderedDict()

    def factor(self, key: str) -> float:
        """The factor applied to the raw estimate of a request under ``key`` (1.0 until learned)."""
        with self._lock:
            ratios = self._ratios.get(key)
            if not ratios:
                return 1.0
            factor = max(ratios) * (1 + MARGIN)
            count = len(ratios)
        if factor < 1.0 and count < MIN_CALLS:
            return 1.0
        return min(MAX_FACTOR, max(MIN_FACTOR, factor))

    def correct(self, key: str, raw_tokens: int) -> int:
        """``raw_tokens`` corrected for ``key``: ``ceil(raw x factor)``, never negative."""
        if raw_tokens <= 0:
            return max(0, raw_tokens)
        factor = self.factor(key)
        if factor == 1.0:
            return raw_tokens
        return math.ceil(raw_tokens * factor)

    def observe(self, key: str, raw_tokens: int, reported_tokens: int) -> None:
        """Learn that a request estimated at ``raw_tokens`` was billed ``reported_tokens`` input tokens."""
        if raw_tokens < MIN_LEARN_TOKENS or reported_tokens <= 0:
            return
        # Clamped before it is kept, so one absurd report cannot hold the factor at a bound longer.
        ratio = min(MAX_FACTOR, max(MIN_FACTOR * (1 - MARGIN), reported_tokens / raw_tokens))
        with self._lock:
            ratios = self._ratios.get(key)
            if ratios is None:
                ratios = self._ratios[key] = deque(maxlen=WINDOW_CALLS)
                while len(self._ratios) > MAX_FAMILIES:
                    self._ratios.popitem(last=False)
            else:
                self._ratios.move_to_end(key)
            ratios.append(ratio)
