"""A worker process: one reactor, no other thread, serving listening sockets the supervisor opened.

Forked from the template (``template``), or started as ``python -m ltcp.worker
FD LEVEL FORMAT [SUPERVISOR]`` (a fresh interpreter), it reads its
configuration and its TLS material (the bytes of the key and certificate
files, as the supervisor checked them: never the files themselves) from the
control channel on descriptor FD, serves
until told to drain (or until the channel closes: the supervisor is gone),
then sends a last snapshot, so the instance's counters keep its streams.
SIGTERM and SIGINT drain it too, at any time, and so does the supervisor's
death (``lifeline``).

It never imports yaml, urllib3 or prometheus_client.
"""

import logging
import os
import signal
import socket
import sys

from . import logs
from .dataplane.app import App, tune_garbage_collection
from .dataplane.heaptrim import HeapTrim, malloc_trim
from .control import Channel, Framer, RemoteDiscovery, encode
from .process.lifeline import die_with
from .admin.snapshot import snapshot

__all__ = ["Worker", "main", "serve"]

log = logging.getLogger("ltcp.worker")  # (not __name__: run as a script, that is __main__)

FINAL_SNAPSHOT_TIMEOUT = 2.0
MAX_LOG_BACKLOG = 4 << 20  # bytes queued for the supervisor beyond which access log lines are dropped


class Worker:
    def __init__(self, config, material, sock, framer, sockets, generation, secret=None):
        self.generation = generation
        self.secret = secret  # what workers handing streams to this one prove themselves with
        self.remote = {router.label: RemoteDiscovery(router.label, self.send) for router in config.routers}
        self.app = App(config, interpreters=self.remote, sockets=sockets, log_sink=self._send_log, material=material)
        self.channel = Channel(self.app.reactor, sock, self._received, self._orphaned, framer)

    def send(self, message):
        self.channel.send(message)

    def _send_log(self, data, lines):
        """Access log lines to the supervisor, which writes the file; refused while it is not reading."""
        if self.channel.closed or len(self.channel.outgoing) > MAX_LOG_BACKLOG:
            return False
        self.send(("log", data, lines))
        return True

    def run(self):
        """Serve until drained; the exit status."""
        app = self.app
        app.start()
        app.receive_streams(self.secret)
        log.info("worker %d (generation %d) serving", os.getpid(), self.generation)  # (before the supervisor knows)
        self.send(("ready", os.getpid()))
        tune_garbage_collection()
        trim = malloc_trim()
        if trim is not None:
            HeapTrim(app.reactor, lambda: sum(listener.finished for listener in app.listeners), trim)
        app.run()
        self._say_goodbye()
        log.info("worker %d finished", os.getpid())
        return 0

    def _received(self, message):
        kind = message[0]
        if kind == "update":
            _, label, name, addresses = message
            self.remote[label].deliver(name, addresses)
        elif kind == "snapshot":
            _, token, listed = message
            self.send(("snapshot", token, snapshot(self.app, listed)))
        elif kind == "drain":
            self.app.drain(message[1] if len(message) > 1 else ())
            self.send(("draining",))  # nothing is accepted here any more
        elif kind == "pause":
            self.send(("paused", message[1]))  # the last frame the old supervisor reads
            self.channel.hold()
        elif kind == "resume":
            self.channel.release()
        else:
            log.warning("control channel: unknown message %r ignored", kind)

    def _orphaned(self):
        log.warning("the supervisor closed the control channel (an upgrade, or it is gone): draining")
        self.app.drain()

    def _say_goodbye(self):
        """A last snapshot for the supervisor's totals; then wait for it to close its end.

        Closing first, with messages unread, would make the supervisor's next
        read fail and lose the snapshot.
        """
        channel, sock = self.channel, self.channel.sock
        if channel.closed:
            return
        try:
            sock.setblocking(True)
            sock.settimeout(FINAL_SNAPSHOT_TIMEOUT)
            last = b""
            if self.app.access_log is not None:
                data, lines = self.app.access_log.take()
                last = encode(("log", data, lines)) if lines else b""
            sock.sendall(bytes(channel.outgoing) + last + encode(("final", snapshot(self.app))))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass  # the supervisor is gone or stuck: its totals lose this worker's streams
        sock.close()


# Meant for the supervisor, which tells the workers what to do (a reload, an upgrade; SIGINT
# drains once the worker is up); SIGUSR1 reopens the access log, which the supervisor writes.
SUPERVISOR_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def _receive_start(sock, framer):
    """Block for the first message, ("start", config, material, sockets by key -> fd, generation, secret); and
    any after it."""
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("ltcp worker: the supervisor closed the channel before starting it")
        messages = framer.feed(data)
        if messages:
            return messages[0], messages[1:]


def main(argv=None):
    """``python -m ltcp.worker FD LEVEL FORMAT [SUPERVISOR]``: a worker in a fresh interpreter."""
    argv = sys.argv[1:] if argv is None else argv
    fd, level, log_format = int(argv[0]), argv[1], argv[2]
    if len(argv) > 3:  # (a supervisor of an earlier release, met in an upgrade, passes three)
        die_with(int(argv[3]))
    logs.configure(level, log_format)
    return serve(socket.socket(fileno=fd))


def serve(sock, sockets=None):
    """Run a worker on its control channel ``sock``; the exit status.

    ``sockets`` (listener key -> listening socket) come with a fork from the
    template; a fresh interpreter finds them by the descriptor numbers the
    start message gives.
    """
    for signum in SUPERVISOR_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the supervisor's mask is inherited: a worker has one thread
    framer = Framer()
    (_, config, material, fds, generation, *secret), early = _receive_start(sock, framer)
    if sockets is None:
        sockets = {key: socket.socket(fileno=number) for key, number in fds.items()}
    worker = Worker(config, material, sock, framer, sockets, generation, *secret)
    # A service manager may signal every process of the service, and a terminal's Ctrl-C
    # the whole process group: both drain here too (as the supervisor's order would).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: worker.app.request_drain())
    for message in early:  # (once serving: a drain that came with the start must find listeners started)
        worker.app.reactor.call_soon(worker._received, message)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
