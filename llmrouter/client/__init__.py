"""The client side of the wire: the Python library, ``llmrouter-client`` and its local proxy."""

from llmrouter.client.library import ChatError, Client, Conversation, Reply, load_device_key

__all__ = ["ChatError", "Client", "Conversation", "Reply", "load_device_key"]
