"""``llmrouter-keys``: the operator's key command, usable while the router runs.

    llmrouter-keys --keys-dir DIR init          create the directory (if needed), print the pin
    llmrouter-keys --keys-dir DIR list          keys, statuses, validity, public fingerprints
    llmrouter-keys --keys-dir DIR pin           the signing public key alone (what apps pin)
    llmrouter-keys --keys-dir DIR rotate        rotate now (the old key keeps its overlap window)
    llmrouter-keys --keys-dir DIR revoke KID    destroy a key at once
    llmrouter-keys backup-create FILE           a backup signing key for offline storage; its pin
    llmrouter-keys backup-pin FILE              the pin of a signing key file (backup or copy)
    llmrouter-keys --keys-dir DIR backup-switch FILE
                                                make the backup the signing key (HPKE keys stay)

Protocol v2's operator key (kept offline, never on a router host; apps pin it):

    llmrouter-keys operator-init FILE           create the operator key (0600); print its pin
    llmrouter-keys operator-pin FILE            the operator pin (what v2 apps pin)
    llmrouter-keys operator-certify FILE --type router|node --name NAME --key PIN
                   [--model M]... [--days D]    print the certificate of a router's or node's
                                                signing key (its ``llmrouter-keys pin``)

Every change is made under the key directory's lock, starting from the state on disk, so it is
safe next to a running router; the router picks it up within 2 s (it polls ``state.json``) or at
once on SIGHUP. The rotation and overlap settings are the router's, as recorded in the state file.
Nothing secret is ever printed: keys are shown by public-key fingerprint, signing keys by their
public key (the pin).

Run it as the router's user (``runuser -u llmrouter -- llmrouter-keys ...``): the router refuses
key files it does not own, so as root this tool refuses to create a key directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import nacl.signing
from twisted.internet.task import Clock

from llmrouter.keystore import SECRET_BYTES, KeyStore, KeyStoreError
from llmrouter.pinarg import pins_attached
from llmrouter.protocol import ProtocolError, b64u_decode, b64u_encode, key_id_for_kid
from llmrouter.secmem import harden_process
from llmrouter.v2 import certs as v2certs

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
    commands.add_parser("pin", help="print the signing public key (what apps pin), alone")
    commands.add_parser("rotate", help="rotate now: next becomes current, a new next is made")
    revoke = commands.add_parser("revoke", help="destroy a key at once")
    revoke.add_argument("kid", metavar="KID", help="key id, two lowercase hex digits")
    for name, text in (
        (
            "backup-create",
            "write a new backup signing key to FILE (keep it offline); print its pin",
        ),
        ("backup-pin", "print the pin (public key) of the signing key in FILE (- for stdin)"),
        ("backup-switch", "make the signing key in FILE (- for stdin) the router's signing key"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("file", metavar="FILE", type=Path)
    for name, text in (
        ("operator-init", "write a new operator key to FILE (keep it offline); print its pin"),
        ("operator-pin", "print the operator pin (what v2 apps pin) of the key in FILE"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("file", metavar="FILE", type=Path)
    certify = commands.add_parser(
        "operator-certify",
        help="print the operator's certificate (JSON) of a router's or node's signing key",
        description="Sign, with the operator key in FILE, a certificate of the signing key PIN"
        " (`llmrouter-keys --keys-dir DIR pin` on that host prints it); install the JSON it"
        " prints as router.cert or node.cert in that host's key directory.",
    )
    certify.add_argument("file", metavar="OPERATOR_FILE", type=Path)
    certify.add_argument("--type", required=True, choices=("router", "node"))
    certify.add_argument("--name", required=True, help="[a-z0-9][a-z0-9.-]{0,62}, unique")
    certify.add_argument("--key", required=True, metavar="PIN", help="the signing key, base64url")
    certify.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="M",
        help="a model the node serves (repeat; 1 to 64 for a node, none for a router)",
    )
    certify.add_argument(
        "--days",
        type=int,
        default=v2certs.DEFAULT_VALIDITY_DAYS,
        help=f"validity in days from now (default {v2certs.DEFAULT_VALIDITY_DAYS}, at most 366)",
    )
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


def _is_node_directory(directory: Path) -> bool:
    """An inference node's key directory (``twistd inference --keys-dir``): one that exists
    without the router's proof-of-work key, which a router creates on its first start."""
    return (directory / "state.json").exists() and not (directory / "pow.key").exists()


