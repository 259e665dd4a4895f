"""``spendgate migrate-keys``: move Redis records to the current key schema (store/keyspace.py).

Run it once when upgrading from a version whose keys were ``sg:{tenant:session}``,
``sg:{cfg:tenant}``, ``sg:{journal:tenant}`` and so on, with every server, worker and
console stopped. It is safe to run again: moved keys are no longer found.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from spendgate_server.errors import ConfigError
from spendgate_server.store.migrate import Moved, migrate_keyspace
from spendgate_server.store.redis import connect, redis_call

__all__ = ["add_migrate_arguments", "run_migrate_command"]


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``migrate-keys``."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SPENDGATE_REDIS_URL", ""),
        help="the Redis the servers use (env SPENDGATE_REDIS_URL)",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    parser.add_argument("--verbose", action="store_true", help="print every key moved")


async def _run(args: argparse.Namespace) -> int:
    if not args.redis_url:
        raise ConfigError("--redis-url (or SPENDGATE_REDIS_URL) is required")
    client = connect(args.redis_url, timeout_seconds=5, max_connections=4)
    try:
        # One wrapper around the whole run: any Redis failure is the one-line "store unreachable".
        report = await redis_call(migrate_keyspace(client, dry_run=args.dry_run))
    finally:
        await client.aclose()
    verb = "would move" if args.dry_run else "moved"
    for old, new, outcome in report.moves:
        if outcome is Moved.KEPT:
            print(f"kept {old}: {new} already exists (nothing overwritten; delete one of them by hand)")
        elif args.verbose:
            print(f"{verb} {old} -> {new}" if outcome is Moved.MOVED else f"gone {old}")
    for key in report.unknown:
        print(f"left {key}: not a spendgate record of either schema")
    print(
        f"{verb} {report.count(Moved.MOVED)} keys, kept {report.count(Moved.KEPT)} "
        f"whose new key exists, {len(report.unknown)} unknown"
    )
    return 0


def run_migrate_command(args: argparse.Namespace) -> int:
    """Run the migration; returns the exit code."""
    return asyncio.run(_run(args))
