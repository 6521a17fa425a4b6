"""Protocol v2 against real daemons: an operator, certified nodes (``twistd inference
--keys-dir``) and a certified router, and a client that seals and opens with the wire module.

The operator key lives in the test only (as it lives offline in production); the router's and the
nodes' key directories get the certificates the operator signs for their signing keys, as
docs/deployment.md's ceremony does with ``llmrouter-keys operator-certify``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import nacl.signing
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers

from llmrouter import hpke, pow
from llmrouter.chat import ChatRequest
from llmrouter.httpclient import agent_for
from llmrouter.keystore import KeyStore
from llmrouter.protocol import (
    Delta,
    Done,
    ErrorChunk,
    Logprob,
    Reasoning,
    StreamItem,
    ToolCallDelta,
    b64u_decode,
)
from llmrouter.v2 import certs
from llmrouter.v2.request import ClientState, seal_request
from llmrouter.v2.response import ResponseOpener, RouterRefusal
from tests.daemons import Daemon, start_inference
from tests.router_support import http, short_tempdir

DAY = 86400
TINY = "tiny"  # the tiny test model's name (its file's stem)


class Operator:
    """The offline operator key: certifies routers and nodes; apps pin ``pin``."""

    def __init__(self) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.pin = bytes(self.key.verify_key)

    def certify(
        self, type: str, name: str, key: bytes, models: Sequence[str] = (), days: int = 30
    ) -> dict[str, str]:
        start = int(time.time()) - 3600
        return certs.issue_certificate(
            bytes(self.key),
            type=type,
            name=name,
            key=key,
            models=models,
            not_before=start,
            not_after=start + days * DAY,
        )

    def certify_router(self, keys_dir: Path, name: str = "router-1") -> None:
        """Write ``router.cert`` for the router whose key directory is ``keys_dir``."""
        pk = _signing_pk(keys_dir)
        (keys_dir / "router.cert").write_text(json.dumps(self.certify("router", name, pk)))

    def certify_node(self, keys_dir: Path, name: str, models: Sequence[str]) -> None:
        pk = _signing_pk(keys_dir)
        cert = self.certify("node", name, pk, models)
        (keys_dir / "node.cert").write_text(json.dumps(cert))


def _signing_pk(keys_dir: Path) -> bytes:
    state = json.loads((keys_dir / "state.json").read_text())
    return b64u_decode(state["signing_key"], "signing_key", 32)


def node_key_dir(directory: Path) -> Path:
    """A node's key directory as ``twistd inference --keys-dir`` creates it on first start."""
    keys = directory / "node-keys"
    clock = Clock()
    clock.advance(time.time())
    KeyStore.open(keys, clock, node=True).close()
    return keys


@dataclass
class V2Node:
    name: str
    daemon: Daemon
    keys_dir: Path

    @property
    def url(self) -> str:
        assert self.daemon.socket is not None
        return f"unix:{self.daemon.socket}"


@defer.inlineCallbacks
def start_node(
    testcase: Any,
    operator: Operator | None,
    name: str = "node-a",
    models: Sequence[str] = (TINY,),
    extra_args: Sequence[str] = (),
    model: Path | None = None,
) -> Any:
    """Our inference daemon with the gate, certified for ``models`` (no ``operator``: no
    ``node.cert``, v2 off)."""
    directory = short_tempdir(testcase)
    keys = node_key_dir(directory)
    if operator is not None:
        operator.certify_node(keys, name, models)
    daemon = yield start_inference(
        testcase,
        model=model,
        extra_args=["--parallel", "2", "--keys-dir", str(keys), *extra_args],
    )
    node = V2Node(name, daemon, keys)
    if operator is not None:
        yield wait_ready(node)
    return node


@defer.inlineCallbacks
def wait_ready(node: V2Node, limit: float = 30.0) -> Any:
    """Until the node serves ``GET /v2/keys`` (its gate saw the engine healthy); bounded."""
    deadline = reactor.seconds() + limit
    while True:
        status, _, _ = yield node.daemon.request(b"GET", "/v2/keys")
        if status == 200:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"node {node.name} never served /v2/keys ({status})")
        yield deferLater(reactor, 0.1, lambda: None)


