"""twistd plugins: ``twistd llmrouter`` and ``twistd inference``.

Only ServiceMaker instances live here: they import their ``tap`` modules lazily, so building
Twisted's plugin cache never loads llama.cpp or the key store.
"""

from twisted.application.service import ServiceMaker

llmrouter = ServiceMaker(
    "llmrouter",
    "llmrouter.router.tap",
    "Encrypted (HPKE) chat router streaming llama.cpp tokens as sealed SSE.",
    "llmrouter",
)

inference = ServiceMaker(
    "inference",
    "inference.tap",
    "llama.cpp inference daemon with an OpenAI-compatible streaming API.",
    "inference",
)
