"""Every discovery kind keeps one contract: deliver the current set, follow changes, forget
unwatched names, keep the last good set through a failure, and stop every thread on close."""

import shutil
import threading

import pytest
from dnsmasq import Dnsmasq

from ltcp import config
from ltcp.config import Address
from ltcp import interpreter
from ltcp.interpreter.dnslookup import DnsInterpreter
from ltcp.interpreter.fs import FsInterpreter
from ltcp.interpreter.namerd import NamerdInterpreter
from ltcp.interpreter.static import StaticInterpreter
from ltcp.testing.namerd import NamerdServer
from netutil import Deliveries, wait_for

A, B = [Address("127.0.0.1", 1001)], [Address("127.0.0.1", 1002, 3.0)]


class Source:
    changes = fails = False

    def name(self, name):
        """What ``name`` is called in this kind of discovery."""
        return name


class StaticSource(Source):

    def __init__(self, tmp_path):
        self.made = StaticInterpreter({})

    def set(self, name, addresses):
        self.made.names[name] = tuple(addresses)  # as if it had been in the configuration

    def interpreter(self):
        return self.made

    def close(self):
        pass


class FsSource(Source):
    changes = fails = True

    def __init__(self, tmp_path):
        self.root = tmp_path

    def _path(self, name):
        return self.root / name.rsplit("/", 1)[1]

    def set(self, name, addresses):
        path = self._path(name)
        staged = path.with_name(path.name + ".new")
        staged.write_text("".join(f"{a.ip} {a.port} {a.weight}\n" for a in addresses))
        staged.rename(path)  # atomically, as the README recommends

    def fail(self, name):
        path = self._path(name)
        path.unlink()
        path.mkdir()  # a directory can never be read

    def interpreter(self):
        return FsInterpreter(str(self.root), 0.05)

    def close(self):
        pass


class NamerdSource(Source):
    changes = fails = True

    def __init__(self, tmp_path):
        self.server = NamerdServer().start()

    def set(self, name, addresses):
        self.server.set(name, [(a.ip, a.port, a.weight) for a in addresses])

    def fail(self, name):
        self.server.failed(name)

    def interpreter(self):
        return NamerdInterpreter(self.server.url, "default", 0.2)

    def close(self):
        self.server.close()


class DnsSource(Source):
    """Names as /inet/NAME.test/1001, from dnsmasq's hosts file.

    Only the port of A can be said this way: changes and failures are tested
    in test_dns.py (records changed within their TTL, a server that dies).
    """

    def __init__(self, tmp_path):
        if shutil.which("dnsmasq") is None:
            pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
        self.server = Dnsmasq(str(tmp_path))
        self.hosts = {}

    def name(self, name):
        return f"/inet/{name.rsplit('/', 1)[1]}.test/{A[0].port}"

    def set(self, name, addresses):
        assert all((a.port, a.weight) == (A[0].port, 1.0) for a in addresses), "A records say no port or weight"
        host = name.rsplit("/", 1)[1]
        self.hosts[host] = [a.ip for a in addresses]
        self.server.set_hosts("".join(f"{ip} {host}.test\n" for host, ips in self.hosts.items() for ip in ips))
        wait_for(lambda: self.server.answers(f"{host}.test") == sorted(self.hosts[host]), message="dnsmasq reloaded")

    def interpreter(self):
        return DnsInterpreter([("127.0.0.1", self.server.port)], 1)

    def close(self):
        self.server.stop()


SOURCES = {"io.l5d.static": StaticSource, "io.l5d.fs": FsSource, "io.l5d.namerd.http": NamerdSource,
           "io.l5d.dns": DnsSource}


def test_every_configured_kind_has_an_interpreter_and_a_contract_test():
    classes = interpreter.kinds()
    assert set(classes) == set(config.INTERPRETERS) == set(SOURCES)
    assert all(cls.KIND == kind and cls.CONFIG is config.INTERPRETERS[kind] for kind, cls in classes.items())


@pytest.fixture
def kind(request, tmp_path):
    source = SOURCES[request.param](tmp_path)
    interpreter = source.interpreter()
    interpreter.start()
    yield source, interpreter
    interpreter.close()
    source.close()
    wait_for(lambda: not [t for t in threading.enumerate()
                          if t.name.startswith(("ltcp-fs", "ltcp-namerd", "ltcp-dns"))],
             timeout=5, message="every discovery thread stopped")


def kinds(capability=None):
    return pytest.mark.parametrize("kind", [k for k, source in sorted(SOURCES.items())
                                            if capability is None or getattr(source, capability)], indirect=True)


@kinds()
def test_a_watch_delivers_the_current_set_and_an_unknown_name_nothing(kind):
    source, interpreter = kind
    source.set("/svc/web", A)
    web, none = Deliveries(), Deliveries()
    interpreter.watch(source.name("/svc/web"), web)
    interpreter.watch(source.name("/svc/none"), none)
    assert web.wait(1) == A
    assert none.wait(1) is None
    assert interpreter.stats.snapshot()["requests"]


@kinds("changes")
def test_changes_are_followed_and_unwatched_names_forgotten(kind):
    source, interpreter = kind
    source.set("/svc/web", A)
    source.set("/svc/gone", A)
    web, gone = Deliveries(), Deliveries()
    interpreter.watch("/svc/web", web)
    interpreter.watch("/svc/gone", gone)
    assert web.wait(1) == A and gone.wait(1) == A
    interpreter.unwatch("/svc/gone")
    source.set("/svc/gone", B)
    source.set("/svc/web", B)
    assert web.wait(2) == B  # by then the unwatched name's change has had its chance too
    assert gone.updates == [A]


@kinds("fails")
def test_a_failure_keeps_the_last_good_set(kind):
    source, interpreter = kind
    source.set("/svc/web", A)
    source.set("/svc/probe", A)
    web, probe = Deliveries(), Deliveries()
    interpreter.watch("/svc/web", web)
    assert web.wait(1) == A
    source.fail("/svc/web")
    outcomes = interpreter.stats.snapshot()["requests"]
    wait_for(lambda: interpreter.stats.snapshot()["requests"] != outcomes, message="the failure seen")
    interpreter.watch("/svc/probe", probe)  # a later lookup, after the failure was seen
    probe.wait(1)
    assert web.updates == [A]
