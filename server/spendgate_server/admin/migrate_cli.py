"""``spendgate migrate-keys``: move Redis records to the current key schema (store/keyspace.py).

Run it once when upgrading from a version whose keys were ``sg:{tenant:session}``,
``sg:{cfg:tenant}``, ``sg:{journal:tenant}`` and so on, with every server, worker and
console stopped. It is safe to run again: moved keys are no longer found.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from spendgate_server.errors import ConfigError
from spendgate_server.store.migrate import Moved, migrate_keyspace
from spendgate_server.store.redis import RedisClient, redis_call

__all__ = ["RedisOpener", "add_migrate_arguments", "run_migrate_command"]


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``migrate-keys``."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SPENDGATE_REDIS_URL", ""),
        help="the Redis the servers use (env SPENDGATE_REDIS_URL)",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    parser.add_argument("--verbose", action="store_true", help="print every key moved")


RedisOpener = Callable[[str], AbstractAsyncContextManager[RedisClient]]
"""Opens a client of the Redis at a URL; the composition root (stores.py) gives it."""


async def _run(args: argparse.Namespace, open_redis: RedisOpener) -> int:
    if not args.redis_url:
        raise ConfigError("--redis-url (or SPENDGATE_REDIS_URL) is required")
    async with open_redis(args.redis_url) as client:
        # One wrapper around the whole run: any Redis failure is the one-line "store unreachable".
        report = await redis_call(migrate_keyspace(client, dry_run=args.dry_run))
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


def run_migrate_command(args: argparse.Namespace, open_redis: RedisOpener) -> int:
    """Run the migration on the client ``open_redis`` opens; returns the exit code."""
    return asyncio.run(_run(args, open_redis))
