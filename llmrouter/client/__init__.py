"""The client side of the wire: the Python library, ``llmrouter-client`` and its local proxy.

What an app needs from here: :class:`Client` (one router), :class:`Conversation` (a history kept
on this side), the request types (:class:`ChatRequest`, :class:`Message`, :class:`Tool`,
:class:`ResponseFormat`), :class:`Reply` and :class:`ChatError`. docs/clients.md has an example.
"""

from llmrouter.chat import ChatRequest, Message, ResponseFormat, Tool, ToolCall
from llmrouter.client.library import ChatError, Client, Conversation, Reply, load_device_key

__all__ = [
    "ChatError",
    "ChatRequest",
    "Client",
    "Conversation",
    "Message",
    "Reply",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "load_device_key",
]
