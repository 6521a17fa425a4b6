"""Is swap on? Memory that holds prompts (the router's, an inference node's) must never be
written to a swap device: a disk keeps what it was given, and an admin who reads disks could read
conversations from it. zram swap is compressed RAM, never a disk, and is allowed
(docs/deployment.md, section 10)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SWAP_HINT", "swap_devices"]

SWAP_HINT = (
    "swapoff -a, remove the swap lines from /etc/fstab and systemctl mask swap.target"
    " (docs/deployment.md, section 10)"
)


def swap_devices(swaps: Path = Path("/proc/swaps")) -> list[str]:
    """The swap devices in use, but zram; none where the kernel says nothing."""
    try:
        lines = swaps.read_text().splitlines()[1:]  # the first line names the columns
    except OSError:
        return []
    devices = [line.split()[0] for line in lines if line.strip()]
    return [d for d in devices if not d.startswith("/dev/zram")]
