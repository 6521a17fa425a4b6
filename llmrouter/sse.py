"""Server-Sent Events framing (WHATWG HTML, "server-sent events"), both directions.

The parser is incremental (bytes arrive in arbitrary pieces) and bounded: a line longer than
``max_line``, or an event whose ``data`` lines add up to more than ``max_event`` characters, is an
error rather than a buffer that grows with whatever a peer (or a proxy on the way) sends.
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
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._size = 0  # characters of data (and their newlines) in the event being built
        self._has_data = False

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer += chunk
        events: list[tuple[str, str]] = []
        while True:
            end, skip = self._line_end()
            if end < 0:
                break
            raw, self._buffer = self._buffer[:end], self._buffer[end + skip :]
            event = self._line(raw)
            if event is not None:
                events.append(event)
        if len(self._buffer) > self._max_line:
            raise SSEError("line too long")
        return events

    def _line_end(self) -> tuple[int, int]:
        cr, lf = self._buffer.find(b"\r"), self._buffer.find(b"\n")
        if cr < 0:
            return lf, 1
        if lf >= 0 and lf < cr:
            return lf, 1
        if cr + 1 == len(self._buffer):
            return -1, 0  # a lone CR at the end may be the first half of CRLF
        return cr, 2 if self._buffer[cr + 1 : cr + 2] == b"\n" else 1

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
