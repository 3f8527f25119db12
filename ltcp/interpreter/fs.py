"""``io.l5d.fs``: one file of addresses per name under a root directory.

``/svc/users`` is read from ``ROOT/users`` (the first segment names the
namespace and is dropped).  Each line is ``ip port [weight]``; ``#`` starts a
comment.  One thread checks every watched file each ``periodSecs`` and
delivers a name's addresses when they change; a deleted file means the name
resolves to nothing.
"""

import ipaddress
import logging
import os
import queue
import threading

from ..config import MAX_WEIGHT, Address, parse_port

__all__ = ["FsInterpreter", "parse_addresses", "name_to_path"]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20


def parse_addresses(text, source="<fs>"):
    """Parse an address file: (addresses, problems); bad lines are reported and skipped."""
    addresses, problems, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}:{number}"
        if len(fields) not in (2, 3):
            problems.append(f"{where}: expected 'ip port [weight]', got {line!r}")
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            problems.append(f"{where}: {fields[0]!r} is not an IP address literal")
            continue
        port = parse_port(fields[1])
        if port is None:
            problems.append(f"{where}: port must be 1..65535, not {fields[1]!r}")
            continue
        weight = 1.0
        if len(fields) == 3:
            try:
                weight = float(fields[2])
            except ValueError:
                weight = -1.0
            if not 0 < weight <= MAX_WEIGHT:
                problems.append(f"{where}: weight must be a number > 0 and <= {MAX_WEIGHT:g}, not {fields[2]!r}")
                continue
        key = (ip, port)
        if key in seen:
            problems.append(f"{where}: {fields[0]} {fields[1]} is listed twice; the first entry is kept")
            continue
        seen.add(key)
        addresses.append(Address(ip, port, weight))
    return addresses, problems


def name_to_path(root, name):
    """The file for ``name`` under ``root``, or None if the name could escape it."""
    segments = name.split("/")[1:]
    if len(segments) < 2 or name[:1] != "/":
        return None
    relative = segments[1:]
    for segment in relative:
        if segment in ("", ".", "..") or "\0" in segment or "\\" in segment:
            return None
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, *relative))
    if not path.startswith(real_root + os.sep):
        return None
    return path


class _Watch:
    __slots__ = ("name", "path", "deliver", "signature", "addresses")

    def __init__(self, name, path, deliver):
        self.name = name
        self.path = path
        self.deliver = deliver
        self.signature = ()  # never matches a real stat: the first check always reads
        self.addresses = ()


class FsInterpreter:
    def __init__(self, root_dir, period_secs):
        self.root_dir = root_dir
        self.period = period_secs
        self._watches = {}  # name -> _Watch, owned by the polling thread
        self._new = queue.SimpleQueue()  # watches handed over without a lock
        self._wake = threading.Event()
        self._closing = False
        self._thread = None

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
            for watch in self._watches.values():
                self._check(watch)
            self._wake.wait(self.period)
            self._wake.clear()

    def _check(self, watch):
        try:
            st = os.stat(watch.path)
            signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = None
        except OSError as exc:
            log.warning("io.l5d.fs: cannot stat %s: %s", watch.path, exc.strerror)
            return
        if signature == watch.signature:
            return
        watch.signature = signature
        if signature is None:
            addresses = None
        else:
            addresses = self._read(watch.path)
            if addresses is None:
                return
        if addresses != watch.addresses:
            watch.addresses = addresses
            watch.deliver(addresses or None)

    def _read(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            log.warning("io.l5d.fs: cannot read %s: %s", path, exc.strerror)
            return None
        if len(data) > MAX_FILE_BYTES:
            log.warning("io.l5d.fs: %s is larger than %d bytes; ignored", path, MAX_FILE_BYTES)
            return None
        addresses, problems = parse_addresses(data.decode("utf-8", "replace"), path)
        for problem in problems:
            log.warning("io.l5d.fs: %s (line skipped)", problem)
        return addresses
