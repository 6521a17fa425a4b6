"""Terminating a conversation: open plaintext chat with an OpenAI-style model server and seal its
stream. The router uses it for protocol v1/v1.1; an inference node's gate for protocol v2."""
