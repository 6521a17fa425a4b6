"""The prompt-cache key the router hands to our inference backends: a keyed hash of the device.

An inference daemon keeps a finished conversation's KV cache for the next request that carries
the same ``X-LLMRouter-Cache-Key`` (docs/inference.md), so a device's next turn skips
re-processing the history. The key is HMAC-SHA256 of the device's public key under a key of its
own, random, held only in memory and replaced at every UTC midnight like the security log's
(:mod:`llmrouter.daykey`): it is neither the device key nor the security log's identifier
of the device, nobody on the private link can tell which device it belongs to, and an inference
node can link a device's requests for one day at most. A new key (midnight, a router restart)
costs each device one cache miss: a cached conversation lives minutes, not days. Several routers
sharing state (``STATE_URL``) derive the day's key from the key directory's shared
``state-hash.key`` instead (under :data:`CACHE_LABEL`, unrelated to the Redis names), or a
device would miss its cache whenever the balancer picks another router. Base-mode
requests carry no device identity and get no key, hence no reuse: a cache shared between users
would be a timing side channel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from llmrouter.daykey import DayKey

__all__ = ["CACHE_LABEL", "HEADER", "CacheKeys"]

HEADER = b"X-LLMRouter-Cache-Key"
CACHE_LABEL = b"llmrouter/cache/v1/"


class CacheKeys:
    """Derives per-device cache keys under ``key`` (the router's own, never the security
    log's); ``repr`` is redacted."""

    def __init__(self, key: DayKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "CacheKeys(<secret redacted>)"

    def headers(self, device: bytes | None) -> dict[bytes, list[bytes]]:
        """The header for a request from ``device`` (auth mode), none without a device."""
        if device is None:
            return {}
        digest = hmac.new(self._key.current(), device, hashlib.sha256).digest()
        return {HEADER: [base64.urlsafe_b64encode(digest).rstrip(b"=")]}
