"""A nonblocking TLS stream whose TLS engine works on memory buffers (``ssl.MemoryBIO``).

Why not ``ssl.SSLSocket``: the only way Python offers to send a
close_notify is ``unwrap()``, and on a socket it calls OpenSSL's
``SSL_shutdown`` twice; the second call reads the socket, looking for the
peer's close_notify, and a record of application data that arrives first is
thrown away (OpenSSL 3 fails the session with
``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``).  So a client that half-closed
after its request lost the answer still on its way.  Here the engine reads
only what this class fed it, and the close_notify is sealed only once the
engine holds no whole record: there is nothing it could throw away.

To the duplex it is a socket: ``recv_into`` and ``send`` carry plaintext,
with a socket's results (``BlockingIOError`` when nothing is there yet, 0 at
the end of the stream).  One rule comes from ``SSL_write``: when ``send``
returns less than it was given, the bytes it did take may already be sealed,
so it must be called again with the same bytes (the duplex keeps them, and
does).  Everything else (``fileno``, ``close``, ``setsockopt``, the unbound
``socket.socket.recv`` that peeks) reaches the socket beneath.
"""

import _socket
import socket
import ssl

from ..loop import READ, WRITE

__all__ = ["TlsSocket"]

RECORD_READ = 17 * 1024  # ciphertext taken from the kernel at once: a whole record of 16 KiB and its overhead


class TlsSocket(socket.socket):
    """One TLS session over a connected nonblocking socket (see the module docstring)."""

    __slots__ = ("_tls", "_incoming", "_outgoing", "_backlog", "_sealed", "_exhausted", "_closing")

    def __init__(self, sock, context, server_side=False, server_hostname=None):
        """Take over ``sock``'s descriptor (same number: a reactor registration carries on)."""
        super().__init__(sock.family, sock.type, sock.proto, sock.detach())
        self.setblocking(False)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side, server_hostname)
        self._backlog = b""  # sealed bytes the kernel has not taken yet
        self._sealed = 0  # plaintext bytes of the last ``send`` whose records are still in the backlog
        self._exhausted = True  # the engine was found to hold no whole record since the last feed
        self._closing = False  # our close_notify is sealed

    def __repr__(self):
        return f"<TlsSocket fd={self.fileno()} backlog={len(self._backlog)}{' closing' if self._closing else ''}>"

    # -- the session, once established -------------------------------------------

    @property
    def session_object(self):
        """The ``ssl.SSLObject`` (what an SNI callback is given for this connection)."""
        return self._tls

    def version(self):
        return self._tls.version()

    def getpeercert(self, binary_form=False):
        return self._tls.getpeercert(binary_form)

    def selected_alpn_protocol(self):
        return self._tls.selected_alpn_protocol()

    # -- handshake ---------------------------------------------------------------

    def handshake(self):
        """Advance the handshake: 0 once it is done, else ``loop.READ`` or ``WRITE`` to wait for.

        Raises ``ssl.SSLError`` or ``OSError`` when it fails (an alert the
        engine wrote about it is sent first, when the kernel takes it).
        """
        tls = self._tls
        while True:
            if self._backlog and not self._flush():
                return WRITE
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                self._send_alert()
                raise
            if self._outgoing.pending:
                self._backlog = self._outgoing.read()
                if not self._flush():
                    return WRITE
            if done:
                self._exhausted = not self._incoming.pending  # (the peer may have sent data behind its Finished)
                return 0
            try:
                data = _socket.socket.recv(self, RECORD_READ)
            except (BlockingIOError, InterruptedError):
                return READ
            if not data:
                raise ConnectionAbortedError("the peer closed the connection during the TLS handshake")
            self._incoming.write(data)

    def _send_alert(self):
        try:
            _socket.socket.send(self, self._outgoing.read())
        except OSError:
            pass  # the handshake's own failure is what gets reported

    # -- plaintext -----------------------------------------------------------------

    def recv_into(self, buffer, nbytes=0, flags=0):
        """Decrypted bytes into ``buffer``: how many, 0 at the end of the stream, BlockingIOError for none yet.

        The end is the peer's close_notify, or the socket's EOF without one
        (as ``suppress_ragged_eofs`` has it for ``SSLSocket``).
        """
        tls = self._tls
        while True:
            if not self._exhausted:
                try:
                    n = tls.read(len(buffer), buffer)
                except ssl.SSLWantReadError:
                    self._exhausted = True
                except ssl.SSLZeroReturnError:
                    return 0  # the peer's close_notify, after our own
                else:
                    # Another read would fail unless a record, or part of one, is left: skip that try.
                    self._exhausted = not (self._incoming.pending or tls.pending())
                    if self._outgoing.pending:
                        self._queue_own_records()
                    return n
                if self._outgoing.pending:
                    self._queue_own_records()
            data = _socket.socket.recv(self, RECORD_READ)  # (BlockingIOError: nothing yet)
            if not data:
                return 0
            self._incoming.write(data)
            self._exhausted = False

    def pending(self):
        """Whether a read may find something without the socket becoming readable (it is in the engine)."""
        return not self._exhausted

    def send(self, data, flags=0):
        """Seal ``data`` and send it: ``len(data)`` once all of it is out, else 0 (call again, same bytes)."""
        if self._backlog and not self._flush():
            return 0
        if self._sealed:  # the records of an earlier call, now all out: that call's bytes are sent
            sent, self._sealed = self._sealed, 0
            return sent
        self._tls.write(data)
        self._backlog = self._outgoing.read()
        if self._flush():
            return len(data)
        self._sealed = len(data)
        return 0

    @property
    def backlogged(self):
        """Whether sealed bytes wait for the kernel (``flush`` sends them)."""
        return bool(self._backlog)

    def flush(self):
        """Send sealed bytes that wait; whether none are left."""
        return not self._backlog or self._flush()

    def _flush(self):
        backlog = self._backlog
        try:
            sent = _socket.socket.send(self, backlog)
        except (BlockingIOError, InterruptedError):
            return False
        if sent == len(backlog):
            self._backlog = b""
            return True
        self._backlog = memoryview(backlog)[sent:]
        return False

    def _queue_own_records(self):
        """Records the engine wrote while reading (the answer to a key update): out after what waits."""
        self._backlog = bytes(self._backlog) + self._outgoing.read()
        self._flush()

    # -- the end -------------------------------------------------------------------

    def close_notify(self):
        """Seal our close_notify behind everything sent so far, and send; whether all of it is out.

        Call it only while ``pending()`` is false (or after the end of the
        stream was read): ``unwrap`` then makes the engine look for the
        peer's close_notify among records it does not have, and it has none
        to throw away.  Safe to call again: later calls only send.
        """
        if not self._closing:
            self._closing = True
            try:
                self._tls.unwrap()
            except ssl.SSLWantReadError:
                pass  # ours is sealed; the peer's has not come
            self._backlog = bytes(self._backlog) + self._outgoing.read()
        return self.flush()

