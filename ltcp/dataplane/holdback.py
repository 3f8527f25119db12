"""The episodes of a listener held back from accepting by a limit: counted by reason, logged once each.

An episode lasts from the first time a limit holds the listener back until it
has accepted freely for ``CALM`` seconds, however often it was held back and
let go meanwhile (a listener at its limit is let go, accepts one client and is
held back again as each stream ends).  Its first time is logged, and its end
with how many times it came back; the time held back is counted by reason.
"""

import collections
import logging

__all__ = ["CALM", "Holdback"]

log = logging.getLogger(__name__)

CALM = 5.0  # seconds of accepting freely that end an episode of being held back


class Episode:
    """One episode: the first limit, when, and what went unlogged."""

    __slots__ = ("why", "since", "released", "again", "timer")

    def __init__(self, why, since):
        self.why = why  # the first limit, in words, for the log
        self.since = since  # reactor time it was first held back
        self.released = since  # reactor time it was last let go
        self.again = 0  # times it was held back since, not logged
        self.timer = None  # looks whether the listener has been calm for long enough


class Holdback:
    """What holds one listener back now (``held``: a reason, or None), for how long in all, and its log lines.

    ``name()`` says which listener, in the log.
    """

    def __init__(self, reactor, name):
        self.reactor = reactor
        self.name = name
        self.held = None  # the limit holding accepting back now, if one does (MAX_CONCURRENCY, ...)
        self.held_since = 0.0
        self.seconds = collections.Counter()  # reason -> seconds held back by it, once let go
        self.episode = None  # until calm again

    def hold(self, reason, why, retry=""):
        """A limit stops accepting; whether it was accepting until now (the caller stops listening then)."""
        now = self.reactor.now
        began = self.held is None  # (held already, if a connect ran out of descriptors meanwhile)
        if began:
            self.held, self.held_since = reason, now
        if self.episode is None:
            self.episode = Episode(why, now)
            log.warning("%s stopped accepting: %s%s", self.name(), why, retry)
        else:
            self.episode.again += 1
        return began

    def release(self):
        """Listening again: count the time held back, and end the episode once calm for ``CALM`` seconds."""
        now = self.reactor.now
        self.seconds[self.held] += now - self.held_since
        self.held = None
        episode = self.episode
        episode.released = now
        if episode.timer is None:
            episode.timer = self.reactor.call_later(CALM, self._calm)

    def _calm(self):
        """Has the listener accepted freely since it was let go?  Then the episode is over."""
        episode = self.episode
        episode.timer = None
        if self.held is not None:
            return  # held back again: letting it go looks again
        calm_until = episode.released + CALM
        if self.reactor.now < calm_until:
            episode.timer = self.reactor.call_at(calm_until, self._calm)
            return
        self.episode = None
        log.info("%s accepting again after %.1fs (%s%s)", self.name(), episode.released - episode.since,
                 episode.why, f"; held back {episode.again} more times, not logged" if episode.again else "")

    def totals(self):
        """Seconds held back, by reason, the time held back now included."""
        seconds = dict(self.seconds)
        if self.held is not None:
            seconds[self.held] = seconds.get(self.held, 0) + self.reactor.now - self.held_since
        return seconds

    def close(self):
        if self.held is not None:
            self.seconds[self.held] += self.reactor.now - self.held_since
            self.held = None
        if self.episode is not None and self.episode.timer is not None:
            self.episode.timer.cancel()
        self.episode = None
