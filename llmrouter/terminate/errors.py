"""Why an upstream attempt failed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["UpstreamError"]


class UpstreamError(Exception):
    """Why an upstream attempt failed; ``retryable`` is false when another backend won't help."""

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = True,
        breaker: bool = True,
        detail: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.breaker = breaker  # count against the backend's circuit breaker
        self.detail = detail  # extra fields of the plain JSON error (never request data)
