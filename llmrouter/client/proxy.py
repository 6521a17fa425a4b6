"""``llmrouter-client proxy``: an OpenAI-compatible endpoint on loopback, end to end encrypted.

Any OpenAI client (the ``openai`` SDKs, chat front ends, editors) talks plain HTTP to this proxy on
the user's own machine; the proxy seals each request to the router with :class:`Client` and opens
the sealed stream, so nothing between this machine and the router can read the conversation.

Served: ``POST /v1/chat/completions`` (streaming and not, OpenAI's chunk format, ``[DONE]``),
``GET /v1/models`` and ``GET /v1/models/<id>`` (the router's models, from its ``GET /api/models``,
and the proxy's own name for the router's default model). Errors are OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` bodies.

Who may use it (:class:`Access`): a web page the user visits is an attacker of anything on
localhost (a "simple" ``text/plain`` POST needs no preflight, and DNS rebinding makes a page
same-origin with the proxy). So every request must name the proxy itself as ``Host`` (its
listening address or ``localhost``, with its port), carry no ``Origin`` but the proxy's own, send
``POST`` bodies as ``application/json`` and, unless the proxy listens only on a UNIX socket and
was told ``--no-token``, present the proxy's bearer token (OpenAI clients send their API key so).

An OpenAI request field is either carried by protocol v1.1 (``_FIELDS``) or refused by name with
400 ``unsupported_parameter``; nothing is dropped silently. Answers come back in OpenAI's shapes:
``tool_calls`` (fragments while streaming), ``logprobs``, finish reason ``tool_calls``, and the
model's reasoning apart as ``reasoning_content``, as llama-server, vLLM and DeepSeek send it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource

from llmrouter.bodies import InMemoryRequest
from llmrouter.chat import FIELDS, MODEL_NAME
from llmrouter.client.library import ChatError, Client, Reply, read_private, write_private
from llmrouter.protocol import (
    ChatRequest,
    Delta,
    Logprob,
    ProtocolError,
    Reasoning,
    StreamItem,
    ToolCallDelta,
    parse_chat_request,
)

__all__ = [
    "DEFAULT_MODEL",
    "MAX_BODY",
    "Access",
    "OpenAIError",
    "ProxyResource",
    "ProxySite",
    "load_token",
    "parse_listen",
    "to_request",
]

DEFAULT_MODEL = "llmrouter"
MAX_BODY = 1024 * 1024


class OpenAIError(Exception):
    """An answer in OpenAI's error format; messages are fixed and never quote the conversation."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _unsupported(name: str, param: str | None = None) -> OpenAIError:
    """``name`` (a field, or what of it) is refused; ``param`` the field, if ``name`` says more."""
    return OpenAIError(
        400,
        f"{name} is not supported by this router (protocol v1.1)",
        "unsupported_parameter",
        param or name,
    )


def _invalid(name: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_value", name)


def _too_large() -> OpenAIError:
    return OpenAIError(413, "the request body is too large", "body_too_large")


def _model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404, f"the router serves no model {name} (see GET /v1/models)", "model_not_found", "model"
    )


def _field_name(key: Any, fallback: str) -> str:
    """A request's field name, for a message: only when it is a plain identifier."""
    return key if isinstance(key, str) and key.isidentifier() else fallback


# Who may use the proxy.


