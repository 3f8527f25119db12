"""A real DNS server for the tests: dnsmasq on a loopback port, answering only from data the test gives it."""

import getpass
import os
import signal
import socket
import subprocess
import time

import dns.nameserver
import dns.resolver

__all__ = ["Dnsmasq", "free_dns_port"]


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
    NXDOMAIN, never forwarded anywhere."""

    def __init__(self, directory, hosts="", records=()):
        self.hosts_path = os.path.join(directory, "dns-hosts")
        with open(self.hosts_path, "w") as f:
            f.write(hosts)
        self.port = free_dns_port()
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", f"--port={self.port}",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
             f"--addn-hosts={self.hosts_path}", "--local=/test/", "--local-ttl=1", f"--user={getpass.getuser()}",
             *records],
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
