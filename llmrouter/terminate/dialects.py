"""What each kind of inference backend speaks, and how to tell them apart.

Every backend takes OpenAI's streaming ``POST /v1/chat/completions``, but they differ in which
protocol v1.1 fields they implement and in a few spellings. A backend that silently ignored a field
(answering free text with a 200 to a request for a JSON schema) would break the promise that an
unsupported field is refused by name, so the router only sends a request to a backend whose dialect
implements every feature the request uses (:meth:`llmrouter.chat.ChatRequest.features`), and
refuses it otherwise.

Kinds are pinned per endpoint (``kind=``) or recognised from ``owned_by`` in ``GET /v1/models``;
llama-server also says in ``GET /props`` whether its chat template handles tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmrouter.chat import MODEL_NAME, ChatRequest

__all__ = ["DIALECTS", "KINDS", "MAX_MODELS", "Dialect", "models_from", "template_limits"]

MAX_MODELS = 64  # names taken from one backend's model list

EVERYTHING = frozenset(
    {
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
        "parallel_tool_calls",
        "logprobs",
        "reasoning_effort",
    }
)


@dataclass(frozen=True)
class Dialect:
    """One kind of backend: the features it implements and how its body is spelled.

    ``cache_key``: the backend keeps a prompt cache per ``X-LLMRouter-Cache-Key`` (our daemon);
    no other kind is sent that header. The others share one prompt cache between every user,
    a timing side channel (a prompt another user sent answers faster), which the router closes
    where the backend lets it: ``cache_salt`` (vLLM) isolates its prefix cache per salt, so it
    gets the same per-device keyed value our daemon gets, or a fresh one per request without a
    device; ``prompt_cache_off`` (llama-server) turns its slots' prompt reuse off
    (``cache_prompt: false``) unless the operator shares it on purpose
    (``LLAMA_SERVER_CACHE_PROMPT``). docs/inference.md, "Backends and privacy".
    """

    kind: str
    features: frozenset[str]
    max_tokens_field: str = "max_tokens"
    cache_key: bool = False
    cache_salt: bool = False
    prompt_cache_off: bool = False

    def body(
        self,
        request: ChatRequest,
        model: str | None,
        salt: str = "",
        share_prompt_cache: bool = False,
    ) -> bytes:
        doc = request.to_openai(model, self.max_tokens_field)
        if self.cache_salt:
            doc["cache_salt"] = salt
        if self.prompt_cache_off and not share_prompt_cache:
            doc["cache_prompt"] = False
        return json.dumps(doc).encode("utf-8")


DIALECTS = {
    # Our daemon: everything. Tools reach a template without tool support as the generic call
    # format in the system message; JSON output and forced calls are grammar-constrained; a field
    # it does not know it refuses by name (docs/inference.md). It keeps a prompt cache per key.
    "llmrouter": Dialect("llmrouter", EVERYTHING, cache_key=True),
    # llama-server --jinja: everything; tools only when its template handles them (see /props).
    # Its slots reuse any earlier user's prompt unless cache_prompt is false.
    "llama-server": Dialect("llama-server", EVERYTHING, prompt_cache_off=True),
    # vLLM: everything (tools need --enable-auto-tool-choice, reasoning a --reasoning-parser);
    # max_tokens is deprecated there in favour of max_completion_tokens.
    # Automatic prefix caching is shared between requests unless they carry a cache_salt.
    "vllm": Dialect("vllm", EVERYTHING, "max_completion_tokens", cache_salt=True),
    # Ollama's OpenAI API: no parallel_tool_calls.
    "ollama": Dialect("ollama", EVERYTHING - {"parallel_tool_calls"}),
    # Anything else that speaks the OpenAI API: everything is forwarded as OpenAI spells it.
    "openai": Dialect("openai", EVERYTHING),
}
KINDS = (*DIALECTS, "auto")
_OWNERS = {
    "llmrouter": "llmrouter",
    "llamacpp": "llama-server",
    "vllm": "vllm",
    "library": "ollama",
}


def models_from(body: bytes) -> tuple[tuple[str, ...], str | None]:
    """Model names (valid ones, at most MAX_MODELS) and the recognised kind from /v1/models."""
    try:
        doc = json.loads(body)
        entries = doc["data"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return (), None
    names: list[str] = []
    kind = None
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = entry.get("id")
        if isinstance(name, str) and MODEL_NAME.fullmatch(name) and name not in names:
            names.append(name)
        if kind is None and isinstance(entry.get("owned_by"), str):
            kind = _OWNERS.get(entry["owned_by"])
        if len(names) == MAX_MODELS:
            break
    return tuple(names), kind


def template_limits(body: bytes) -> frozenset[str]:
    """Features llama-server's chat template cannot carry, from ``chat_template_caps`` in /props."""
    try:
        caps = json.loads(body)["chat_template_caps"]
        if not isinstance(caps, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return frozenset()
    missing: set[str] = set()

    def no(name: str) -> bool:
        return caps.get(name) is False

    if no("supports_tools") and no("supports_tool_calls"):
        missing |= {"tools", "parallel_tool_calls"}
    if no("supports_parallel_tool_calls"):
        missing.add("parallel_tool_calls")
    if no("supports_reasoning_effort"):
        missing.add("reasoning_effort")
    return frozenset(missing)
