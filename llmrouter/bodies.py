"""Request bodies kept in memory and bounded: a prompt is never spooled to a temporary file.

Twisted's :class:`~twisted.web.server.Request` writes any body of 100,000 bytes or more (and any
chunked body) to ``tempfile.TemporaryFile()``, i.e. onto the disk of whatever host runs the
server: the router's plaintext-forwarding backends and the local proxy get whole conversations.
:class:`InMemoryRequest` keeps the body in a ``BytesIO`` and answers a body over the site's
``max_body`` with 413 as soon as it is announced (``Content-Length``) or exceeded (chunked), then
closes the connection; nothing more of it is read into memory.

The site provides ``max_body`` (bytes) and ``too_large_body()`` (the JSON body of that 413 answer,
in the site's own error format).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Protocol, cast

from twisted.web import server

__all__ = ["BoundedSite", "InMemoryRequest"]


class BoundedSite(Protocol):
    """What :class:`InMemoryRequest` needs from its site."""

    max_body: int

    def too_large_body(self) -> bytes: ...


class InMemoryRequest(server.Request):
    """Keeps request bodies in memory (never a temp file) and refuses oversized ones early."""

    _too_large = False
    _received = 0

    def _site(self) -> BoundedSite:
        return cast(BoundedSite, cast(Any, self.channel).site)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self._site().max_body:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self._site().max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._too_large = True
        self.content = BytesIO()
        body = self._site().too_large_body()
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        transport.loseConnection()

    def process(self) -> None:
        if not self._too_large:
            super().process()
