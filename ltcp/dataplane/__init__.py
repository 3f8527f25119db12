"""The data plane: from an accepted connection to its close, on one reactor thread per worker.

``server`` accepts and owns each stream; ``intake`` reads what routing needs
first (a PROXY header, a TLS handshake, the SNI); ``router`` and ``binder``
find the destination's balancer; ``connector`` opens the upstream socket;
``duplex`` moves the bytes; ``accesslog`` writes a line per stream; ``app``
puts a worker's routers together.  ``tls`` and ``tlssocket`` are the TLS
contexts, their material and TLS over memory buffers.

It imports the reactor (``ltcp.loop``), the shared bottom modules, the
balancer and the configuration's classes; never the process model or the
admin server (``app`` alone reaches them, lazily, for the in-process mode
tests use).
"""
