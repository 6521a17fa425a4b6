"""The blind router, proven against real daemons (issue 22's proofs).

``twistd llmrouter`` and ``twistd inference --keys-dir`` run as subprocesses; every byte between
the client and the router, and between the router and the node, passes through recording proxies
in this process (what a TLS-terminating hop and what the router's own link see).

* Canary: during and after a stream whose prompt is a unique canary, the router process's
  readable memory (``/proc/PID/maps`` + ``/proc/PID/mem``) and every byte on the router-node link
  hold neither the canary nor the answer's text, nor the request's response secret or the node's
  keys. Controls: the node process's memory holds them, and a v1.1 request's canary, which this
  router does open, is found in the router's memory and on the link by the same scans.
* Router host compromise: with the router's whole key directory, its environment and the capture
  of all its traffic, no request and no answer opens; no document with a node key of the
  attacker's is accepted by a client. Controls: the node's key opens the same capture, the
  client's state opens the same answer.
* Linkability: two requests of one device, as the TLS hop sees them, share no byte string
  (beyond sizes and timing) that a request of another device does not share too. Control: v1.1
  in auth mode fails the same check (its envelope carries the device key in the clear).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from llmrouter import hpke
from llmrouter.chat import ChatRequest, ResponseFormat
from llmrouter.client import Client
from llmrouter.protocol import (
    Delta,
    Done,
    KeyDocumentError,
    ProtocolError,
    PublishedKey,
    RequestState,
    ResponseOpener,
    StreamError,
    b64u_encode,
    key_document_issued_at,
    parse_published_key,
)
from llmrouter.v2 import certs
from llmrouter.v2.request import (
    NodeRequest,
    binding,
    content_keys,
    open_node_request,
    open_outer,
    seal_request,
)
from llmrouter.v2.response import ResponseOpener as V2Opener
from tests.daemons import start_router_daemon
from tests.router_support import daemon_pin, http, prompt, short_tempdir
from tests.v2_support import TINY, Operator, V2Client, start_node

# -- capture -----------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One connection through a recording proxy: what each side sent."""

    upstream: bytearray = field(default_factory=bytearray)  # client -> server
    downstream: bytearray = field(default_factory=bytearray)  # server -> client

    @property
    def all(self) -> bytes:
        return bytes(self.upstream) + bytes(self.downstream)


class _Half(Protocol):
    def __init__(self, record: bytearray) -> None:
        self.record = record
        self.peer: _Half | None = None

    def dataReceived(self, data: bytes) -> None:
        self.record += data
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Inbound(_Half):
    def __init__(self, proxy: Recorder, exchange: Exchange) -> None:
        super().__init__(exchange.upstream)
        self._proxy = proxy
        self._exchange = exchange

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()
        outbound = _Half(self._exchange.downstream)
        d = UNIXClientEndpoint(reactor, str(self._proxy.target)).connect(
            Factory.forProtocol(lambda: outbound)
        )

        def linked(_: object) -> None:
            outbound.peer, self.peer = self, outbound
            assert self.transport is not None and outbound.transport is not None
            self.transport.registerProducer(outbound.transport, True)
            outbound.transport.registerProducer(self.transport, True)
            self.transport.resumeProducing()

        d.addCallbacks(linked, lambda _: self.transport.loseConnection())  # type: ignore[union-attr]


class Recorder:
    """A UNIX-socket proxy to ``target`` that keeps every byte, per connection."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.exchanges: list[Exchange] = []

    @defer.inlineCallbacks
    def start(self, testcase: TestCase) -> Any:
        def build() -> Protocol:
            exchange = Exchange()
            self.exchanges.append(exchange)
            return _Inbound(self, exchange)

        port = yield UNIXServerEndpoint(reactor, str(self.path)).listen(Factory.forProtocol(build))
        testcase.addCleanup(port.stopListening)
        return self

    def everything(self) -> bytes:
        return b"".join(e.all for e in self.exchanges)


# -- process memory ----------------------------------------------------------------------------


def readable_memory(pid: int) -> Iterable[bytes]:
    """Every readable mapping of process ``pid``, as bytes."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith("[vvar]"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue


def found_in(pid: int, needles: dict[str, bytes]) -> set[str]:
    """The names of the needles present anywhere in process ``pid``'s readable memory."""
    found: set[str] = set()
    for region in readable_memory(pid):
        for name, needle in needles.items():
            if name not in found and needle in region:
                found.add(name)
    return found


