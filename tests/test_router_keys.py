"""Key rotation as the router sees it: overlap window, expiry, revocation, reload from disk.

In-process router with a fake clock (the key store's rotation timer and 2 s poll run on it) on a
real loopback port; real HPKE requests sealed to old and new keys.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from llmrouter.keystore import KeyStore
from tests.router_support import (
    Script,
    error_of,
    key_document,
    metric_value,
    post_chat,
    prompt,
    sealed,
    start_fault_backend,
    start_router,
)

HOUR = 3600


def operator_store(running: Any) -> KeyStore:
    """The key directory as `llmrouter-keys` opens it from another process."""
    return KeyStore.open(
        running.router.settings.keys_dir,
        running.router.clock,
        rotation_seconds=None,
        overlap_seconds=None,
        create=False,
    )


class RotationTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def router(self, **changes: Any) -> Any:
        _, url = yield start_fault_backend(self, Script(tokens=2))
        running = yield start_router(
            self, [url], key_rotation_hours=1, key_overlap_seconds=600, **changes
        )
        return running

    @defer.inlineCallbacks
    def status_for(self, running: Any, key: Any) -> Any:
        body, _, _ = yield sealed(running, key=key)
        status, _, raw = yield post_chat(running.url, body)
        return status, (error_of(raw)[0] if status != 200 else None)

    @defer.inlineCallbacks
    def test_overlap_window_then_expiry(self) -> Any:
        running = yield self.router()
        clock = running.router.clock
        before = yield key_document(running.url, running.router.clock.seconds())
        old = before.current()
        upcoming = next(k for k in before.keys if k.status == "next")
        clock.advance(HOUR)  # the rotation timer fires
        after = yield key_document(running.url, running.router.clock.seconds())
        self.assertEqual(after.current().kid, upcoming.kid)
        self.assertNotIn(old.kid, {k.kid for k in after.keys})  # no longer published...
        result = yield self.status_for(running, old)
        self.assertEqual(result, (200, None))  # ...but accepted during the overlap
        clock.advance(599)
        result = yield self.status_for(running, old)
        self.assertEqual(result, (200, None))
        clock.advance(2)
        result = yield self.status_for(running, old)
        self.assertEqual(result, (400, "key_unknown"))
        result = yield self.status_for(running, after.current())
        self.assertEqual(result, (200, None))
        metrics = running.router.metrics.render().decode()
        self.assertEqual(metric_value(metrics, "llmrouter_key_rotations_total"), 1)
        self.assertEqual(metric_value(metrics, "llmrouter_current_key_age_seconds"), 601)

    @defer.inlineCallbacks
    def test_client_refetches_keys_once_on_key_unknown(self) -> Any:
        running = yield self.router()
        client = running.client()
        yield defer.Deferred.fromCoroutine(client.fetch_keys())
        running.router.clock.advance(2 * HOUR + 1)  # two rotations: the cached key is gone
        done = yield defer.Deferred.fromCoroutine(client.chat(prompt()))
        self.assertEqual(done.finish_reason, "stop")

    @defer.inlineCallbacks
    def test_revoked_key_refused_at_once(self) -> Any:
        running = yield self.router()
        doc = yield key_document(running.url, running.router.clock.seconds())
        current = doc.current()
        running.router.keys.revoke(current.kid)
        result = yield self.status_for(running, current)
        self.assertEqual(result, (400, "key_unknown"))
        fresh = yield key_document(running.url, running.router.clock.seconds())
        self.assertNotEqual(fresh.current().kid, current.kid)
        result = yield self.status_for(running, fresh.current())
        self.assertEqual(result, (200, None))

    @defer.inlineCallbacks
    def test_operator_rotation_on_disk_is_picked_up(self) -> Any:
        running = yield self.router()
        before = yield key_document(running.url, running.router.clock.seconds())
        # what `llmrouter-keys --keys-dir DIR rotate` does, from another process
        operator = operator_store(running)
        operator.rotate()
        operator.close()
        running.router.reload()  # SIGHUP; the 2 s poll does the same
        after = yield key_document(running.url, running.router.clock.seconds())
        self.assertNotEqual(after.current().kid, before.current().kid)
        self.assertEqual(after.signing_key, before.signing_key)  # the pinned key is long-lived
        result = yield self.status_for(running, before.current())
        self.assertEqual(result, (200, None))  # overlap applies to operator rotations too

    @defer.inlineCallbacks
    def test_poll_picks_up_revocation_without_signal(self) -> Any:
        running = yield self.router()
        doc = yield key_document(running.url, running.router.clock.seconds())
        operator = operator_store(running)
        operator.revoke(doc.current().kid)
        operator.close()
        running.router.clock.advance(2.5)
        result = yield self.status_for(running, doc.current())
        self.assertEqual(result, (400, "key_unknown"))
        self.assertIn("key_revoked", "".join(json.loads(e)["event"] for e in running.events))
