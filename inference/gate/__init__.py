"""Protocol v2 on the inference node: its keys, ``GET /v2/keys`` and ``POST /v2/chat``.

The node holds the keys that open prompts (issue 22): requests arrive from the router still
sealed to this node, are opened here, run through :mod:`llmrouter.terminate` against the node's
model server (our engine, or a fronted llama-server, vLLM, Ollama or OpenAI-style server) and
stream back sealed, so the router relays bytes it cannot read.
"""