def _pin(seed: bytes) -> str:
    return b64u_encode(bytes(nacl.signing.SigningKey(seed).verify_key))


def _read_seed(path: Path) -> bytes:
    """A signing key file: the 32-byte Ed25519 seed, as in the key directory's signing.key.
    ``-`` reads standard input, so root can hand a root-only backup file to this tool running
    as the router's user (``runuser ... backup-switch - < FILE``)."""
    try:
        seed = sys.stdin.buffer.read(SECRET_BYTES + 1) if str(path) == "-" else path.read_bytes()
    except OSError as e:
        raise KeyStoreError(f"cannot read {path}: {e.strerror}") from None
    if len(seed) != SECRET_BYTES:
        raise KeyStoreError(f"{path} is not a signing key file ({SECRET_BYTES} bytes)")
    return seed


def _create_key_file(path: Path) -> bytes:
    """A new Ed25519 seed in a new 0600 file (never an existing file, never through a link)."""
    seed = os.urandom(SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyStoreError(f"{path} exists; refusing to overwrite a signing key") from None
    except OSError as e:
        raise KeyStoreError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(seed)
        handle.flush()
        os.fsync(handle.fileno())
    return seed


def _backup_create(path: Path, out: TextIO) -> None:
    seed = _create_key_file(path)
    print(
        f"backup signing key written to {path} (0600): keep it offline, never on a server", file=out
    )
    print(f"backup pin (apps pin it next to the current one): {_pin(seed)}", file=out)


def _operator_init(path: Path, out: TextIO) -> None:
    seed = _create_key_file(path)
    print(
        f"operator key written to {path} (0600): keep it offline, never on a router host",
        file=out,
    )
    print(f"operator pin (v2 apps pin it): {_pin(seed)}", file=out)


def _operator_certify(args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    """The certificate JSON to stdout (install it as router.cert or node.cert), a summary to
    stderr."""
    try:
        key = b64u_decode(args.key, "key", 32)
    except ProtocolError:
        raise KeyStoreError("--key must be a signing key's pin (43 base64url characters)") from None
    if not 1 <= args.days <= v2certs.MAX_VALIDITY // 86400:
        raise KeyStoreError("--days must be 1 to 366")
    now = int(time.time())
    try:
        certificate = v2certs.issue_certificate(
            _read_seed(args.file),
            type=args.type,
            name=args.name,
            key=key,
            models=args.model,
            not_before=now,
            not_after=now + args.days * 86400,
        )
    except v2certs.CertificateError as e:
        raise KeyStoreError(str(e)) from None
    print(json.dumps(certificate), file=out)
    models = f" for {', '.join(args.model)}" if args.model else ""
    print(
        f"{PROG}: certified {args.type} {args.name}{models} until {_when(now + args.days * 86400)}"
        f" (install it as {args.type}.cert in its key directory)",
        file=err,
    )


def run(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    """The command without process hardening (for tests that call it in-process)."""
    try:
        args = _parser().parse_args(
            pins_attached(sys.argv[1:] if argv is None else argv, ["--key"])
        )
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
        if command == "backup-create":
            _backup_create(args.file, out)
            return 0
        if command in ("backup-pin", "operator-pin"):
            print(_pin(_read_seed(args.file)), file=out)
            return 0
        if command == "operator-init":
            _operator_init(args.file, out)
            return 0
        if command == "operator-certify":
            _operator_certify(args, out, err)
            return 0
        if command == "init" and os.geteuid() == 0 and not args.keys_dir.exists():
            raise KeyStoreError(
                f"refusing to create {args.keys_dir} as root: the router (user llmrouter) "
                "refuses key files it does not own. Start the router once (it creates its "
                f"keys), or run: runuser -u llmrouter -- {PROG} --keys-dir {args.keys_dir} init"
            )
        store = KeyStore.open(
            args.keys_dir,
            _wall_clock(),
            rotation_seconds=None,
            overlap_seconds=None,
            create=command == "init",
            node=_is_node_directory(args.keys_dir),
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
            elif command == "pin":
                print(b64u_encode(bytes(store.signing_key.verify_key)), file=out)
            elif command == "backup-switch":
                before = b64u_encode(bytes(store.signing_key.verify_key))
                after = b64u_encode(store.replace_signing_key(_read_seed(args.file)))
                print(
                    f"signing key replaced: the pin is now {after} (was {before}); apps that "
                    "pin only the old key refuse this router until they are updated",
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
