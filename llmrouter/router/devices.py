"""New-device admission: which device keys have already paid for their first request.

A device key costs nothing to mint, so each per-device limit (rate, budget, open streams) is
only as strong as the cost of a new key. Admission asks a proof of work the first time it sees a
key (``NEW_DEVICE_POW_DIFFICULTY``) and limits new devices per address bucket
(``NEW_DEVICES_PER_HOUR``); this table remembers the keys that passed.

Why an LRU that forgets rather than refuses: a forgotten device only solves one more proof of
work on its next request, so a full table costs a little work, never a lockout. Memory is
bounded by ``max_devices`` (about 150 bytes a key).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["KnownDevices"]


class KnownDevices:
    def __init__(self, max_devices: int = 1_000_000) -> None:
        if max_devices < 1:
            raise ValueError("max_devices must be at least 1")
        self.max_devices = max_devices
        self._devices: OrderedDict[bytes, None] = OrderedDict()
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._devices)

    def __repr__(self) -> str:
        return f"KnownDevices({len(self._devices)}/{self.max_devices})"

    def known(self, device: bytes) -> bool:
        key = bytes(device)
        if key not in self._devices:
            return False
        self._devices.move_to_end(key)
        return True

    def remember(self, device: bytes) -> None:
        key = bytes(device)
        if key in self._devices:
            self._devices.move_to_end(key)
            return
        if len(self._devices) >= self.max_devices:
            self._devices.popitem(last=False)
            self.forgotten += 1
        self._devices[key] = None