@defer.inlineCallbacks
def start_front_node(
    testcase: Any,
    operator: Operator,
    front: str,
    name: str = "node-f",
    models: Sequence[str] = ("fault",),
    dialect: str = "openai",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Any:
    """``twistd inference --front``: no model, the gate in front of ``front``."""
    directory = short_tempdir(testcase)
    keys = node_key_dir(directory)
    operator.certify_node(keys, name, models)
    sock = directory / "node.sock"
    args = ["--listen", f"unix:{sock}:mode=600", "--keys-dir", str(keys)]
    args += ["--front", front, "--dialect", dialect, *extra_args]
    daemon = Daemon("inference", args, health=f"unix:{sock}", directory=directory, env=env)
    daemon.socket = sock
    testcase.addCleanup(daemon.stop)
    yield daemon.start()
    node = V2Node(name, daemon, keys)
    yield wait_ready(node)
    return node


@dataclass
class Answer:
    """What a v2 client got: the HTTP status, the items opened, the terminal item."""

    status: int
    items: list[StreamItem] = field(default_factory=list)
    final: Done | ErrorChunk | None = None
    raw: bytes = b""
    error: dict[str, Any] | None = None  # a plain JSON refusal

    @property
    def text(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, Delta))

    @property
    def refusal(self) -> RouterRefusal | None:
        return self.final if isinstance(self.final, RouterRefusal) else None

    @property
    def code(self) -> str | None:
        """The error code: of a plain refusal, the router's sealed event or the node's final."""
        if self.error is not None:
            return str(self.error["code"])
        return self.final.code if isinstance(self.final, ErrorChunk) else None

    @property
    def reasoning(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, Reasoning))

    @property
    def tool_calls(self) -> dict[int, tuple[str | None, str | None, str]]:
        """Tool calls by index: (id, name, arguments), fragments joined."""
        calls: dict[int, tuple[str | None, str | None, str]] = {}
        for item in self.items:
            if isinstance(item, ToolCallDelta):
                call_id, name, arguments = calls.get(item.index, (None, None, ""))
                calls[item.index] = (
                    call_id or item.id,
                    name or item.name,
                    arguments + item.arguments,
                )
        return calls

    @property
    def logprobs(self) -> list[Logprob]:
        return [lp for i in self.items if isinstance(i, Delta) for lp in i.logprobs or ()]


class _Opener(Protocol):
    def __init__(self, state: ClientState, sse: bool) -> None:
        self.opener = ResponseOpener(state)
        self.sse = sse
        self.raw = b""
        self.items: list[StreamItem] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.first: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.sse:
            self.items += self.opener.feed(data)
        if self.items and not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self.first.called:
            self.first.callback(None)
        self.ended.callback(None)


@dataclass
class V2Client:
    """Seals to the router at ``url`` with the wire module, as an app would."""

    url: str
    pin: bytes
    device_sk: bytes | None = field(default_factory=lambda: hpke.generate_key_pair().sk)
    now: Any = time.time
    k: int = 3

    @defer.inlineCallbacks
    def document(self) -> Any:
        status, _, body = yield http(self.url, path="/api/v2/keys")
        assert status == 200, (status, body)
        return certs.verify_key_document_v2(body, self.pin, now=self.now())

    @defer.inlineCallbacks
    def seal(
        self, request: ChatRequest, model: str = TINY, ts: int | None = None, doc: Any = None
    ) -> Any:
        if doc is None:
            doc = yield self.document()
        return seal_request(
            doc,
            request,
            model=model,
            device_sk=self.device_sk,
            k=self.k,
            ts=int(self.now()) if ts is None else ts,
        )

    @defer.inlineCallbacks
    def post(
        self, body: bytes, state: ClientState, headers: dict[bytes, list[bytes]] | None = None
    ) -> Any:
        """Send a sealed body; fires with the reader once the response headers came."""
        agent, base = agent_for(reactor, self.url)
        all_headers = {
            b"Content-Type": [b"message/ohttp-req"],
            b"Accept": [b"text/event-stream"],
            **(headers or {}),
        }
        response = yield agent.request(
            b"POST",
            (base + "/api/v2/chat").encode(),
            Headers(all_headers),
            FileBodyProducer(BytesIO(body)),
        )
        reader = _Opener(state, response.code == 200)
        response.deliverBody(reader)
        return response.code, reader

    @defer.inlineCallbacks
    def chat(self, request: ChatRequest, model: str = TINY, **kwargs: Any) -> Any:
        """Seal, send, and on ``pow_required`` solve and send once more, as clients do."""
        body, state = yield self.seal(request, model, **kwargs)
        answer = yield self.send(body, state)
        refusal = answer.refusal
        if refusal is not None and refusal.code == "pow_required" and refusal.challenge:
            solution = pow.solve(refusal.challenge, state.outer_enc)
            answer = yield self.send(body, state, {pow.HEADER.encode(): [solution.encode()]})
        return answer

    @defer.inlineCallbacks
    def send(
        self, body: bytes, state: ClientState, headers: dict[bytes, list[bytes]] | None = None
    ) -> Any:
        status, reader = yield self.post(body, state, headers)
        yield reader.ended
        answer = Answer(status, reader.items, raw=reader.raw)
        if status == 200:
            answer.final = reader.opener.close()
        else:
            answer.error = json.loads(reader.raw)["error"]
        return answer
