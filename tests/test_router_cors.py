"""``CORS_ORIGINS``: browser pages from listed origins may call the router; nobody else gets CORS.

An in-process router on a real socket; the browser side (a page in headless Chromium chatting
through the TypeScript SDK) is ``clients/typescript/test/browser.test.ts``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from llmrouter.router.settings import SettingsError, load
from tests.router_support import error_of, http, post_json, start_fault_backend, start_router

APP = "https://app.example"
PREFLIGHT = {
    b"Origin": [APP.encode()],
    b"Access-Control-Request-Method": [b"POST"],
    b"Access-Control-Request-Headers": [b"content-type"],
}
CORS_HEADERS = (
    b"access-control-allow-origin",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
)


class CorsTests(TestCase):
    @defer.inlineCallbacks
    def router(self, **changes: Any) -> Any:
        _, backend = yield start_fault_backend(self)
        running = yield start_router(self, [backend], **changes)
        return running.url

    def assertNoCors(self, headers: Any) -> None:
        for name in CORS_HEADERS:
            self.assertFalse(headers.hasHeader(name), name)

    @defer.inlineCallbacks
    def test_off_by_default(self) -> Any:
        url = yield self.router()
        status, headers, _ = yield http(
            url, path="/api/pubkey", headers={b"Origin": [APP.encode()]}
        )
        self.assertEqual(status, 200)
        self.assertNoCors(headers)
        self.assertFalse(headers.hasHeader(b"vary"))
        status, headers, body = yield http(url, b"OPTIONS", "/api/chat", headers=PREFLIGHT)
        self.assertEqual((status, error_of(body)[0]), (405, "method_not_allowed"))
        self.assertNoCors(headers)

    @defer.inlineCallbacks
    def test_listed_origin(self) -> Any:
        url = yield self.router(cors_origins=(APP, "http://localhost:5173"))
        status, headers, body = yield http(url, b"OPTIONS", "/api/chat", headers=PREFLIGHT)
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [APP.encode()])
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-methods"), [b"GET, POST"])
        allowed = headers.getRawHeaders(b"access-control-allow-headers")[0].lower()
        self.assertIn(b"content-type", allowed)
        self.assertIn(b"x-llmrouter-pow", allowed)
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Origin"])

        status, headers, _ = yield http(
            url, path="/api/pubkey", headers={b"Origin": [APP.encode()]}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [APP.encode()])
        exposed = headers.getRawHeaders(b"access-control-expose-headers")
        self.assertEqual(exposed, [b"Retry-After, Date"])

        # refusals carry the headers too, so the page can read the error code
        status, headers, body = yield post_json(url, "/api/chat", {"v": 1})
        self.assertEqual(status, 400)
        self.assertNoCors(headers)  # no Origin: not a browser
        agent_headers = {b"Origin": [APP.encode()], b"Content-Type": [b"application/json"]}
        status, headers, body = yield http(url, b"POST", "/api/chat", b"{}", agent_headers)
        self.assertEqual((status, error_of(body)[0]), (400, "missing_field"))
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [APP.encode()])

    @defer.inlineCallbacks
    def test_other_origins_get_nothing(self) -> Any:
        url = yield self.router(cors_origins=(APP,))
        for origin in (b"https://evil.example", b"https://app.example.evil", b"null"):
            headers = {**PREFLIGHT, b"Origin": [origin]}
            status, answer, _ = yield http(url, b"OPTIONS", "/api/chat", headers=headers)
            self.assertEqual(status, 405)
            self.assertNoCors(answer)
            status, answer, _ = yield http(url, path="/api/pubkey", headers={b"Origin": [origin]})
            self.assertEqual(status, 200)
            self.assertNoCors(answer)
            self.assertEqual(answer.getRawHeaders(b"vary"), [b"Origin"])

    def test_setting_is_a_list_of_origins(self) -> None:
        s = load({"CORS_ORIGINS": "https://app.example, http://127.0.0.1:5173"})
        self.assertEqual(s.cors_origins, ("https://app.example", "http://127.0.0.1:5173"))
        for bad in ("*", "https://app.example/", "app.example", "https://a.example/path"):
            e = self.assertRaises(SettingsError, load, {"CORS_ORIGINS": bad})
            self.assertIn("CORS_ORIGINS", str(e))