def require_memory_access(testcase: TestCase) -> None:
    """Reading another process's memory needs CAP_SYS_PTRACE (the daemons are not dumpable)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            testcase.fail("the memory scans need root (CAP_SYS_PTRACE) in CI")
        raise SkipTest("the memory scans need root (CAP_SYS_PTRACE)")


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Captured:
    operator: Operator
    node: Any
    router: Any
    directory: Path
    front: Recorder  # client <-> router (the TLS hop's view)
    link: Recorder  # router <-> node

    @property
    def url(self) -> str:
        return f"unix:{self.front.path}"

    def client(self, **kwargs: Any) -> V2Client:
        return V2Client(self.url, self.operator.pin, **kwargs)


@defer.inlineCallbacks
def captured_stack(testcase: TestCase) -> Any:
    operator = Operator()
    node = yield start_node(testcase, operator)
    directory = short_tempdir(testcase)
    link = yield Recorder(directory / "link.sock", node.daemon.socket).start(testcase)
    router = start_router_daemon(testcase, directory, [f"unix:{link.path}"])
    yield router.start()
    operator.certify_router(directory / "keys")
    front = yield Recorder(directory / "front.sock", directory / "router.sock").start(testcase)
    stack = Captured(operator, node, router, directory, front, link)
    for _ in range(100):  # until the router's probe has listed the node
        status, _, body = yield http(stack.url, path="/api/v2/keys")
        if status == 200 and certs.verify_key_document_v2(body, operator.pin, now=_now()).nodes:
            break
        yield _sleep(0.1)
    front.exchanges.clear()
    return stack


def _now() -> float:
    return float(reactor.seconds())


def _sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


# -- HTTP as the hop sees it -------------------------------------------------------------------

_SIZES_AND_TIMES = re.compile(rb"(?im)^(date|content-length):[^\r\n]*\r\n")


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def hop_view(exchange: Exchange) -> bytes:
    """What a TLS-terminating hop sees of one exchange, less sizes and times: the request and
    the response, without Date and Content-Length headers and with chunked framing removed."""
    parts = []
    for message in (bytes(exchange.upstream), bytes(exchange.downstream)):
        head, _, body = message.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        parts.append(_SIZES_AND_TIMES.sub(b"", head + b"\r\n\r\n") + body)
    return b"".join(parts)


def answered(recorder: Recorder, start: bytes) -> list[Exchange]:
    """The exchanges of requests that were answered with a stream (not refused for a proof of
    work first: its resent body is the same request, not another one)."""
    return [
        e
        for e in recorder.exchanges
        if e.upstream.startswith(start) and b"event: init" in e.downstream
    ]


_DELIMITERS = re.compile(rb'[\r\n :",{}]')


def grams(data: bytes, n: int = 8) -> set[bytes]:
    """Every n-byte string of ``data`` inside a field: none spans the framing around fields
    (a field's last random character followed by the same framing is not a shared field)."""
    found: set[bytes] = set()
    for part in _DELIMITERS.split(data):
        found.update(part[i : i + n] for i in range(len(part) - n + 1))
    return found


def linking(a1: Exchange, a2: Exchange, b: Exchange) -> set[bytes]:
    """Byte strings (8 bytes) two exchanges of device A share and B's does not."""
    return (grams(hop_view(a1)) & grams(hop_view(a2))) - grams(hop_view(b))


# -- the tests ---------------------------------------------------------------------------------


class CanaryTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_the_router_never_holds_the_prompt_or_the_answer(self) -> Any:
        require_memory_access(self)
        stack = yield captured_stack(self)
        canary = f"CANARY{uuid.uuid4().hex}"
        # A random model writes nothing we could look for, so the answer's text is made a
        # canary too: the node's grammar allows only this JSON.
        answer_canary = f"ANSWER{uuid.uuid4().hex}"
        schema = {
            "type": "object",
            "properties": {"answer": {"const": answer_canary}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        request = ChatRequest.from_prompt(
            canary,
            response_format=ResponseFormat("json_schema", schema, "canary"),
            max_tokens=200,
        )
        client = stack.client()
        yield client.chat(prompt("first, a known device", max_tokens=1))  # its proof of work
        body, state = yield client.seal(request)
        status, reader = yield client.post(body, state)
        self.assertEqual(status, 200)
        yield reader.first
        reader.transport.pauseProducing()  # mid-stream: the router relays, the node generates
        router_pid, node_pid = stack.router.pid, stack.node.daemon.pid
        assert router_pid is not None and node_pid is not None
        node_keys = {
            f"node {path.name}": path.read_bytes()
            for path in stack.node.keys_dir.glob("hpke-*.key")
        }
        secrets = {
            "canary": canary.encode(),
            "answer canary": answer_canary.encode(),
            "response secret": state.response_secret,
            **node_keys,
        }
        during = found_in(router_pid, secrets)
        reader.transport.resumeProducing()
        yield reader.ended
        text = "".join(i.text for i in reader.items if isinstance(i, Delta))
        self.assertEqual(json.loads(text), {"answer": answer_canary})
        self.assertGreater(len([i for i in reader.items if isinstance(i, Delta)]), 5)
        secrets["answer"] = text.encode()
        after = found_in(router_pid, secrets)
        link = stack.link.everything()
        self.assertEqual(during, set())
        self.assertEqual(after, set())
        self.assertEqual({name for name, value in secrets.items() if value in link}, set())
        # the controls: the node (which opens the request) holds what the router must not
        node_found = found_in(
            node_pid, {"canary": canary.encode(), "answer canary": answer_canary.encode()}
        )
        self.assertEqual(node_found, {"canary", "answer canary"})
        # and the same scans find what this router does open: a v1.1 request's prompt
        v1_canary = f"V1CANARY{uuid.uuid4().hex}"
        v1 = Client(reactor, stack.url, pin=daemon_pin(stack.directory), protocol=1)
        yield defer.Deferred.fromCoroutine(v1.complete(prompt(v1_canary, max_tokens=4)))
        self.assertEqual(found_in(router_pid, {"v1": v1_canary.encode()}), {"v1"})
        self.assertIn(v1_canary.encode(), stack.link.everything())


class CompromiseTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_the_router_host_opens_nothing_and_forges_no_node(self) -> Any:
        stack = yield captured_stack(self)
        client = stack.client()
        before = yield client.chat(prompt("before the compromise", max_tokens=12))
        self.assertIsInstance(before.final, Done)
        body, state = yield client.seal(prompt("after the compromise", max_tokens=12))
        after = yield client.send(body, state)
        # The attacker: every file of the router's key directory, its environment, every byte
        # it sent and received.
        loot = {
            path.name: path.read_bytes()
            for path in (stack.directory / "keys").iterdir()
            if path.is_file()
        }
        assert stack.router.pid is not None
        with open(f"/proc/{stack.router.pid}/environ", "rb") as f:
            environment = [v.partition(b"=")[2] for v in f.read().split(b"\0")]
        candidates = [v for v in [*loot.values(), *environment] if len(v) >= 16]
        chats = [e for e in stack.front.exchanges if e.upstream.startswith(b"POST /api/v2/chat")]
        requests = [bytes(e.upstream).partition(b"\r\n\r\n")[2] for e in chats]
        answers = [bytes(e.downstream) for e in chats if b"event: init" in e.downstream]
        self.assertEqual(len(answers), 2)  # and the proof-of-work refusal before them
        outer_keys = {n: v for n, v in loot.items() if n.startswith("hpke-")}
        for request in requests:
            # the outer layer opens with the router's key (it is meant to)...
            kid = f"{request[0]:02x}"
            outer = open_outer(request, outer_keys[f"hpke-{kid}.key"])
            candidates_here = [*candidates, outer.router_secret]
            for wrap in outer.wraps:
                node_request = NodeRequest(
                    outer.ts, outer.model, outer.device_pk, wrap.kid, wrap.enc, wrap.key,
                    outer.ct, wrap.node,
                )  # fmt: skip
                for secret in candidates_here:  # ...the inner one with nothing they hold
                    sk = secret[: hpke.N_SK].ljust(hpke.N_SK, b"\0")
                    with self.assertRaises(ProtocolError):
                        open_node_request(node_request, sk)
                    key, nonce, _ = content_keys(sk)
                    bound = binding(outer.ts, outer.model, outer.device_pk)
                    with self.assertRaises(hpke.OpenError):
                        hpke.aead_open(key, nonce, bound, outer.ct)
                # control: the node's own key opens exactly this capture
                node_sk = (stack.node.keys_dir / f"hpke-{wrap.kid}.key").read_bytes()
                chat, _ = open_node_request(node_request, node_sk)
                self.assertIn(
                    chat.messages[0].content, ("before the compromise", "after the compromise")
                )
        for answer in answers:
            stream = _dechunk(answer.partition(b"\r\n\r\n")[2])
            for secret in candidates:
                opener = ResponseOpener(RequestState(b"", secret[:32].ljust(32, b"\0")))
                with self.assertRaises(StreamError):
                    opener.feed(stream)
        # control: the client's own state opens the captured answer
        own = V2Opener(state)
        own.feed(_dechunk(answers[-1].partition(b"\r\n\r\n")[2]))
        self.assertEqual(own.close(), after.final)
        # Forged documents: the router's genuine signing key and certificate, nodes of the
        # attacker's making. A client with the operator pin drops every such node.
        signing = nacl.signing.SigningKey(loot["signing.key"])
        router_cert = json.loads(loot["router.cert"])
        genuine = yield client.document()
        real = genuine.nodes[0]
        now = _now()
        attacker = nacl.signing.SigningKey.generate()
        rogue_operator = nacl.signing.SigningKey.generate()
        attacker_hpke = hpke.generate_key_pair()
        published = _published(attacker_hpke.pk, now)

        def certificate(operator: nacl.signing.SigningKey, key: bytes) -> dict[str, str]:
            return certs.issue_certificate(
                bytes(operator), type="node", name="node-a", key=key, models=[TINY],
                not_before=int(now) - 60, not_after=int(now) + 86400,
            )  # fmt: skip

        key_set = certs.build_node_keys(attacker, published, key_document_issued_at(now))
        tampered = dict(real.certificate.raw)
        forged_entries = {
            "a rogue operator's certificate": certificate(
                rogue_operator, bytes(attacker.verify_key)
            ),
            "the router's key as operator": certificate(signing, bytes(attacker.verify_key)),
            "the real certificate, the attacker's key set": real.certificate.raw,
            "the real certificate, edited": {
                **tampered,
                "payload": tampered["payload"][:-4] + "AAAA",
            },
        }
        for what, cert in forged_entries.items():
            entry = {"certificate": cert, "keys": key_set, "attestations": []}
            forged = certs.build_key_document_v2(
                signing, router_cert, _router_keys(loot), [entry], TINY,
                key_document_issued_at(now),
            )  # fmt: skip
            try:
                document = certs.verify_key_document_v2(forged, stack.operator.pin, now=now)
            except KeyDocumentError:
                continue  # refused whole: as good
            self.assertEqual(document.nodes, (), what)
            with self.assertRaises(ProtocolError, msg=what):
                seal_request(document, prompt("x"), model=TINY, device_sk=None)


def _published(pk: bytes, now: float) -> list[PublishedKey]:
    start = int(now) - 60
    return [
        PublishedKey("aa", pk, "current", start, start + 86400),
        PublishedKey("ab", pk, "next", start + 86400, start + 2 * 86400),
    ]


def _router_keys(loot: dict[str, bytes]) -> list[PublishedKey]:
    state = json.loads(loot["state.json"])
    return [parse_published_key(k) for k in state["keys"] if k["status"] in ("current", "next")]


class LinkabilityTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_a_device_leaves_nothing_in_the_clear_to_link_its_requests(self) -> Any:
        stack = yield captured_stack(self)
        a, b = stack.client(), stack.client()
        for client in (a, b, a):
            answer = yield client.chat(prompt("the same words", max_tokens=4))
            self.assertIsNotNone(answer.final)
        a1, b1, a2 = answered(stack.front, b"POST /api/v2/chat")
        self.assertEqual(linking(a1, a2, b1), set())
        # control: v1.1 in auth mode carries the device key in the clear, and the check sees it
        stack.front.exchanges.clear()
        pin = daemon_pin(stack.directory)
        device_a, device_b = hpke.generate_key_pair(), hpke.generate_key_pair()
        for device in (device_a, device_b, device_a):
            v1 = Client(reactor, stack.url, pin=pin, device_key=device, protocol=1)
            yield defer.Deferred.fromCoroutine(v1.complete(prompt("the same words", max_tokens=4)))
        a1, b1, a2 = answered(stack.front, b"POST /api/chat")
        shared = linking(a1, a2, b1)
        self.assertTrue(shared, "the control found nothing: the check cannot fail")
        self.assertTrue(any(g in b64u_encode(device_a.pk).encode() for g in shared))
