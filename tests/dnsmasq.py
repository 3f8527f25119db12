"""DNS servers for the tests: dnsmasq on a loopback port, answering only from data the test gives it, and a
tiny UDP server of our own that fails queries in a chosen way."""

import getpass
import os
import signal
import socket
import subprocess
import threading
import time

import dns.exception
import dns.message
import dns.nameserver
import dns.resolver

__all__ = ["Dnsmasq", "FailingServer", "free_dns_port"]


def free_dns_port():
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq needs both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


class Dnsmasq:
    """``dnsmasq`` serving the zone ``test`` from a hosts file (``set_hosts`` rewrites it and
    reloads with SIGHUP) and from ``records``: extra options such as ``--srv-host=...`` and
    ``--host-record=...``.  Answers carry a TTL of one second; a name it does not know is
    NXDOMAIN, never forwarded anywhere.

    With ``local=False`` it owns no zone: what its data does not answer (a name it does not know,
    or the AAAA of a name it knows only an A for) is forwarded to a ``--server=`` given in
    ``records``, or refused without one, as a dnsmasq with ``--no-resolv`` does in the field."""

    def __init__(self, directory, hosts="", records=(), local=True):
        self.hosts_path = os.path.join(directory, "dns-hosts")
        with open(self.hosts_path, "w") as f:
            f.write(hosts)
        self.port = free_dns_port()
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", f"--port={self.port}",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
             f"--addn-hosts={self.hosts_path}", *(["--local=/test/"] if local else []), "--local-ttl=1",
             f"--user={getpass.getuser()}", *records],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_answering()

    @property
    def nameserver(self):
        return f"127.0.0.1:{self.port}"

    def _wait_answering(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read()}")
            with socket.socket() as probe:  # it listens on TCP as soon as it answers at all
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("dnsmasq did not start")

    def set_hosts(self, hosts):
        with open(self.hosts_path, "w") as f:
            f.write(hosts)
        self.proc.send_signal(signal.SIGHUP)

    def answers(self, host):
        """The IPv4 addresses dnsmasq gives for ``host`` now (empty for none)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        try:
            return sorted(r.address for r in resolver.resolve(host, "A", lifetime=2))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()


class FailingServer:
    """A UDP DNS server on 127.0.0.1 that answers every query with an error code: ``rcodes`` maps a
    record type (``dns.rdatatype.A``) to the rcode it gets (``dns.rcode.SERVFAIL``); a type not
    in it gets no reply at all, so ``FailingServer({})`` reads queries and never answers.
    ``asked`` lists the record type of every query read."""

    def __init__(self, rcodes):
        self.rcodes = rcodes
        self.asked = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="failing-dns", daemon=True)
        self._thread.start()

    @property
    def nameserver(self):
        return f"127.0.0.1:{self.port}"

    def _serve(self):
        while True:
            data, peer = self.sock.recvfrom(4096)
            if self._stopping:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            if not query.question:
                continue
            rdtype = query.question[0].rdtype
            self.asked.append(rdtype)
            rcode = self.rcodes.get(rdtype)
            if rcode is not None:
                response = dns.message.make_response(query)
                response.set_rcode(rcode)
                self.sock.sendto(response.to_wire(), peer)

    def stop(self):
        """End the serving thread (a datagram of our own wakes it) and close the socket."""
        self._stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(5)
        self.sock.close()
