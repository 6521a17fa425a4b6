"""Wire protocol v2, the blind router (docs/protocol.md, part II), shared by every side.

:mod:`~llmrouter.v2.certs`: operator certificates, node key sets and the v2 key document (build
and verify). :mod:`~llmrouter.v2.request`: the request's two layers (the router's RFC 9458
encapsulation, the nodes' content key and its wraps) and the device proof.
:mod:`~llmrouter.v2.response`: the router's sealed ``event: router`` and the client's opener of
a v2 stream. Nothing here does I/O; every error is a
:class:`~llmrouter.protocol.ProtocolError` (requests) or a
:class:`~llmrouter.protocol.KeyDocumentError` (documents) with a fixed message.
"""
