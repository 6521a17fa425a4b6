"""Trial test suite for llmrouter and the inference daemon."""
