"""The end of a TLS stream: every way it can close, with bytes still queued, arrives whole and counts as done.

A half-closed stream once lost its answer when ltcp originated TLS: Python's
``unwrap()`` throws away application data it reads while looking for the
peer's close_notify, and the peer's close_notify after our own was taken
for an error.  Each case below runs one stream through ltcp with megabytes
still in flight when the first side ends.
"""

import os
import select
import socket
import ssl

import pytest
import trustme

from netutil import Backend, Proxy, wait_for

REQUEST = os.urandom(256 * 1024)
ANSWER = os.urandom(2 * 1024 * 1024)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context(cafile=str(root / "ca.pem"))
    return {"ca": str(root / "ca.pem"), "identity": {"privateKey": str(root / "key.pem"),
                                                     "certs": [str(root / "cert.pem")]},
            "server": server, "client": client}


class Peer:
    """One end of a stream, run by hand over a blocking socket: plain, or TLS on memory buffers.

    It sends, ends its side (TLS: a close_notify, or a bare FIN when
    ``close_notify`` is false) and reads to the end, all at once or reading
    first, as a real client or server would; it never discards what it reads
    (its close_notify is sealed only when no whole record waits).
    """

    def __init__(self, sock, context=None, server_side=False, close_notify=True):
        self.sock = sock
        self.close_notify = close_notify
        self.tls = None
        if context is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side,
                                        None if server_side else "localhost")
        self.wire = bytearray()  # bytes for the socket, sealed if TLS
        self.received = bytearray()
        self.eof = False

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "closed during the handshake"
                self.incoming.write(data)
        self.sock.sendall(self.outgoing.read())

    def converse(self, payload, read_first=False, timeout=20):
        """Send ``payload`` and end, after reading to the end when ``read_first``; read to the end. What came."""
        if self.tls is not None:
            self.handshake()
        payload = memoryview(payload)
        ended = False
        self.sock.setblocking(False)
        while not (ended and self.eof):
            may_send = not read_first or self.eof
            if may_send and payload and len(self.wire) < 1 << 20:
                self._queue(payload[:1 << 16])
                payload = payload[1 << 16:]
            elif may_send and not payload and not ended and not self.wire:
                self._end()
                ended = True
            readable, writable, _ = select.select([self.sock], [self.sock] if self.wire else [], [], timeout)
            assert readable or writable, "the stream stalled"
            if writable:
                self._send()
            if readable:
                self._receive()
        self.sock.close()
        return bytes(self.received)

    def _queue(self, chunk):
        if self.tls is None:
            self.wire += chunk
        else:
            self.tls.write(chunk)
            self.wire += self.outgoing.read()

    def _send(self):
        try:
            del self.wire[:self.sock.send(self.wire)]
        except BlockingIOError:
            pass

    def _end(self):
        if self.tls is not None and self.close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass
            self.sock.setblocking(True)
            self.sock.sendall(self.outgoing.read())
            self.sock.setblocking(False)
        self.sock.shutdown(socket.SHUT_WR)

    def _receive(self):
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            return
        if self.tls is None:
            self.received += data
            return
        self.incoming.write(data)
        while True:  # everything decrypted now, so no whole record is left when _end seals
            try:
                chunk = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.received += chunk


def router(label, names, tls=None, client_tls=None):
    server = {"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 5000}
    if tls:
        server["tls"] = {"defaultIdentity": tls}
    document = {"label": label, "interpreter": {"kind": "io.l5d.static", "names": names}, "servers": [server]}
    if client_tls:
        document["client"] = {"tls": client_tls}
    return {"routers": [document]}


CASES = [(topology, first, close_notify)
         for topology in ("terminated", "originated", "both")
         for first in ("client", "backend", "both")
         for close_notify in ((True,) if topology == "both" else (True, False))]


@pytest.mark.parametrize("topology, first, close_notify", CASES)
def test_a_tls_stream_ends_whole_however_it_closes(pki, topology, first, close_notify):
    """Client and backend each send, end and read to the end, in the order ``first`` says; with
    ``close_notify`` false the TLS peer (client or backend) ends with a bare FIN instead."""
    backend_tls = pki["server"] if topology == "originated" else None
    results = {}

    def serve(conn):
        peer = Peer(conn, backend_tls, server_side=True, close_notify=close_notify)
        results["backend"] = peer.converse(ANSWER, read_first=first == "client")

    backend = Backend(serve)
    proxies = []
    try:
        if topology in ("terminated", "both"):
            proxies.append(Proxy(router("terminate", {"/svc/a": [backend.addr]}, tls=pki["identity"])))
        if topology in ("originated", "both"):
            upstream = f"127.0.0.1:{proxies[0].port()}" if proxies else backend.addr
            proxies.append(Proxy(router("originate", {"/svc/a": [upstream]},
                                        client_tls={"dnsName": "localhost", "trustCerts": [pki["ca"]]})))
        front = proxies[-1]
        client_tls = pki["client"] if topology == "terminated" else None
        client = Peer(front.connect(), client_tls, close_notify=close_notify)
        received = client.converse(REQUEST, read_first=first == "backend")
        assert len(received) == len(ANSWER) and received == ANSWER
        wait_for(lambda: "backend" in results, message="the backend's end")
        assert len(results["backend"]) == len(REQUEST) and results["backend"] == REQUEST
        for proxy in proxies:
            wait_for(lambda proxy=proxy: proxy.listener.finished == 1, message="the stream to end")
            assert dict(proxy.listener.endings) == {"done": 1} and not proxy.listener.failures
    finally:
        for proxy in proxies:
            proxy.stop()
        backend.close()
