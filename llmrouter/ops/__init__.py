"""Operator tools run by hand or by timers: ``llmrouter-keys`` and ``llmrouter-pki``."""