@dataclass(frozen=True)
class Access:
    """What a request must show: ``hosts`` the ``Host`` values that name the proxy (None: any,
    for a UNIX socket, which no browser reaches), ``origins`` the only ``Origin`` values allowed
    (the proxy's own), ``token`` the bearer token (None: none asked, UNIX socket only)."""

    hosts: frozenset[bytes] | None
    origins: frozenset[bytes]
    token: bytes | None

    @classmethod
    def for_tcp(cls, host: str, port: int, token: bytes) -> Access:
        """The proxy listening on ``host:port``: that address and ``localhost`` name it."""
        names = (f"[{host}]" if ":" in host else host, "localhost")
        hosts = {f"{name}:{port}" for name in names}
        if port == 80:  # the default port goes unsaid
            hosts |= set(names)
        return cls(
            frozenset(h.encode() for h in hosts),
            frozenset(f"http://{h}".encode() for h in hosts),
            token,
        )

    @classmethod
    def for_unix(cls, token: bytes | None) -> Access:
        return cls(None, frozenset(), token)

    def check(self, request: server.Request) -> None:
        """Raise the :class:`OpenAIError` for a request that may not use the proxy."""
        host = (request.getHeader(b"host") or b"").strip().lower()
        if self.hosts is not None and host not in self.hosts:
            raise OpenAIError(
                403,
                "the Host header does not name this proxy (a web page may be trying to use it)",
                "forbidden_host",
            )
        origin = request.getHeader(b"origin")
        if origin is not None and origin.strip().lower() not in self.origins:
            raise OpenAIError(
                403, "requests from web pages are refused (Origin)", "forbidden_origin"
            )
        if self.token is not None:
            given = request.getHeader(b"authorization") or b""
            scheme, _, value = given.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                raise OpenAIError(
                    401,
                    "a bearer token is required: the API key the proxy printed when it started"
                    " (kept in its --token-file)",
                    "invalid_api_key",
                )
        if request.method == b"POST":
            content_type = request.getHeader(b"content-type") or b""
            if content_type.split(b";")[0].strip().lower() != b"application/json":
                raise OpenAIError(
                    415, "Content-Type must be application/json", "unsupported_media_type"
                )


def load_token(path: Path) -> bytes:
    """The proxy's bearer token in ``path`` (0600), made (random, 256 bits) on first use."""
    try:
        text = read_private(path).strip()
    except FileNotFoundError:
        text = secrets.token_urlsafe(32)
        try:
            write_private(path, text + "\n", exclusive=True)
        except FileExistsError:  # another proxy made it meanwhile
            text = read_private(path).strip()
    if len(text) < 32 or not text.isascii() or not text.isprintable() or " " in text:
        raise ChatError("bad_token", f"{path} does not hold a token (32 or more characters)")
    return text.encode("ascii")


# The request: OpenAI fields -> protocol v1.1 plaintext.


@dataclass
class _Draft:
    """What an OpenAI request asks for, on its way to a protocol v1.1 request."""

    default_model: str  # the proxy's name for the router's default model
    model: str = ""  # the model as the client named it, echoed in the answer
    plaintext: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
# Message fields protocol v1.1 carries, besides role and content (checked by the router's rules).
_MESSAGE_FIELDS = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}


def _content(value: Any) -> Any:
    """A string, null, or a list of text parts; any other part is refused by its type."""
    if isinstance(value, list):
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else None
                name = _field_name(kind, "non-text")
                raise _unsupported(f"messages[].content[].type={name}")
    return value


def _messages(value: Any, draft: _Draft) -> None:
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "messages must be a non-empty list")
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise _invalid("messages", "each message must be an object")
        role = message.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise _unsupported(
                "messages[].role (only system, developer, user, assistant, tool)", "messages[].role"
            )
        carried = _MESSAGE_FIELDS.get(role, ())
        for key in message:
            if key not in ("role", "content", *carried) and message[key] is not None:
                raise _unsupported(f"messages[].{_field_name(key, 'field')}")
        mapped = {"role": role, "content": _content(message.get("content"))}
        for key in carried:
            if message.get(key) not in (None, []):  # no calls at all is what an empty list says
                mapped[key] = message[key]
        out.append(mapped)
    draft.plaintext["messages"] = out


def _max_tokens(name: str) -> Callable[[Any, _Draft], None]:
    def apply(value: Any, draft: _Draft) -> None:
        if draft.plaintext.get("max_tokens", value) != value:
            raise _invalid(name, "max_tokens and max_completion_tokens disagree")
        draft.plaintext["max_tokens"] = value

    return apply


def _copy(name: str) -> Callable[[Any, _Draft], None]:
    def apply(value: Any, draft: _Draft) -> None:
        draft.plaintext[name] = value

    return apply


def _stop(value: Any, draft: _Draft) -> None:
    draft.plaintext["stop"] = [value] if isinstance(value, str) else value


def _stream(value: Any, draft: _Draft) -> None:
    if not isinstance(value, bool):
        raise _invalid("stream", "stream must be a boolean")
    draft.stream = value


def _stream_options(value: Any, draft: _Draft) -> None:
    if not isinstance(value, dict) or not set(value) <= {"include_usage"}:
        raise _unsupported("stream_options (only include_usage)", "stream_options")
    draft.include_usage = bool(value.get("include_usage"))


