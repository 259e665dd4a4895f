"""Sign-in throttle: failed sign-ins from one client address slow that address down.

API keys carry 256 random bits, so the throttle is not what keeps them from being
guessed; it keeps a client that posts key after key from turning each into a call to
the service. The first ``free_failures - 1`` failures cost nothing; the next makes the
address wait ``base_delay_seconds`` before its next attempt is even checked, and each
failure after that doubles the wait, up to ``max_delay_seconds``. A
successful sign-in, or ``forget_after_seconds`` without a failure, clears the address.
At most ``max_addresses`` are remembered (the least recently failed forgotten first).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SignInThrottle"]


@dataclass(slots=True)
class _Failures:
    count: int
    last_seconds: float


class SignInThrottle:
    """Exponential backoff of failed sign-ins per client address.

    Args:
        free_failures: attempts that may fail in a row before the address has to wait.
        base_delay_seconds: the wait after the first failure beyond the free ones.
        max_delay_seconds: the longest wait.
        forget_after_seconds: an address with no failure for this long starts afresh.
        max_addresses: addresses remembered at once.
        clock: seconds (monotonic); tests pass a fake one.
    """

    def __init__(
        self,
        *,
        free_failures: int = 5,
        base_delay_seconds: float = 1.0,
        max_delay_seconds: float = 300.0,
        forget_after_seconds: float = 3600.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = free_failures
        self._base = base_delay_seconds
        self._max = max_delay_seconds
        self._forget = forget_after_seconds
        self._max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def _delay(self, count: int) -> float:
        if count < self._free:
            return 0.0
        return min(self._max, self._base * float(2 ** min(count - self._free, 64)))

    def retry_after_seconds(self, address: str) -> int:
        """Whole seconds ``address`` must wait before its next attempt is checked; 0: now."""
        failures = self._failures.get(address)
        if failures is None:
            return 0
        now = self._clock()
        if now - failures.last_seconds >= self._forget:
            del self._failures[address]
            return 0
        wait = failures.last_seconds + self._delay(failures.count) - now
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, address: str) -> None:
        """Count a failed sign-in from ``address``."""
        failures = self._failures.pop(address, None)
        count = failures.count + 1 if failures is not None else 1
        self._failures[address] = _Failures(count, self._clock())
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """Forget ``address``'s failures."""
        self._failures.pop(address, None)

    def tracked(self) -> int:
        """Addresses with failures remembered."""
        return len(self._failures)
