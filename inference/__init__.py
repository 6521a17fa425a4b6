"""inference: a llama.cpp daemon with an OpenAI-compatible streaming HTTP API."""

__version__ = "0.1.0"
