"""The prompt-cache key the router hands to inference backends: a keyed hash of the device.

An inference daemon keeps a finished conversation's KV cache for the next request that carries
the same ``X-LLMRouter-Cache-Key`` (docs/inference.md), so a device's next turn skips
re-processing the history. The key is HMAC-SHA256 of the device's public key under a secret
derived, with a label of its own, from the router's long-lived log hash key: it is neither the
device key nor the security log's identifier of the device, and without the router's secret
nobody on the private link can tell which device it belongs to. Base-mode requests carry no
device identity and get no key, hence no reuse: a cache shared between users would be a timing
side channel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["HEADER", "CacheKeys"]

HEADER = b"X-LLMRouter-Cache-Key"
_LABEL = b"llmrouter prompt-cache key v1"


class CacheKeys:
    """Derives per-device cache keys; holds a secret, so its ``repr`` is redacted."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _LABEL, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "CacheKeys(<secret redacted>)"

    def headers(self, device: bytes | None) -> dict[bytes, list[bytes]]:
        """The header for a request from ``device`` (auth mode), none without a device."""
        if device is None:
            return {}
        digest = hmac.new(self._key, device, hashlib.sha256).digest()
        return {HEADER: [base64.urlsafe_b64encode(digest).rstrip(b"=")]}
