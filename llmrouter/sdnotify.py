"""systemd's readiness protocol (``sd_notify(3)``): one datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd counts a service as started only once it sends ``READY=1``: a
daemon that dies before then (a model that does not load, a start-up self-test that fails or
crashes) is a failed start, so ``Restart=`` backs off and nothing is told it is up. Outside
systemd (no ``NOTIFY_SOCKET``) it does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``READY=1``, ``STATUS=...``, ``STOPPING=1``; newline-separated) to the
    service manager; False where there is none. Never blocks: systemd reads its socket."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(state.encode("utf-8"), address)
        except OSError:
            return False
    return True
