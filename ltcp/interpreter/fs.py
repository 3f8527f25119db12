"""``io.l5d.fs``: one file of addresses per name under a root directory.

``/svc/users`` is read from ``ROOT/users`` (the first segment names the
namespace and is dropped).  Each line is ``ip port [weight]``; ``#`` starts a
comment.  One thread checks every watched file each ``periodSecs`` and
delivers a name's addresses when they change; a deleted file means the name
resolves to nothing (once it has stayed deleted for ``VANISH_SECS``).
"""

import logging
import os
import queue
import stat
import threading
import time

from ..config import MAX_WEIGHT, Address, FsConfig
from ..names import canonical_ip, parse_port
from .stats import DiscoveryStats

__all__ = ["FsInterpreter", "parse_addresses", "name_to_path"]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
MAX_PROBLEMS = 10  # bad lines of one file reported one by one


def parse_addresses(text, source="<fs>"):
    """Parse an address file: (addresses, problems).

    Bad lines are skipped; the first ``MAX_PROBLEMS`` are reported one by
    one, the rest counted in one more problem, so a file of junk costs one
    short warning, not one per line.
    """
    addresses, problems, seen, more = [], [], set(), 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        address, problem = _parse_line(line)
        if address is not None and (address.ip, address.port) in seen:
            address, problem = None, f"{address} is listed twice; the first entry is kept"
        if address is not None:
            seen.add((address.ip, address.port))
            addresses.append(address)
        elif len(problems) < MAX_PROBLEMS:
            problems.append(f"{source}:{number}: {problem}")
        else:
            more += 1
    if more:
        problems.append(f"{source}: {more} more bad lines")
    return addresses, problems


def _parse_line(line):
    """``ip port [weight]`` -> (Address, None), or (None, what is wrong)."""
    fields = line.split()
    if len(fields) not in (2, 3):
        return None, f"expected 'ip port [weight]', got {line[:80]!r}"
    try:
        ip = canonical_ip(fields[0])
    except ValueError as exc:
        return None, str(exc)
    port = parse_port(fields[1])
    if port is None:
        return None, f"port must be 1..65535, not {fields[1][:20]!r}"
    weight = 1.0
    if len(fields) == 3:
        try:
            weight = float(fields[2])
        except ValueError:
            weight = -1.0
        if not 0 < weight <= MAX_WEIGHT:
            return None, f"weight must be a number > 0 and <= {MAX_WEIGHT:g}, not {fields[2][:20]!r}"
    return Address(ip, port, weight), None


def name_to_path(root, name):
    """The file for ``name`` under ``root``, or None if the name itself could climb out of it.

    Links are not resolved here but each time the file is read (then what
    was opened must still lie under the root), so a link repointed later,
    as Kubernetes does to update a mounted ConfigMap, is followed.
    """
    segments = name.split("/")[1:]
    if len(segments) < 2 or name[:1] != "/":
        return None
    relative = segments[1:]
    for segment in relative:
        if segment in ("", ".", "..") or "\0" in segment or "\\" in segment:
            return None
    return os.path.join(root, *relative)


SETTLE_SECS = 0.1  # a file is read once it has not changed for this long
VANISH_SECS = 1.0  # a non-empty set becomes "nothing" only if that lasts this long


class Unresolvable(Exception):
    """A name whose file can never give addresses (a directory, a FIFO, a loop, too big)."""


class _Watch:
    """One watched name: what was last delivered, and what the file looked like then."""

    __slots__ = ("name", "path", "deliver", "signature", "addresses", "seen", "problem")

    def __init__(self, name, path, deliver):
        self.name = name
        self.path = path
        self.deliver = deliver
        self.signature = ()  # the stat signature last applied; () never matches, so the first look reads
        self.addresses = ()  # what was last delivered; () = nothing yet
        self.seen = None  # (outcome, monotonic time first seen) of a change not applied yet
        self.problem = None  # the last problem logged, so each is logged once per change


