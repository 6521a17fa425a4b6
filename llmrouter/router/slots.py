"""Open streams, counted globally (this router's capacity) and per device."""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import implementer

from llmrouter.protocol import ProtocolError
from llmrouter.router.interfaces import IStreamSlots

__all__ = ["StreamSlots"]


@implementer(IStreamSlots)
class StreamSlots:
    """A slot is released when its stream ends; per-device counts vanish at zero."""

    def __init__(self, max_streams: int, max_per_device: int) -> None:
        self.max_streams = max_streams
        self.max_per_device = max_per_device
        self.open = 0
        self._per_device: dict[bytes, int] = {}

    def acquire(self, device: bytes | None) -> Callable[[], None]:
        if self.open >= self.max_streams:
            raise ProtocolError("overloaded", "the router is at capacity, retry later")
        if device is not None and self._per_device.get(device, 0) >= self.max_per_device:
            raise ProtocolError("device_streams", "too many open streams for this device")
        self.open += 1
        if device is not None:
            self._per_device[device] = self._per_device.get(device, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            if device is not None:
                left = self._per_device[device] - 1
                if left:
                    self._per_device[device] = left
                else:
                    del self._per_device[device]

        return release
