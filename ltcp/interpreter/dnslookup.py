"""``io.l5d.dns``: endpoints straight from DNS, for users without namerd.

Two kinds of names:

* ``/inet/HOST/PORT``: the A and AAAA records of HOST, each address at PORT
  with weight 1 (an IP literal as HOST needs no lookup);
* ``/srv/RECORD``: the SRV records of RECORD (``_http._tcp.web.ns.svc.cluster.local``):
  each target's addresses at the record's port, the record's weight shared
  among them.  Only the lowest priority with any address serves; the others
  are backups for when it has none.

A name is looked up again when its answer's TTL runs out, clamped between
one second and ``periodSecs``.  NXDOMAIN, or no record at all, means the
name resolves to nothing, so its clients fail fast.  SERVFAIL, a refusal, a
timeout or an unreachable server keep the last good set; they are counted
and retried with backoff.  dnspython follows CNAME chains and retries a
truncated answer over TCP.  ``POLL_WORKERS`` threads share one schedule, so
a name whose server hangs delays only itself.
"""

import logging
import math
import threading
import time
from typing import NamedTuple, Optional

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..config import Address, DnsConfig
from ..names import canonical_ip, is_dns_name, parse_port
from .schedule import PollSchedule, backoff
from .stats import DiscoveryStats

__all__ = ["DnsInterpreter", "Query", "parse_name", "srv_addresses", "refresh_delay"]

log = logging.getLogger(__name__)

POLL_WORKERS = 8
QUERY_TIMEOUT = 2.0  # one name's whole lookup, every record type and server together
FIRST_BACKOFF = 0.5
MIN_REFRESH = 1.0
MAX_SRV_TARGETS = 256  # targets looked up per SRV answer (each may need two queries)
ZERO_WEIGHT_SHARE = 0.01  # an SRV weight of 0 among positive ones: "very rarely", as RFC 2782 asks
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class Query(NamedTuple):
    kind: str  # "inet", "ip" (/inet/ with an IP literal: nothing to look up) or "srv"
    host: str  # a lowercase DNS name, or the canonical IP literal
    port: Optional[int] = None  # "inet" and "ip"


def parse_name(name, domains=()):
    """A destination name -> Query; ValueError saying why it cannot be looked up.

    ``domains``, when given, are the only suffixes a looked-up name may have
    (a client choosing names through ``{sni}`` can then reach nothing else).
    """
    segments = name.split("/")[1:] if name.startswith("/") else []
    if len(segments) == 3 and segments[0] == "inet":
        _, host, port_text = segments
        port = parse_port(port_text)
        if port is None:
            raise ValueError(f"port must be 1..65535, not {port_text[:20]!r}")
        try:
            ip = canonical_ip(host)
        except ValueError:
            return Query("inet", _host(host, domains), port)
        if domains:  # an address lies in no domain: with {sni}, it would let clients reach any host
            raise ValueError(f"{host} is an IP address, outside the allowed domains")
        return Query("ip", ip, port)
    if len(segments) == 2 and segments[0] == "srv":
        return Query("srv", _host(segments[1], domains))
    raise ValueError("expected /inet/HOST/PORT or /srv/RECORD")


def _host(text, domains):
    host = text.lower().rstrip(".")
    if not (host.isascii() and is_dns_name(host)):
        raise ValueError(f"{text[:80]!r} is not a DNS name")
    if domains and not any(host == d or host.endswith("." + d) for d in domains):
        raise ValueError(f"{host} is outside the allowed domains ({', '.join(domains)})")
    return host


def srv_addresses(records, addresses_of):
    """SRV records -> the addresses of the lowest priority that has any.

    ``records`` are (priority, weight, port, target); ``addresses_of(target)``
    gives a target's IPs.  A record's weight is shared among its target's
    addresses; a weight of 0 counts as a tiny share beside positive ones, and
    as an equal one when all are 0.
    """
    for priority in sorted({r[0] for r in records}):
        group = [r for r in records if r[0] == priority]
        heaviest = max(r[1] for r in group)
        shares = {}  # (ip, port) -> weight: records naming the same address add up
        for _, weight, port, target in group:
            ips = addresses_of(target) if port else []
            for ip in ips:
                share = (weight or heaviest * ZERO_WEIGHT_SHARE or 1) / len(ips)
                shares[ip, port] = shares.get((ip, port), 0.0) + share
        if shares:
            return [Address(ip, port, weight) for (ip, port), weight in shares.items()]
    return []


