"""The router daemon (``twistd llmrouter``): admission, keys, upstreams, the sealed stream."""
