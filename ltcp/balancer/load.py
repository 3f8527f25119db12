"""What an endpoint's load is: the arithmetic of the three balancer kinds and of slow start.

Pure functions of numbers, so every property below is tested without a
socket (``tests/test_load.py``).

Streams
-------
An endpoint's *load* is its open streams plus its connects in flight, less
the streams that are ending (one side has sent its last byte).  A stream
that is ending still runs, and still counts against
``maxConnectionsPerEndpoint``, but it no longer steers picks: a client that
opens one connection after another would otherwise find its previous stream
still counted at the next pick, and every pick would lean away from where
the last one went, whatever the weights.

p2c
---
Draw two endpoints, each with probability proportional to its weight, and
take the one with the lower ``load / weight``; on a tie, the first drawn.
A tie is the usual case for a lone serial client (every load is 0), and the
first draw alone is proportional to weight, so such a client is spread
exactly by weight; under concurrency the less loaded endpoint wins.

ewma
----
The same two draws, compared on a score that also counts what each endpoint
is doing, measured by two moving averages with time constant ``decayTimeMs``:

* ``rate``: bytes per second moved by its streams that have been open for a
  second or more, both ways, decayed exponentially (``decayed_rate``).  The
  bytes of short streams are left out: an endpoint that answers quickly
  serves more requests and so moves more bytes, and counting them would
  steer streams away from the fastest endpoints;
* ``latency``: how long its connects take, a peak-sensitive average
  (``peak_ewma``): the record fades toward zero with time, a connect slower
  than what is left of it is taken at once, and a faster one is averaged in;
  so an endpoint that was slow is tried again once its record has faded.

Each is read against a reference: the pair being compared (or, for what
``/routers.json`` shows, the whole destination).  With ``r`` the endpoint's
share of the bytes over its share of the weight, and ``LATENCY_FLOOR`` the
connect time below which endpoints count as equally fast (a busy reactor
sees a connect complete only at its next turn, so up to tens of milliseconds
of a connect time can be its own, not the endpoint's)::

    crowding = max(1, r) ** 2
    slowness = (latency + LATENCY_FLOOR) / (fastest latency + LATENCY_FLOOR)
    score    = ((load + 1) * crowding * slowness - 1) / weight

An endpoint carrying no more than its weight's share of the bytes, and
connecting as fast as the fastest, scores ``load / weight`` exactly as in
p2c (so a serial client is still spread by weight).  One carrying twice its
share counts each stream, and the new one, four times over; one whose
connects take 1 s (a full accept queue: the SYN is sent again after a
second) against 1 ms counts about 20 times over.  The squaring is a
choice: with it, of 60 new streams between two endpoints with 4 open
streams each, the one whose 4 move bulk data gets about 9 (15%), where a
linear factor would give it about 18 (30%).  When the bulk ends the rate
decays, ``r`` falls back to 1 or below, and the factor to 1.  Below
``RATE_FLOOR`` bytes per second per unit of weight a destination's traffic
is too small to say anything, and ``r`` is measured against the floor.

The score rises with load, rate and latency and falls with weight, for any
reference; and raising one endpoint's rate, latency or weight moves the
other's score the opposite way, so each comparison is monotone in both.

roundRobin
----------
Smooth weighted round robin (as nginx does it): each pick adds every
endpoint's weight to its credit, takes the endpoint with the most credit and
takes the total weight back from it.  An exact split, interleaved, whatever
the load.

Slow start
----------
An endpoint that appears, or comes back from a failFast penalty or an
unhealthy verdict, while others are serving, has its weight scaled by
``ramp``: from ``MIN_RAMP`` to 1 over ``slowStartSecs``.
"""

import math

__all__ = ["LATENCY_FLOOR", "MIN_RAMP", "RATE_FLOOR", "decayed_rate", "ewma_score", "peak_ewma", "ramp"]

LATENCY_FLOOR = 0.050  # seconds: connects faster than about this are all "fast" (see the docstring)
RATE_FLOOR = 64 * 1024.0  # bytes per second per unit of weight below which throughput is not compared
MIN_RAMP = 0.1  # the share of its weight a slow-starting endpoint begins with


def decayed_rate(rate, moved, elapsed, decay):
    """The moving average ``rate`` (bytes/s) after ``moved`` more bytes over ``elapsed`` seconds."""
    if elapsed <= 0:
        return rate
    keep = math.exp(-elapsed / decay)
    return rate * keep + (moved / elapsed) * (1.0 - keep)


def peak_ewma(average, sample, elapsed, decay):
    """The peak-sensitive average of connect times after ``sample`` (None: just the passing of time)."""
    keep = math.exp(-max(0.0, elapsed) / decay)
    faded = average * keep
    if sample is None:
        return faded
    return sample if sample >= faded else faded * keep + sample * (1.0 - keep)


def ewma_score(load, weight, rate, latency, rate_per_weight, fastest):
    """The ewma kind's score (module docstring), against a reference: the bytes per second per unit of
    weight of the endpoints compared, and the lowest connect-time average among them."""
    share = (rate / weight) / max(rate_per_weight, RATE_FLOOR)
    crowding = share * share if share > 1.0 else 1.0
    slowness = (latency + LATENCY_FLOOR) / (min(fastest, latency) + LATENCY_FLOOR)
    return ((load + 1) * crowding * slowness - 1.0) / weight


def ramp(elapsed, slow_start):
    """The share of its weight an endpoint has ``elapsed`` seconds into a slow start of ``slow_start``."""
    if slow_start <= 0 or elapsed >= slow_start:
        return 1.0
    return max(MIN_RAMP, elapsed / slow_start)
