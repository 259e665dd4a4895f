"""``spendgate keys create|list|revoke``: manage API keys directly in the key store.

Keys are managed against the store, not over RPC, so the first admin key can be made
before any key exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from spendgate_server.errors import ConfigError
from spendgate_server.store.keys import KeyStore, Scope, generate_key, new_key

__all__ = ["FIRST_KEY_WARNING", "KeyStoreOpener", "add_keys_arguments", "run_keys_command"]

FIRST_KEY_WARNING = (
    "spendgate: warning: this is the first key in this key store: servers that start from now on "
    "require a key on every call; a server already running in open development mode stays open "
    "until it is restarted"
)


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``keys create|list|generate|revoke``."""
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="mint a key; it is printed once and never stored")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--scope", choices=[s.value for s in Scope], default="client")
    create.add_argument("--name", required=True, help="who or what uses it (shown in audit logs)")
    actions.add_parser("list", help="list keys (ids, tenants, scopes; never secrets)")
    actions.add_parser(
        "generate", help="print a new key without storing it (for serve --admin-key-file, e.g. in a Secret)"
    )
    revoke = actions.add_parser("revoke", help="revoke a key; servers refuse it within --key-reload-seconds")
    revoke.add_argument("key_id", help="the 8 hex digits after 'sgk_'")
    for verb, action in actions.choices.items():
        if verb == "generate":
            continue
        action.add_argument(
            "--redis-url",
            default=os.environ.get("SPENDGATE_REDIS_URL", ""),
            help="the Redis the servers use (env SPENDGATE_REDIS_URL)",
        )
        action.add_argument(
            "--keys-file",
            default=os.environ.get("SPENDGATE_KEYS_FILE", ""),
            help="or the keys file of a memory-store server (env SPENDGATE_KEYS_FILE)",
        )


KeyStoreOpener = Callable[[str, str], AbstractAsyncContextManager[KeyStore]]
"""Opens the key store of ``(redis_url, keys_file)``; the composition root (stores.py) gives it."""


async def _run(args: argparse.Namespace, open_keystore: KeyStoreOpener) -> int:
    if bool(args.redis_url) == bool(args.keys_file):
        raise ConfigError("give exactly one of --redis-url (redis store) or --keys-file (memory store)")
    now_ms = time.time_ns() // 1_000_000
    async with open_keystore(args.redis_url, args.keys_file) as store:
        if args.action == "create":
            full, record = new_key(args.tenant, Scope(args.scope), args.name, now_ms)
            first = not await store.all()
            await store.add(record)
            print(full)
            print(
                f"# key {record.key_id}: tenant {record.tenant}, scope {record.scope.value}, "
                "shown once: store it now (send it as 'authorization: Bearer <key>')"
            )
            if first:
                print(FIRST_KEY_WARNING, file=sys.stderr)
        elif args.action == "list":
            keys = sorted((await store.all()).values(), key=lambda k: k.created_ms)
            for key in keys:
                created = datetime.fromtimestamp(key.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
                state = "active" if key.active else "revoked"
                print(f"{key.key_id}  {key.tenant:<20} {key.scope.value:<6} {state:<7} {created}  {key.name}")
            if not keys:
                print("no keys: servers on loopback run in open development mode")
        else:
            revoked = await store.revoke(args.key_id, now_ms)
            print(f"revoked {revoked.key_id} ({revoked.tenant}, {revoked.name})")
    return 0


def run_keys_command(args: argparse.Namespace, open_keystore: KeyStoreOpener) -> int:
    """Run one keys action on the store ``open_keystore`` opens; returns the exit code."""
    if args.action == "generate":
        print(generate_key())
        return 0
    return asyncio.run(_run(args, open_keystore))