def refresh_delay(ttl, period):
    """When to look a name up again: its TTL, clamped between one second and ``period``."""
    return min(max(ttl, MIN_REFRESH), period)


class Unresolved(Exception):
    """A lookup that says nothing about the name (the server failed or did not answer)."""

    def __init__(self, message, outcome):
        super().__init__(message)
        self.outcome = outcome


class _Name:
    """One watched name: what was last delivered and when to look again."""

    __slots__ = ("name", "query", "deliver", "last", "failures", "stopped")

    def __init__(self, name, query, deliver):
        self.name = name
        self.query = query
        self.deliver = deliver
        self.last = ()  # nothing delivered yet
        self.failures = 0
        self.stopped = threading.Event()


def _nobody(addresses):
    pass


class DnsInterpreter:
    KIND = "io.l5d.dns"
    CONFIG = DnsConfig

    def __init__(self, nameservers=(), period_secs=30.0, domains=(), workers=POLL_WORKERS, timeout=QUERY_TIMEOUT):
        self.period = period_secs
        self.domains = tuple(domains)
        self.workers = workers
        self.timeout = timeout
        self.stats = DiscoveryStats()
        self._resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout / 2  # one server's share: a second server still gets a try
        self._schedule = PollSchedule()
        self._entries = {}  # name -> _Name (reactor or hub thread only)
        self._threads = []

    @classmethod
    def from_config(cls, config):
        return cls(config.nameservers, config.period_secs, config.domains)

    def start(self):
        for _ in range(self.workers):
            thread = threading.Thread(target=self._run, name="ltcp-dns", daemon=True)
            thread.start()
            self._threads.append(thread)

    def watch(self, name, deliver):
        try:
            query = parse_name(name, self.domains)
        except ValueError as exc:
            self.stats.request("invalid")
            log.info("dns: %s cannot be looked up: %s", name, exc)
            deliver(None)
            return
        if query.kind == "ip":  # nothing to look up, now or later
            self.stats.request("ok")
            deliver([Address(query.host, query.port)])
            return
        entry = self._entries[name] = _Name(name, query, deliver)
        self.stats.track(name)
        self._schedule.add_first(entry)

    def unwatch(self, name):
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.stopped.set()
            entry.deliver = _nobody
            self._schedule.forget(entry)
            self.stats.forget(name)

    def close(self, timeout=1.0):
        for entry in list(self._entries.values()):
            entry.stopped.set()
        self._schedule.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the lookup threads ------------------------------------------------------------

    def _run(self):
        """Take due names off the schedule until it closes; a bug in one lookup is logged, not fatal."""
        while True:
            entry = self._schedule.take()
            if entry is None:
                return
            try:
                delay = self._refresh(entry)
            except Exception:
                log.exception("dns: looking up %s failed", entry.name)
                delay = self.period
            if not entry.stopped.is_set():
                self._schedule.add(entry, delay)

    def _refresh(self, entry):
        """Look ``entry`` up once and deliver what changed; the delay until the next look."""
        started = time.monotonic()
        try:
            addresses, ttl = self._lookup(entry.query, started + self.timeout)
        except Unresolved as exc:
            self.stats.request(exc.outcome)
            entry.failures += 1
            level = logging.WARNING if entry.failures == 1 else logging.DEBUG
            log.log(level, "dns: %s: %s (%s); keeping the last answer, retrying with backoff up to %gs",
                    entry.name, exc, exc.outcome, self.period)
            self.stats.name_state(entry.name, outcome=exc.outcome)
            return backoff(entry.failures, FIRST_BACKOFF, self.period)
        self.stats.observe(time.monotonic() - started)
        outcome = "ok" if addresses else "neg"
        self.stats.request(outcome)
        entry.failures = 0
        delay = refresh_delay(ttl, self.period)
        self.stats.name_state(entry.name, outcome=outcome, ttl=round(ttl, 3), updated=time.time())
        update = addresses or None
        if update != entry.last and not entry.stopped.is_set():
            entry.last = update
            entry.deliver(update)
        return delay

    def _lookup(self, query, deadline):
        """(addresses, ttl) for ``query``; addresses empty when DNS says there are none."""
        if query.kind == "inet":
            ips, ttl = self._addresses(query.host, deadline)
            return [Address(ip, query.port) for ip in ips], ttl
        answer, ttl = self._resolve(query.host, dns.rdatatype.SRV, deadline)
        if answer is None:
            return [], ttl
        records = sorted((r.priority, r.weight, r.port, _target(r.target))
                         for r in answer)[:MAX_SRV_TARGETS]  # (sorted first: the same cut however rotated)
        additional, additional_ttl = _additional_addresses(answer.response)
        ttls = [ttl, additional_ttl]

        def addresses_of(target):
            if not target:
                return []
            if target in additional:
                return additional[target]
            ips, target_ttl = self._addresses(target, deadline)
            ttls.append(target_ttl)
            return ips

        return srv_addresses(records, addresses_of), min(ttls)

    def _addresses(self, host, deadline):
        """(IPs of ``host`` from its A and AAAA records, sorted, the shortest TTL among them).

        Sorted because servers rotate the order of records: the same set in
        another order is no change to deliver.
        """
        ips, ttls = [], []
        for rdtype in _ADDRESS_TYPES:
            answer, ttl = self._resolve(host, rdtype, deadline)
            ttls.append(ttl)
            if answer is not None:
                ips.extend(canonical_ip(r.address) for r in answer)
        return sorted(ips), min(ttls)

    def _resolve(self, host, rdtype, deadline):
        """(answer, ttl), or (None, ttl to look again) when the name or the records do not exist."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unresolved("no answer in time", "timeout")
        try:
            answer = self._resolver.resolve(dns.name.from_text(host), rdtype, search=False, lifetime=left)
        except dns.resolver.NXDOMAIN as exc:
            return None, self._negative_ttl(next(iter(exc.responses().values()), None))
        except dns.resolver.NoAnswer as exc:
            return None, self._negative_ttl(exc.response())
        except dns.resolver.LifetimeTimeout:
            raise Unresolved("no answer in time", "timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise Unresolved(_first_error(exc), "servfail") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise Unresolved(str(exc) or type(exc).__name__, "error") from None
        return answer, answer.chaining_result.minimum_ttl


    def _negative_ttl(self, response):
        """How long "no such name or record" holds (RFC 2308: the SOA's TTL or its minimum, whichever
        is less), else ``periodSecs``."""
        ttls = [min(rrset.ttl, rrset[0].minimum) for rrset in getattr(response, "authority", ())
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
        return min(ttls, default=self.period)


def _target(name):
    """An SRV target as a lowercase name without the final dot; "" for "." (RFC 2782: not offered here)."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _additional_addresses(response):
    """(target -> IPs, their shortest TTL) from an SRV answer's additional section (a lookup saved per target)."""
    found, ttls = {}, [math.inf]
    for rrset in response.additional:
        if rrset.rdtype in _ADDRESS_TYPES:
            name = rrset.name.to_text(omit_final_dot=True).lower()
            found.setdefault(name, []).extend(canonical_ip(r.address) for r in rrset)
            ttls.append(rrset.ttl)
    return {name: sorted(ips) for name, ips in found.items()}, min(ttls)


def _first_error(exc):
    """What the servers said, briefly, from a NoNameservers error."""
    errors = exc.kwargs.get("errors") or []
    if errors:
        server, _, _, error, *_ = errors[0]
        return f"{server}: {error}"
    return "every server failed"
