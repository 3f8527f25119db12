"""What the admin server shows of a supervisor: every worker's snapshot merged, stale ones marked.

``AdminView`` is a part of the ``Supervisor``; its methods run on the admin
server's threads, under the supervisor's lock where they read its state.
"""

import collections
import concurrent.futures
import logging
import os
import time

from .. import __version__
from ..admin.metrics import resident_bytes, supervisor_families
from ..admin.snapshot import destination_names, empty_snapshot, finished, merge, only_destinations
from .fleet import SNAPSHOT_WAIT

log = logging.getLogger(__name__)

class AdminView:
    """The admin part of the ``Supervisor``."""

    # -- what the admin server shows (on its threads) ---------------------

    def snapshot(self, listed=0):
        """Every serving worker's snapshot merged, plus what finished workers counted; and by generation.

        Workers that do not answer within ``SNAPSHOT_WAIT`` (stopped, stuck) are
        shown by their last snapshot, marked stale with its age: a scrape never
        waits longer than that, and not at all for a worker already late.  With
        no worker serving (all starting, or crashed), it is what finished workers
        counted, or nothing: the admin server still answers, and says so.
        """
        with self.lock:
            live = [w for w in self._all_workers_locked() if w.exit_code is None]
            running = [w for w in live if w.link is not None]
            workers = [w for w in running if w.state != "starting" and w.final is None]
            # Finished but not yet reaped: counted from their final snapshot, never twice, never not at all.
            finished_counts = [w.final for w in running if w.final is not None]
            if self.departed is not None:
                finished_counts.append(self.departed)
            hubs = dict(self.current.hubs)
            current = self.current.number
        self._ask(workers, listed)
        answered = [w for w in workers if w.last is not None]  # a stuck worker's counts are stale, not gone
        answers = [w.last for w in answered]
        # Finished workers' destinations count while a live worker routes to them (no series for ever).
        names = destination_names(answers)
        merged = merge(answers + [only_destinations(c, names) for c in finished_counts] or [empty_snapshot()])
        # New dicts, not edits: a merge of one snapshot is that snapshot, kept as a worker's last or final.
        routers = [{**router, "discovery": hubs[router["label"]].interpreter.stats.snapshot()}
                   if router["label"] in hubs else router for router in merged["routers"]]
        now = time.monotonic()
        data = {**merged, "routers": routers, "draining": self.stopping, "generation": current,
                "generations": _by_generation(answered), "workers": [_worker_entry(w, now) for w in live]}
        writer = self.access_log
        if writer is not None:
            written, dropped = writer.counts()
            data["access_log"] = {"written": written, "dropped": dropped + merged.get("access_log_dropped", 0)}
        return data

    def _ask(self, workers, listed):
        """Ask each worker for a snapshot listing ``listed`` endpoints; wait up to ``SNAPSHOT_WAIT`` in all."""
        deadline = time.monotonic() + SNAPSHOT_WAIT
        questions = [(worker, worker.ask(listed, self.tokens)) for worker in workers]
        # An answer to a question that listed fewer endpoints (a scrape's) came first: ask again.
        again = [worker for worker, question in questions if _answered(question, deadline, worker.pid)
                 and question.listed < listed]
        for worker in again:
            _answered(worker.ask(listed, self.tokens), deadline, worker.pid)

    def _departed_with(self, counted):
        """What finished workers counted, ``counted`` added (under the lock); destinations only while a
        live worker, or the one just finished, has them, so names routed to once are not kept for ever."""
        live = [w.last for w in self._all_workers_locked() if w.exit_code is None and w.last is not None]
        total = finished([self.departed, counted] if self.departed else [counted])
        return only_destinations(total, destination_names([counted, *live]))

    def families(self, data):
        """The process model's families; ``data``: the snapshot being rendered (with its workers' ages)."""
        with self.lock:
            states = [w.state for w in self._all_workers_locked()]
        ages = {w["pid"]: w["snapshot_age_secs"] for w in data["workers"] if w["snapshot_age_secs"] is not None}
        return supervisor_families({"workers": states, "restarts": self.restarts, "reloads": dict(self.reloads),
                                    "last_reload_success": self.last_reload_success, "snapshot_ages": ages})

    def instance(self):
        """What the dashboard shows of the instance itself."""
        with self.lock:
            workers = [w.describe() for w in self._all_workers_locked() if w.exit_code is None]
        return {"version": __version__, "pid": os.getpid(), "started": self.started_at,
                "uptime_secs": time.time() - self.started_at, "workers": workers, "reloads": dict(self.reloads),
                "restarts": self.restarts, "draining": self.stopping,
                "rss_bytes": resident_bytes(os.getpid()) + sum(resident_bytes(w["pid"]) for w in workers)}

    def _all_workers_locked(self):
        return [w for g in self.generations for w in g.workers.values()]

    def drain(self):
        self.events.put(("drain",))


def _answered(question, deadline, pid):
    """Whether ``question`` is answered by ``deadline``, or by ``SNAPSHOT_WAIT`` after it was asked if sooner."""
    if question is None:
        return False
    wait = min(deadline, question.asked + SNAPSHOT_WAIT) - time.monotonic()
    try:
        question.future.result(max(0.0, wait))
        return True
    except concurrent.futures.TimeoutError:
        if wait > 0:  # (once: a worker already late is not waited for again)
            log.warning("worker %d did not answer a snapshot within %gs: showing its last one, as stale",
                        pid, SNAPSHOT_WAIT)
        return False
    except concurrent.futures.CancelledError:
        return False


def _worker_entry(worker, now):
    """A worker as /routers.json lists it: its streams, and how old the snapshot they come from is (None: none)."""
    counted = worker.final or worker.last
    servers = [server for router in counted["routers"] for server in router["servers"]] if counted else []
    return {**worker.describe(), "streams": sum(s["active"] for s in servers),
            "accepted": sum(s["accepted"] for s in servers),
            "snapshot_age_secs": None if worker.answered_at is None else round(now - worker.answered_at, 3),
            "stale": worker.late}


def _by_generation(workers):
    """Each generation's answering workers' snapshots, merged: {number: snapshot}."""
    lasts = collections.defaultdict(list)
    for worker in workers:
        lasts[worker.generation].append(worker.last)
    return {number: merge(snapshots) for number, snapshots in lasts.items()}
