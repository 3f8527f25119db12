"""One discovery watch per name for the whole instance, shared by every worker that routes to it.

A ``Hub`` stands in front of one router's interpreter in the supervisor.
Workers subscribe to the names their route caches hold; the first
subscription starts the watch, the last unsubscription ends it, and a worker
that subscribes to a name already answered gets the last answer at once.
Subscribers are anything with ``send(message)`` (a worker's control link);
``prepare`` turns an update into what is sent, once for all of them (the
supervisor encodes it into a frame there).
"""

import functools
import threading

__all__ = ["Hub"]


class Hub:
    def __init__(self, label, interpreter, prepare=lambda message: message):
        self.label = label
        self.interpreter = interpreter
        self._prepare = prepare
        self._lock = threading.Lock()  # subscribers and answers (discovery threads deliver under it)
        self._watching = threading.Lock()  # orders watch and unwatch: no stale unwatch after a new watch
        self._subscribers = {}  # name -> set of subscribers
        self._answers = {}  # name -> the last update sent, as prepared
        self.started = False

    def start(self):
        self.started = True
        self.interpreter.start()

    def subscribe(self, subscriber, name):
        with self._watching:
            with self._lock:
                subscribers = self._subscribers.get(name)
                first = subscribers is None
                if first:
                    subscribers = self._subscribers[name] = set()
                subscribers.add(subscriber)
                answer = self._answers.get(name)  # prepared already
                if answer is not None:  # under the lock: a newer answer cannot overtake it
                    subscriber.send(answer)
            if first:
                self.interpreter.watch(name, functools.partial(self._deliver, name))

    def unsubscribe(self, subscriber, name):
        with self._watching:
            with self._lock:
                subscribers = self._subscribers.get(name)
                if subscribers is None or subscriber not in subscribers:
                    return
                subscribers.discard(subscriber)
                last = not subscribers
                if last:
                    del self._subscribers[name]
                    self._answers.pop(name, None)
            if last:
                self.interpreter.unwatch(name)

    def drop(self, subscriber):
        """A worker is gone: end its subscriptions."""
        with self._lock:
            names = [name for name, subscribers in self._subscribers.items() if subscriber in subscribers]
        for name in names:
            self.unsubscribe(subscriber, name)

    def _deliver(self, name, addresses):
        """The interpreter's answer for ``name`` (on a discovery thread, or inside ``watch``)."""
        message = self._prepare(("update", self.label, name, addresses))
        with self._lock:
            subscribers = self._subscribers.get(name)
            if subscribers is None:  # unwatched meanwhile
                return
            self._answers[name] = message
            for subscriber in subscribers:  # (send only queues: cheap under the lock, and in order)
                subscriber.send(message)

    @property
    def watched(self):
        """How many names are watched (once each, however many workers route to them)."""
        with self._lock:
            return len(self._subscribers)

    def close(self):
        self.interpreter.close()