def _model(value: Any, draft: _Draft) -> None:
    """The proxy's own name stands for the router's default model; any other is the router's."""
    if not isinstance(value, str) or not (
        value == draft.default_model or MODEL_NAME.fullmatch(value)
    ):
        raise _model_not_found("of that name")
    draft.model = value
    if value != draft.default_model:
        draft.plaintext["model"] = value


def _only(name: str, default: Any) -> Callable[[Any, _Draft], None]:
    """A field accepted only at its no-op default (e.g. ``n: 1``): anything else is refused."""

    def apply(value: Any, draft: _Draft) -> None:
        if value != default or isinstance(value, bool) != isinstance(default, bool):
            raise _unsupported(f"{name} other than {json.dumps(default)}", name)

    return apply


# Every OpenAI field the proxy accepts; ``null`` counts as absent. The request fields of protocol
# v1.1 go as they are (the router's checks run on them before anything is sent) but for those
# mapped here. ``include_reasoning`` is not OpenAI's (OpenRouter's spelling): reasoning is sent as
# ``reasoning_content`` unless it is false.
_FIELDS: dict[str, Callable[[Any, _Draft], None]] = {
    **{name: _copy(name) for name in FIELDS},
    "model": _model,
    "messages": _messages,
    "max_tokens": _max_tokens("max_tokens"),
    "max_completion_tokens": _max_tokens("max_completion_tokens"),
    "stop": _stop,
    "stream": _stream,
    "stream_options": _stream_options,
    "n": _only("n", 1),
}


def to_request(body: bytes, default_model: str) -> tuple[ChatRequest, _Draft]:
    """Map an OpenAI chat body to a protocol v1.1 request, or raise :class:`OpenAIError`."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not JSON", "invalid_json") from None
    if not isinstance(doc, dict):
        raise OpenAIError(400, "the body must be a JSON object", "invalid_json")
    draft = _Draft(default_model, default_model)
    for name, value in doc.items():
        if value is None:
            continue
        apply = _FIELDS.get(name)
        if apply is None:
            raise _unsupported(_field_name(name, "a field"))
        apply(value, draft)
    if "messages" not in draft.plaintext:
        raise _invalid("messages", "messages is required")
    if draft.include_usage and not draft.stream:
        raise _invalid("stream_options", "stream_options needs stream: true")
    draft.plaintext.setdefault("include_reasoning", True)
    try:
        request = parse_chat_request(json.dumps(draft.plaintext).encode())
    except ProtocolError as e:
        raise OpenAIError(400, e.message, "invalid_value") from None
    return request, draft


# Router failures -> OpenAI errors.


def _from_chat_error(error: ChatError) -> OpenAIError:
    if error.code == "model_unknown":
        return _model_not_found("of that name")
    if error.code == "unsupported_field":
        return OpenAIError(400, error.message, "unsupported_parameter")
    if error.code == "upstream_refused":
        # The backend's reason (its error code and parameter, never its message), as it would
        # have answered an OpenAI client itself: e.g. max_tokens_exceeded, param max_tokens.
        code = error.upstream.get("upstream_code")
        param = error.upstream.get("upstream_param")
        message = error.message + (f" ({code})" if code else "")
        return OpenAIError(400, message, code or error.code, param)
    status = error.status
    if status is None or status == 401 or status >= 500:
        # Trouble between the proxy and the router (stream cut, key document, proof of work,
        # clock skew, router overloaded): the client's request itself was fine.
        status = 503 if status in (503, 504) else 502
    return OpenAIError(status, error.message, error.code, retry_after=error.retry_after)


def _to_openai_error(failure: Failure) -> OpenAIError:
    if isinstance(failure.value, OpenAIError):
        return failure.value
    if isinstance(failure.value, ChatError):
        return _from_chat_error(failure.value)
    if failure.check(ConnectError, ResponseFailed, ResponseNeverReceived):
        return OpenAIError(502, "cannot talk to the router", "router_unreachable")
    # Not logged: an unexpected exception's text could quote the conversation.
    return OpenAIError(500, "internal error", "internal")


# Answers: protocol v1.1 -> OpenAI shapes.


def _logprob(entry: Logprob, top: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": None if entry.bytes is None else list(entry.bytes),
    }
    if top:
        out["top_logprobs"] = [_logprob(alt, top=False) for alt in entry.top_logprobs]
    return out


def _logprobs(entries: tuple[Logprob, ...]) -> dict[str, Any]:
    return {"content": [_logprob(entry) for entry in entries], "refusal": None}


def _usage(reply: Reply) -> dict[str, int]:
    done = reply.done
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _reply_message(reply: Reply) -> dict[str, Any]:
    """The non-streaming ``message``: content null when the answer is only tool calls."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or (None if reply.tool_calls else ""),
    }
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [call.to_json() for call in reply.tool_calls]
    return message


