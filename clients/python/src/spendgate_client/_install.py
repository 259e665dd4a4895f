"""What to install for an optional feature: the requirement behind one of the client's extras."""

from __future__ import annotations

import importlib.metadata
import re

__all__ = ["extra_requirement"]

# Used when the distribution's metadata cannot be read (e.g. the sources run from a checkout).
_FALLBACK = {"anthropic": "anthropic", "openai": "openai", "re2": "google-re2"}


def extra_requirement(extra: str) -> str:
    """The requirement the ``extra`` of spendgate-client adds, e.g. ``anthropic>=0.40``.

    A plain requirement on a package index, so ``pip install '<it>'`` always works; the
    extra itself (``spendgate-client[anthropic]``) installs only where spendgate-client
    itself can be found (a wheel from ``make dist``, not a package index).
    """
    try:
        requires = importlib.metadata.requires("spendgate-client") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            return spec.strip()
    return _FALLBACK.get(extra, extra)
