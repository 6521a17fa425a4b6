"""``llmrouter-keys``: the operator's key command, usable while the router runs.

    llmrouter-keys --keys-dir DIR init          create the directory (if needed), print the pin
    llmrouter-keys --keys-dir DIR list          keys, statuses, validity, public fingerprints
    llmrouter-keys --keys-dir DIR rotate        rotate now (the old key keeps its overlap window)
    llmrouter-keys --keys-dir DIR revoke KID    destroy a key at once

Every change is made under the key directory's lock, starting from the state on disk, so it is
safe next to a running router; the router picks it up within 2 s (it polls ``state.json``) or at
once on SIGHUP. The rotation and overlap settings are the router's, as recorded in the state file.
Nothing secret is ever printed: keys are shown by public-key fingerprint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from twisted.internet.task import Clock

from llmrouter.protocol import b64u_encode, key_id_for_kid
from llmrouter.router.keys import KeyStore, KeyStoreError
from llmrouter.router.secmem import harden_process

__all__ = ["main"]

PROG = "llmrouter-keys"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the llmrouter key directory (safe while the router runs).",
        epilog=(
            "A running router picks changes up within 2 s, or at once on SIGHUP. Run this as "
            "the router's user: key files owned by anyone else are refused."
        ),
    )
    parser.add_argument(
        "--keys-dir",
        type=Path,
        default=Path(os.environ.get("KEYS_DIR") or "./dev-keys"),
        help="key directory (default: $KEYS_DIR or ./dev-keys)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("init", help="create the key directory if needed; print the signing key")
    commands.add_parser("list", help="list keys (never prints secret bytes)")
    commands.add_parser("rotate", help="rotate now: next becomes current, a new next is made")
    revoke = commands.add_parser("revoke", help="destroy a key at once")
    revoke.add_argument("kid", metavar="KID", help="key id, two lowercase hex digits")
    return parser


def _wall_clock() -> Clock:
    """The store only reads the time outside ``start()``; no reactor is needed for that."""
    clock = Clock()
    clock.advance(time.time())
    return clock


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(store: KeyStore, out: TextIO) -> None:
    print(f"key directory: {store.directory}", file=out)
    print(
        f"signing key (clients pin this): {b64u_encode(bytes(store.signing_key.verify_key))}",
        file=out,
    )
    print(
        f"rotation every {store.rotation_seconds} s, overlap {store.overlap_seconds} s",
        file=out,
    )
    print(f"{'KID':<4} {'STATUS':<8} {'NOT_BEFORE':<20} {'NOT_AFTER':<20} FINGERPRINT", file=out)
    for key in store.keys():
        print(
            f"{key.kid:<4} {key.status:<8} {_when(key.not_before):<20} "
            f"{_when(key.not_after):<20} {key.fingerprint}",
            file=out,
        )


def run(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    """The command without process hardening (for tests that call it in-process)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help: argparse has printed what to say
        return e.code if isinstance(e.code, int) else 2
    command: str = args.command
    try:
        if command == "revoke":
            try:
                key_id_for_kid(args.kid)
            except ValueError:
                print(f"{PROG}: error: KID must be two lowercase hex digits", file=err)
                return 2
        store = KeyStore.open(
            args.keys_dir,
            _wall_clock(),
            rotation_seconds=None,
            overlap_seconds=None,
            create=command == "init",
        )
        try:
            if command == "rotate":
                before = store.current.kid
                store.rotate()
                print(
                    f"rotated: {store.current.kid} is current (was {before}), "
                    f"{store.next.kid} is next; {before} stays accepted for "
                    f"{store.overlap_seconds} s",
                    file=out,
                )
            elif command == "revoke":
                store.revoke(args.kid)
                print(
                    f"revoked {args.kid}; current is {store.current.kid}, next is {store.next.kid}",
                    file=out,
                )
            else:
                _list(store, out)
        finally:
            store.close()
    except KeyStoreError as e:
        print(f"{PROG}: error: {e}", file=err)
        return 1
    return 0


def main(argv: list[str] | None = None, harden: bool = True) -> int:
    """Console script entry point. ``harden`` keeps secrets out of core dumps (tests may skip
    it to leave the test runner's process as it was)."""
    if harden:
        harden_process()
    return run(argv, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
