"""Small request and response bodies of upstream HTTP calls, kept in memory and bounded."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, _HTTP11ClientFactory
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["MAX_PROBE_BODY", "BodyReader", "BytesProducer", "QuietClientFactory"]

MAX_PROBE_BODY = 1 << 16


class QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every upstream connection."""

    noisy = False


@implementer(IBodyProducer)
class BytesProducer:
    """Writes a small in-memory body at once (no cooperator, no copy to disk)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BodyReader(Protocol):
    """Reads (a bounded amount of) a body we do not need, then lets the connection go."""

    def __init__(self, limit: int = MAX_PROBE_BODY) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._data = b""
        self._limit = limit

    def connectionMade(self) -> None:
        if self._limit == 0:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if len(self._data) < self._limit:
            self._data += data[: self._limit - len(self._data)]
        else:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(self._data)