# The HTTP side.


class _Completion:
    """One ``POST /v1/chat/completions``: runs the sealed chat and writes the OpenAI answer."""

    def __init__(self, http: server.Request, client: Client, request: ChatRequest, draft: _Draft):
        self._http = http
        self._draft = draft
        self._logprobs = bool(request.logprobs)
        self._id = "chatcmpl-" + secrets.token_hex(12)
        self._created = int(time.time())
        self._calls: set[int] = set()  # tool calls whose first fragment went out
        self._started = False
        self._gone = False
        on_item = self._item if draft.stream else None
        self._call: Deferred[Reply] = Deferred.fromCoroutine(
            client.complete(request, on_item=on_item)
        )
        self._call.addCallbacks(self._done, self._failed)
        # The client went away: cancelling closes the router connection, the router cancels.
        http.notifyFinish().addErrback(self._left)

    def _left(self, _: Failure) -> None:
        self._gone = True
        self._call.cancel()

    # Streaming.

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._draft.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def _event(self, doc: Any) -> None:
        self._http.write(b"data: " + json.dumps(doc).encode() + b"\n\n")

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._http.setResponseCode(200)
            self._http.setHeader(b"Content-Type", b"text/event-stream")
            self._http.setHeader(b"Cache-Control", b"no-store")
            self._event(self._chunk({"role": "assistant", "content": ""}))

    def _item(self, item: StreamItem) -> None:
        """Each verified item, as OpenAI streams it; empty deltas (a cadence's filler) are not."""
        if self._gone:
            return
        chunk: dict[str, Any] | None = None
        if isinstance(item, Delta) and (item.text or item.logprobs):
            chunk = self._chunk({"content": item.text})
            if self._logprobs:
                chunk["choices"][0]["logprobs"] = _logprobs(item.logprobs or ())
        elif isinstance(item, Reasoning) and item.text:
            chunk = self._chunk({"reasoning_content": item.text})
        elif isinstance(item, ToolCallDelta):
            call: dict[str, Any] = {"index": item.index}
            function: dict[str, Any] = {"arguments": item.arguments}
            if item.index not in self._calls:  # OpenAI's first fragment names the call
                self._calls.add(item.index)
                call.update(id=item.id or f"call_{item.index}", type="function")
                function = {"name": item.name or "", **function}
            call["function"] = function
            chunk = self._chunk({"tool_calls": [call]})
        if chunk is not None:
            self._start()
            self._event(chunk)

    def _done(self, reply: Reply) -> None:
        if self._gone:
            return
        if reply.finish_reason == "cancelled":
            self._failed(
                Failure(ChatError("cancelled", "the router cancelled the generation", None))
            )
            return
        if not self._draft.stream:
            choice = {
                "index": 0,
                "message": _reply_message(reply),
                "logprobs": _logprobs(reply.logprobs) if self._logprobs else None,
                "finish_reason": reply.finish_reason,
            }
            _json(
                self._http,
                200,
                {
                    "id": self._id,
                    "object": "chat.completion",
                    "created": self._created,
                    "model": self._draft.model,
                    "choices": [choice],
                    "usage": _usage(reply),
                },
            )
            return
        self._start()
        self._event(self._chunk({}, reply.finish_reason))
        if self._draft.include_usage:
            self._event({**self._chunk({}), "choices": [], "usage": _usage(reply)})
        self._http.write(b"data: [DONE]\n\n")
        self._http.finish()

    def _failed(self, failure: Failure) -> None:
        if self._gone or failure.check(CancelledError):
            return
        error = _to_openai_error(failure)
        if not self._started:
            _error(self._http, error)
            return
        # Mid-stream: OpenAI's clients raise on an error event; no [DONE] follows.
        self._event(error.body())
        self._http.finish()