class FsInterpreter:
    """Follows one file per name from one thread.

    A file is read only once it has settled (unchanged for ``SETTLE_SECS``),
    so a rewrite in place is never read half-written; and a name that had
    addresses loses them only when the file has been gone or empty for
    ``VANISH_SECS``.  Only regular files are opened, without blocking, so a
    FIFO or device a client names through SNI cannot stall the thread.
    """

    KIND = "io.l5d.fs"
    CONFIG = FsConfig

    def __init__(self, root_dir, period_secs):
        self.stats = DiscoveryStats()  # file reads by outcome: ok, unresolvable, changing
        self.root_dir = root_dir
        self._real_root = os.path.realpath(root_dir)
        self.period = period_secs
        self._watches = {}  # name -> _Watch, owned by the polling thread
        self._new = queue.SimpleQueue()  # watches handed over without a lock
        self._wake = threading.Event()
        self._closing = False
        self._thread = None

    @classmethod
    def from_config(cls, config):
        return cls(config.root_dir, config.period_secs)

    def start(self):
        self._thread = threading.Thread(target=self._run, name="ltcp-fs", daemon=True)
        self._thread.start()

    def watch(self, name, deliver):
        path = name_to_path(self.root_dir, name)
        if path is None:
            log.warning("io.l5d.fs: refusing name %r: it does not map to a file under %s", name, self.root_dir)
            deliver(None)
            return
        self._new.put(_Watch(name, path, deliver))
        self._wake.set()

    def unwatch(self, name):
        self._new.put(name)
        self._wake.set()

    def close(self):
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self):
        while not self._closing:
            while not self._new.empty():
                watch = self._new.get()
                if isinstance(watch, str):  # an unwatch
                    self._watches.pop(watch, None)
                else:
                    self._watches[watch.name] = watch
            wait = self.period
            for watch in self._watches.values():
                try:
                    wait = min(wait, self._check(watch))
                except Exception:  # a bug must not end discovery for every name
                    log.exception("io.l5d.fs: checking %s failed", watch.path)
            self._wake.wait(wait)
            self._wake.clear()

    def _check(self, watch):
        """Look at one file; the seconds until it wants another look."""
        try:
            st = os.stat(watch.path)
        except FileNotFoundError:
            return self._settle(watch, None, None)
        except OSError as exc:  # a symlink loop, a name too long, no permission
            return self._unresolvable(watch, f"cannot stat {watch.path}: {exc.strerror}")
        signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if signature == watch.signature:
            return self.period
        age = time.time() - max(st.st_mtime, st.st_ctime)
        if age < SETTLE_SECS and not self._seen_for(watch, signature, SETTLE_SECS):
            return SETTLE_SECS - max(age, 0.0)  # still being written, perhaps
        started = time.monotonic()
        try:
            addresses = self._read(watch.path, signature)
        except Unresolvable as exc:
            self.stats.request("unresolvable")
            return self._unresolvable(watch, str(exc))
        self.stats.observe(time.monotonic() - started)
        if addresses is None:
            self.stats.request("changing")
            return SETTLE_SECS  # it changed while we read it
        self.stats.request("ok")
        return self._settle(watch, signature, addresses)

    def _settle(self, watch, signature, addresses):
        """Apply what the file says now, unless it takes every address away too soon."""
        if not addresses and watch.addresses and not self._seen_for(watch, ("nothing", signature), VANISH_SECS):
            return VANISH_SECS / 4
        self._apply(watch, signature, addresses or None)
        return self.period

    def _seen_for(self, watch, outcome, seconds):
        """Whether ``outcome`` has been seen on every look for at least ``seconds``."""
        now = time.monotonic()
        if watch.seen is None or watch.seen[0] != outcome:
            watch.seen = (outcome, now)
        return now - watch.seen[1] >= seconds

    def _unresolvable(self, watch, problem):
        """Warn once per problem; a name never resolved fails fast, a resolved one keeps its set."""
        if problem != watch.problem:
            watch.problem = problem
            kept = "; keeping its last addresses" if watch.addresses else ""
            log.warning("io.l5d.fs: %s: %s%s", watch.name, problem, kept)
        if watch.addresses == ():
            self._apply(watch, watch.signature, None)
        return self.period

    def _apply(self, watch, signature, addresses):
        watch.signature = signature
        watch.seen = None
        if signature is not None and addresses is not None:
            watch.problem = None
        if addresses != watch.addresses:
            watch.addresses = addresses
            watch.deliver(addresses)

    def _read(self, path, signature):
        """The file's addresses; None if it changed while being read; Unresolvable if it never can."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unresolvable(f"cannot open {path}: {exc.strerror}") from None
        try:
            # Whatever links the path went through, what was opened must lie under the root.
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(self._real_root + os.sep):
                raise Unresolvable(f"{path} leads outside {self.root_dir}")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Unresolvable(f"{path} is not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise Unresolvable(f"{path} is larger than {MAX_FILE_BYTES} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino) != signature or len(data) != st.st_size:
            return None
        addresses, problems = parse_addresses(data.decode("utf-8", "replace"), path)
        for problem in problems:
            log.warning("io.l5d.fs: %s (line skipped)", problem)
        return addresses
