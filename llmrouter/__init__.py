"""llmrouter: a privacy-first LLM router speaking HPKE-sealed wire protocol v1."""

__version__ = "0.1.0"