def _json(http: server.Request, status: int, doc: Any) -> None:
    http.setResponseCode(status)
    http.setHeader(b"Content-Type", b"application/json")
    http.setHeader(b"Cache-Control", b"no-store")
    http.write(json.dumps(doc).encode())
    http.finish()


def _error(http: server.Request, error: OpenAIError) -> None:
    if error.retry_after is not None:
        http.setHeader(b"Retry-After", str(error.retry_after).encode())
    _json(http, error.status, error.body())


class _Answer:
    """A JSON answer computed by a coroutine (asking the router); dropped if the client left."""

    def __init__(self, http: server.Request, work: Coroutine[Any, Any, Any]) -> None:
        self._http = http
        self._gone = False
        self._work = Deferred.fromCoroutine(work)
        self._work.addCallbacks(self._done, self._failed)
        http.notifyFinish().addErrback(self._left)

    def _left(self, _: Failure) -> None:
        self._gone = True
        self._work.cancel()

    def _done(self, doc: Any) -> None:
        if not self._gone:
            _json(self._http, 200, doc)

    def _failed(self, failure: Failure) -> None:
        if not self._gone and not failure.check(CancelledError):
            _error(self._http, _to_openai_error(failure))


_MODELS = b"/v1/models"


class ProxyResource(Resource):
    """The whole HTTP surface of the proxy. ``model`` is its name for the router's default."""

    isLeaf = True

    def __init__(self, client: Client, model: str = DEFAULT_MODEL, access: Access | None = None):
        super().__init__()
        self._client = client
        self._model = model
        # Until the listening address is known, nothing is allowed.
        self.access = access or Access(frozenset(), frozenset(), b"")

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llmrouter"}

    async def _models(self, wanted: str | None) -> dict[str, Any]:
        """The proxy's name for the default first, then the router's (none from a v1 router)."""
        try:
            names = await self._client.models()
        except ChatError as e:
            if e.code != "not_found":
                raise
            names = []
        names = [self._model, *(name for name in names if name != self._model)]
        if wanted is None:
            return {"object": "list", "data": [self._entry(name) for name in names]}
        if wanted not in names:
            raise _model_not_found("of that name")
        return self._entry(wanted)

    def render(self, request: server.Request) -> Any:
        path = request.path.rstrip(b"/")
        try:
            self.access.check(request)
            if path == b"/v1/chat/completions":
                self._allow(request, b"POST")
                return self._chat(request)
            if path == _MODELS or path.startswith(_MODELS + b"/"):
                self._allow(request, b"GET")
                wanted = path[len(_MODELS) + 1 :].decode("utf-8", "replace") or None
                _Answer(request, self._models(wanted))
            else:
                raise OpenAIError(404, "no such endpoint on this proxy", "not_found")
        except OpenAIError as e:
            _error(request, e)
        return server.NOT_DONE_YET

    @staticmethod
    def _allow(request: server.Request, method: bytes) -> None:
        if request.method != method:
            request.setHeader(b"Allow", method)
            raise OpenAIError(405, "method not allowed", "method_not_allowed")

    def _chat(self, request: server.Request) -> Any:
        assert request.content is not None
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise _too_large()
        chat, draft = to_request(body, self._model)
        _Completion(request, self._client, chat, draft)
        return server.NOT_DONE_YET


class ProxySite(server.Site):
    """No access log: it would record the local client's requests. Bodies (the conversation in
    plaintext) stay in memory, at most :data:`MAX_BODY`: Twisted's default request spools a
    body of 100 KB or more to a temporary file."""

    requestFactory = InMemoryRequest
    max_body = MAX_BODY

    def __init__(self, resource: ProxyResource) -> None:
        super().__init__(resource)
        self.displayTracebacks = False

    def too_large_body(self) -> bytes:
        return json.dumps(_too_large().body()).encode()

    def log(self, request: Any) -> None:
        pass


# The listening address.


def parse_listen(value: str, allow_remote: bool) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets, ``localhost``); non-loopback only with ``allow_remote``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("--listen must be HOST:PORT, e.g. 127.0.0.1:8000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("--listen needs an IP address (or localhost), not a name") from None
    if not address.is_loopback and not allow_remote:
        raise ValueError(
            "--listen is not a loopback address: anyone who can reach it would chat through"
            " the router as you (and with your device key); add --allow-remote if you mean it"
        )
    return host, int(port_text)
