"""Integer money. Every amount is nano-USD (1 USD = 10**9); floats never touch a budget."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

__all__ = ["NANO_PER_USD", "format_usd", "usd_to_nano"]

NANO_PER_USD = 1_000_000_000


# An amount of 10**15 dollars or more is refused before any arithmetic: no limit or price is
# near it, and an exponent like 1e999999 would overflow the decimal context (even abs() does).
_MAX_USD_DIGITS = 15


def usd_to_nano(usd: Decimal) -> int:
    """Convert dollars to nano-USD, rounding up so a limit is never read as looser than written.

    Raises:
        ValueError: for NaN, infinity, or a magnitude of 10**15 dollars or more (the caller
            names its own bound).
    """
    if not usd.is_finite():
        raise ValueError(f"not a finite amount: {usd}")
    # adjusted() is the exponent of the leading digit: no arithmetic, so nothing can overflow.
    if usd and usd.adjusted() >= _MAX_USD_DIGITS:
        raise ValueError(f"amount out of range: {usd}")
    return int((usd * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def format_usd(nano_usd: int) -> str:
    """Render nano-USD for people: ``$0.000123``, with up to six decimals."""
    sign = "-" if nano_usd < 0 else ""
    dollars, rest = divmod(abs(nano_usd), NANO_PER_USD)
    micro = rest // 1000
    return f"{sign}${dollars}.{micro:06d}".rstrip("0").rstrip(".") if micro else f"{sign}${dollars}"
