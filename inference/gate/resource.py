"""The node's listeners with protocol v2: ``/v2/keys`` and ``/v2/chat`` in front of the rest.

With our engine the rest is the daemon's OpenAI-compatible API (routers that terminate v1.1
still use it); in front mode (``--front``) it is only ``/health`` (v2 can be served) and
``/metrics``. Errors are JSON, as everywhere else on the daemon.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web import server
from twisted.web.resource import Resource

from inference.gate.chat import Gate
from inference.guardrails import APIError
from inference.reply import error_response, json_response

__all__ = ["FrontAPI", "GateResource"]


class GateResource(Resource):
    """Routes ``/v2/*`` to the gate and everything else to ``inner``."""

    isLeaf = True

    def __init__(self, gate: Gate, inner: Resource) -> None:
        super().__init__()
        self._gate = gate
        self._inner = inner

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.rstrip(b"/")
        if path == b"/v2/keys":
            if request.method not in (b"GET", b"HEAD"):
                return error_response(request, APIError(405, "method_not_allowed", "Use GET."))
            return self._gate.render_keys(request)
        if path == b"/v2/chat":
            if request.method != b"POST":
                return error_response(request, APIError(405, "method_not_allowed", "Use POST."))
            return self._gate.render_chat(request)
        result: bytes | int = self._inner.render(request)
        return result


class FrontAPI(Resource):
    """What a fronting node serves besides ``/v2/*``: its health and its metrics."""

    isLeaf = True

    def __init__(self, ready: Callable[[], bool], metrics: Callable[[], bytes]) -> None:
        super().__init__()
        self._ready = ready
        self._metrics = metrics

    def render(self, request: server.Request) -> bytes:
        path = request.path.rstrip(b"/") or b"/"
        if path not in (b"/health", b"/metrics"):
            return error_response(request, APIError(404, "not_found", "No such endpoint."))
        if request.method not in (b"GET", b"HEAD"):
            return error_response(request, APIError(405, "method_not_allowed", "Use GET."))
        if path == b"/metrics":
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return self._metrics()
        if not self._ready():
            return json_response(request, 503, {"status": "unavailable"})
        return json_response(request, 200, {"status": "ok"})
