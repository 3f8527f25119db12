"""The wire protocols ltcp speaks before a stream's bytes flow: the PROXY protocol and TLS.

``proxyproto`` reads and writes PROXY v1/v2 headers; ``tls`` builds TLS
contexts from checked material, reads a ClientHello's SNI and names client
identities; ``tlssocket`` runs TLS over memory buffers on a nonblocking
socket.  Pure codecs and contexts: the data plane (accepting side) and the
balancer's connector (originating side) both use them; they import neither.
"""
