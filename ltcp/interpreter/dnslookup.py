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
name resolves to nothing, so its clients fail fast.

A query DNS does not answer (SERVFAIL, a refusal, a timeout, an unreachable
server) discards nothing: the other queries' answers serve, merged with the
failed query's last answer if it had one.  When no query answers, the last
answer stands; a name that never had one resolves to nothing, so its clients
fail fast instead of waiting out their connect timeout.  Failures are counted,
logged once per change and retried with backoff.  dnspython follows CNAME
chains and retries a truncated answer over TCP.  ``POLL_WORKERS`` threads
share one schedule, so a name whose server hangs delays only itself.
"""

import logging
import math
import threading
import time
from typing import NamedTuple, Optional

import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from ..config import Address, DnsConfig
from ..names import canonical_ip, is_dns_name, parse_port
from .schedule import PollSchedule, backoff
from .stats import DiscoveryStats

__all__ = ["DnsInterpreter", "Failure", "Query", "lookup_outcome", "merge_families", "parse_name", "refresh_delay",
           "srv_addresses"]

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


class Failure(NamedTuple):
    """A query DNS did not answer, and how: refused, servfail, timeout, unreachable (no server could
    be reached) or error (any other failure: an unexpected rcode, a malformed answer)."""

    query: str  # the record type and name asked: "AAAA web.test"
    kind: str
    detail: str  # what the server said, or did not, briefly

    def __str__(self):
        return f"{self.query} {self.kind} ({self.detail})"


def merge_families(outcomes, kept):
    """One host's IPs from its per-family outcomes, and the answers to keep for its next lookup.

    ``outcomes`` maps a family ("A", "AAAA") to the IPs its query gave (empty: no such name or
    record) or to a ``Failure``.  A failed family counts with its answer in ``kept`` if it ever
    had one, and with nothing otherwise: one family's failure never discards another's answer.
    """
    answers = {}
    for family, outcome in outcomes.items():
        if not isinstance(outcome, Failure):
            answers[family] = tuple(outcome)
        elif family in kept:
            answers[family] = kept[family]
    return sorted({ip for ips in answers.values() for ip in ips}), answers


def lookup_outcome(answered, failures, addresses):
    """How one lookup of a name is counted.

    ``ok`` or ``neg`` when every query answered; ``partial`` when some failed but others
    answered (what answered serves); else how the first query failed (nothing new is known).
    """
    if not failures:
        return "ok" if addresses else "neg"
    return "partial" if answered else failures[0].kind


class _Lookup:
    """One lookup of one name: its queries, what answered, what failed, the answers to keep.

    ``kept`` (host -> family -> IPs) holds the answers of the name's previous lookup: a query
    that fails now counts with its last answer.  One deadline bounds the whole lookup.
    """

    def __init__(self, resolver, deadline, kept, period):
        self.resolver = resolver
        self.deadline = deadline
        self.kept = kept
        self.period = period
        self.keep = {}  # host -> family -> IPs: ``kept`` for the next lookup
        self.failures = []
        self.ttls = []  # of every query that answered
        self.answered = False  # did any query answer?
        self.stale = False  # does a failed query count with its last answer?

    def run(self, query):
        """The addresses of ``query``, as far as DNS answered."""
        if query.kind == "inet":
            return [Address(ip, query.port) for ip in self.addresses(query.host)]
        answer = self.query(query.host, dns.rdatatype.SRV)
        if answer is None or isinstance(answer, Failure):
            return []
        records = sorted((r.priority, r.weight, r.port, _target(r.target))
                         for r in answer)[:MAX_SRV_TARGETS]  # (sorted first: the same cut however rotated)
        additional, additional_ttl = _additional_addresses(answer.response)
        self.ttls.append(additional_ttl)

        def addresses_of(target):
            if not target:
                return []
            return additional[target] if target in additional else self.addresses(target)

        return srv_addresses(records, addresses_of)

    def addresses(self, host):
        """``host``'s IPs from its A and AAAA records, sorted (servers rotate them: no change to deliver).

        The A query may take half the time left, so that a server ignoring one
        family still leaves the other time to answer.
        """
        outcomes = {}
        for share, rdtype in zip((2, 1), _ADDRESS_TYPES):  # A: half the time left; AAAA: the rest
            answer = self.query(host, rdtype, share)
            outcomes[dns.rdatatype.to_text(rdtype)] = (
                answer if isinstance(answer, Failure) else [canonical_ip(r.address) for r in answer or ()])
        ips, answers = merge_families(outcomes, self.kept.get(host, {}))
        self.keep[host] = answers
        self.stale = self.stale or any(isinstance(outcomes[family], Failure) for family in answers)
        return ips

    def query(self, host, rdtype, share=1):
        """``host``'s records of ``rdtype``; None when the name or the records do not exist;
        a ``Failure`` (also recorded) when DNS did not say.  The query may take 1/``share``
        of the time left."""
        asked = f"{dns.rdatatype.to_text(rdtype)} {host}"
        left = self.deadline - time.monotonic()
        if left <= 0:
            return self._failed(Failure(asked, "timeout", "not asked: the lookup's time was up"))
        try:
            answer = self.resolver.resolve(dns.name.from_text(host), rdtype, search=False, lifetime=left / share)
        except dns.resolver.NXDOMAIN as exc:
            return self._negative(next(iter(exc.responses().values()), None))
        except dns.resolver.NoAnswer as exc:
            return self._negative(exc.response())
        except dns.resolver.LifetimeTimeout:
            return self._failed(Failure(asked, "timeout", f"no answer in {left / share:.1f}s"))
        except dns.resolver.NoNameservers as exc:
            return self._failed(_server_failure(asked, exc))
        except (dns.exception.DNSException, OSError) as exc:
            return self._failed(Failure(asked, "error", str(exc) or type(exc).__name__))
        self._answer(answer.chaining_result.minimum_ttl)
        return answer

    def _answer(self, ttl):
        self.answered = True
        self.ttls.append(ttl)

    def _negative(self, response):
        """No such name or record: an answer, holding as long as RFC 2308 says (the SOA's TTL or
        its minimum, whichever is less), else ``periodSecs``."""
        ttls = [min(rrset.ttl, rrset[0].minimum) for rrset in getattr(response, "authority", ())
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
        self._answer(min(ttls, default=self.period))
        return None

    def _failed(self, failure):
        self.failures.append(failure)
        return failure


class _Name:
    """One watched name: what was last delivered and when to look again."""

    __slots__ = ("name", "query", "deliver", "last", "kept", "answered", "trouble", "failures", "stopped")

    def __init__(self, name, query, deliver):
        self.name = name
        self.query = query
        self.deliver = deliver
        self.last = ()  # nothing delivered yet
        self.kept = {}  # the answers of the last lookup that had any (see _Lookup)
        self.answered = False  # has any lookup of it ever answered?
        self.trouble = None  # what was last logged of its failures (None: nothing is failing)
        self.failures = 0  # lookups in a row with a failed query
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
        self._resolver.timeout = timeout / 4  # one server's share of a query's half: a second server gets a try
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
        """Look ``entry`` up once, deliver what changed, say what failed; the delay until the next look."""
        started = time.monotonic()
        lookup = _Lookup(self._resolver, started + self.timeout, entry.kept, self.period)
        addresses = lookup.run(entry.query)
        outcome = lookup_outcome(lookup.answered, lookup.failures, addresses)
        self.stats.request(outcome)
        failed = [f"{failure.query} {failure.kind}" for failure in lookup.failures]
        ttl = min(lookup.ttls, default=None)
        if lookup.answered:
            self.stats.observe(time.monotonic() - started)
            self.stats.name_state(entry.name, outcome=outcome, failed=failed, ttl=round(ttl, 3), updated=time.time())
            entry.kept, entry.answered = lookup.keep, True
            update = addresses or None
        else:  # nothing new: the last answer stands; with none, clients fail at once rather than wait for one
            self.stats.name_state(entry.name, outcome=outcome, failed=failed)
            update = entry.last if entry.answered else None
        self._report(entry, lookup, update)
        if update != entry.last and not entry.stopped.is_set():
            entry.last = update
            entry.deliver(update)
        return self._next_delay(entry, lookup.failures, ttl)

    def _next_delay(self, entry, failures, ttl):
        """When what answered expires (``ttl``, None if nothing did); sooner, on the backoff, while a query fails."""
        if not failures:
            entry.failures = 0
            return refresh_delay(ttl, self.period)
        entry.failures += 1
        retry = backoff(entry.failures, FIRST_BACKOFF, self.period)
        return retry if ttl is None else min(retry, refresh_delay(ttl, self.period))

    def _report(self, entry, lookup, update):
        """Log what fails and what serves when that changes; a retry that changes nothing only at DEBUG."""
        if not lookup.failures:
            if entry.trouble is not None:
                log.info("dns: %s: every query answers again (%s)", entry.name, _count(update))
            entry.trouble = None
            return
        if lookup.answered:
            serving = "stale" if lookup.stale else "partial"
        else:
            serving = "kept" if entry.answered else "none"
        trouble = (frozenset((failure.query, failure.kind) for failure in lookup.failures), serving)
        level = logging.DEBUG if trouble == entry.trouble else logging.WARNING
        entry.trouble = trouble
        log.log(level, "dns: %s: %s; %s; retrying with backoff up to %gs", entry.name,
                ", ".join(map(str, lookup.failures)), _SERVING[serving].format(_count(update)), self.period)


_SERVING = {  # what a name serves while some of its queries fail
    "partial": "serving what answered ({})",
    "stale": "serving what answered and the last answer of what failed ({})",
    "kept": "keeping the last answer ({})",
    "none": "no answer yet, none to keep: its clients fail at once until one comes",
}


def _count(addresses):
    """"no addresses", "1 address", "3 addresses"."""
    n = len(addresses or ())
    return f"{n or 'no'} address{'' if n == 1 else 'es'}"


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


def _server_failure(asked, exc):
    """A ``Failure`` from dnspython's NoNameservers: how the first server failed (they rarely differ)."""
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return Failure(asked, "unreachable", "no nameserver to ask")
    server, _, _, error, response = errors[0]
    rcode = response.rcode() if response is not None else None
    if rcode == dns.rcode.REFUSED:
        kind = "refused"
    elif rcode == dns.rcode.SERVFAIL:
        kind = "servfail"
    elif isinstance(error, OSError):
        kind = "unreachable"
    else:
        kind = "error"
    return Failure(asked, kind, f"{server}: {error}")
