"""Real OpenAI clients through the local proxy, in both languages (issue 19's matrix).

Python: the official ``openai`` package (tests/test_client_proxy.py drives it at length). Node:
the official ``openai`` package and the Vercel AI SDK's OpenAI-compatible provider
(``tests/clients/node``, installed from its lockfile by ``make``), run as a real ``node`` process
against the real proxy, router and our daemon on the tiny model: plain, streaming, a forced tool
call, JSON schema output and the typed errors (404, 400, 401).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import defer, utils
from twisted.trial.unittest import SkipTest, TestCase

from tests.daemons import start_inference
from tests.test_client_proxy import proxied_router

NODE_DIR = Path(__file__).resolve().parent / "clients" / "node"


class NodeClientsTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_openai_and_ai_sdk_for_node(self) -> Any:
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
            if os.environ.get("CI") == "true":
                self.fail("node or tests/clients/node/node_modules missing in CI (make installs)")
            raise SkipTest("needs node and `npm ci` in tests/clients/node (make does it)")
        inference = yield start_inference(self, extra_args=["--parallel", "2"])
        client, _, proxy = yield proxied_router(self, [f"unix:{inference.socket}"])
        env = {**os.environ, "BASE_URL": str(client.base_url).rstrip("/"), "API_KEY": proxy.token}
        out, err, code = yield utils.getProcessOutputAndValue(
            node, [str(NODE_DIR / "matrix.mjs")], env=env, path=str(NODE_DIR)
        )
        self.assertEqual(code, 0, err.decode()[-3000:])
        got = json.loads(out.decode().strip().splitlines()[-1])
        self.assertEqual(got["openai_plain"], {"finish": "length", "tokens": 4, "text": True})
        self.assertEqual(got["openai_stream"], {"finish": "length", "text": True})
        self.assertEqual(got["openai_tool"]["name"], "get_weather")
        self.assertIn(got["openai_tool"]["city"], ("Paris", "Oslo"))
        self.assertEqual(got["openai_tool"]["finish"], "tool_calls")
        self.assertIn(got["openai_json_schema"]["city"], ("Paris", "Oslo"))
        self.assertIsInstance(got["openai_json_schema"]["sunny"], bool)
        self.assertEqual(
            got["openai_404"],
            {"cls": "NotFoundError", "status": 404, "code": "model_not_found", "param": "model"},
        )
        self.assertEqual(
            got["openai_400"],
            {
                "cls": "BadRequestError",
                "status": 400,
                "code": "unsupported_parameter",
                "param": "logit_bias",
            },
        )
        self.assertEqual(
            got["openai_bad_key"],
            {"cls": "AuthenticationError", "status": 401, "code": "invalid_api_key"},
        )
        self.assertEqual(got["ai_generate"], {"finish": "length", "tokens": 4, "text": True})
        self.assertEqual(got["ai_stream"], {"finish": "length", "text": True})
        self.assertEqual(got["ai_tool"]["name"], "get_weather")
        self.assertIn(got["ai_tool"]["city"], ("Paris", "Oslo"))
        self.assertEqual(got["ai_404"], {"api_call_error": True, "status": 404})
