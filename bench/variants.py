"""Tuning experiments: run ``spendgate serve`` with bench-only changes (levers), never editing server/.

``python -m bench.variants LEVERS serve ...`` applies the comma-separated levers,
then runs the spendgate CLI. Patches are applied at import, so ``--workers``
children (spawned, which re-import this module as ``__mp_main__``) get them too;
the lever names travel to them in SG_BENCH_LEVERS.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["LEVERS", "apply"]

LEVERS: dict[str, Callable[[], None]] = {}


def apply(names: str) -> None:
    """Apply the named levers (comma-separated; "" or "baseline" is none)."""
    for name in [n.strip() for n in names.split(",") if n.strip() and n.strip() != "baseline"]:
        if name not in LEVERS:
            raise SystemExit(f"bench.variants: unknown lever {name!r}; known: {', '.join(sorted(LEVERS))}")
        LEVERS[name]()


if __name__ == "__main__":
    os.environ["SG_BENCH_LEVERS"] = sys.argv[1]
    apply(sys.argv[1])
    from spendgate_server.cli import main

    main(sys.argv[2:])
elif __name__ == "__mp_main__":  # a --workers child re-importing the parent's main module
    apply(os.environ.get("SG_BENCH_LEVERS", ""))
