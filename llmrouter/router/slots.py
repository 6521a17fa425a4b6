"""Open streams: on this router (its capacity) and per device (in this process's memory)."""

from __future__ import annotations

from collections.abc import Callable

from llmrouter.protocol import ProtocolError

__all__ = ["DeviceStreams", "StreamSlots"]


def _once(release: Callable[[], None]) -> Callable[[], None]:
    released = False

    def once() -> None:
        nonlocal released
        if not released:
            released = True
            release()

    return once


class StreamSlots:
    """This router's streams; a slot is released when its stream ends."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.open = 0

    def acquire(self) -> Callable[[], None]:
        if self.open >= self.max_streams:
            raise ProtocolError("overloaded", "the router is at capacity, retry later")
        self.open += 1

        def release() -> None:
            self.open -= 1

        return _once(release)


class DeviceStreams:
    """Per-device counts; a device's count vanishes at zero, so memory follows open streams."""

    def __init__(self, max_per_device: int) -> None:
        self.max_per_device = max_per_device
        self._open: dict[bytes, int] = {}

    def acquire(self, device: bytes) -> Callable[[], None] | None:
        key = bytes(device)
        if self._open.get(key, 0) >= self.max_per_device:
            return None
        self._open[key] = self._open.get(key, 0) + 1

        def release() -> None:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]

        return _once(release)
