"""Server-Sent Events framing (WHATWG HTML, "server-sent events"), both directions.

The parser is incremental (bytes arrive in arbitrary pieces) and bounded: a line longer than
``max_line``, or an event whose ``data`` lines add up to more than ``max_event`` characters, is an
error rather than a buffer that grows with whatever a peer (or a proxy on the way) sends. The
work is linear in the bytes fed, however small the pieces: the buffer grows in place and the search
for a line end resumes where the last one stopped (``scanned`` counts the bytes it examined).
"""

from __future__ import annotations

__all__ = ["SSEError", "SSEParser", "format_event"]


class SSEError(ValueError):
    """The stream is not well-formed SSE (or exceeds the configured bounds)."""


def format_event(event: str | None, data: str) -> bytes:
    """One event; multi-line data becomes several ``data:`` lines, as the spec requires."""
    if event is not None and ("\n" in event or "\r" in event):
        raise SSEError("event names are single-line")
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in data.replace("\r\n", "\n").split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class SSEParser:
    """Feed bytes, get ``(event, data)`` pairs; ``event`` is ``"message"`` when unnamed."""

    def __init__(self, max_line: int = 1 << 20, max_event: int | None = None) -> None:
        self._max_line = max_line
        self._max_event = max_line if max_event is None else max_event
        self._buffer = bytearray()
        self._scan = 0  # no line end in the buffer before this offset
        self.scanned = 0  # bytes examined for line ends, for tests of the work done
        self._event = ""
        self._data: list[str] = []
        self._size = 0  # characters of data (and their newlines) in the event being built
        self._has_data = False

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer += chunk
        events: list[tuple[str, str]] = []
        start = 0
        while True:
            end, skip = self._line_end(start)
            if end < 0:
                break
            event = self._line(bytes(self._buffer[start:end]))
            if event is not None:
                events.append(event)
            start = self._scan = end + skip
        if start:
            del self._buffer[:start]  # amortised: bytearray drops a prefix without copying
            self._scan -= start
        if len(self._buffer) > self._max_line:
            raise SSEError("line too long")
        return events

    def _line_end(self, start: int) -> tuple[int, int]:
        """The next line end at or after ``start`` (and its length); the search starts where
        the last unsuccessful one stopped."""
        buffer = self._buffer
        scan = max(start, self._scan)
        lf = buffer.find(b"\n", scan)
        limit = len(buffer) if lf < 0 else lf
        cr = buffer.find(b"\r", scan, limit)
        self.scanned += 2 * (limit - scan) + (lf >= 0)  # both searches
        if cr < 0:
            if lf < 0:
                self._scan = len(buffer)
            return lf, 1
        if cr + 1 == len(buffer):
            self._scan = cr  # a lone CR at the end may be the first half of CRLF
            return -1, 0
        return cr, 2 if buffer[cr + 1] == 0x0A else 1

    def _line(self, raw: bytes) -> tuple[str, str] | None:
        if len(raw) > self._max_line:
            raise SSEError("line too long")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SSEError("stream is not UTF-8") from None
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._size += len(value) + 1
            if self._size > self._max_event:
                raise SSEError("event too long")
            self._data.append(value)
            self._has_data = True
        return None  # id, retry and unknown fields carry nothing for us

    def _dispatch(self) -> tuple[str, str] | None:
        event, data, has_data = self._event or "message", "\n".join(self._data), self._has_data
        self._event, self._data, self._has_data, self._size = "", [], False, 0
        return (event, data) if has_data else None
