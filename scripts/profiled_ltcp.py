"""``python -m ltcp`` with every worker's reactor under cProfile, for ``bench_workers.py --calls``.

Workers are forks of the template, itself a fork of this process, so the
patch below is what every worker runs.  Each writes its statistics to
``$LTCP_PROFILE_DIR/worker.PID`` when its reactor stops (a drain, a
shutdown).  cProfile makes the worker several times slower: count calls with
it, never time them.
"""

import cProfile
import os
import sys

from ltcp import cli, loop

unprofiled_run = loop.Reactor.run


def profiled_run(reactor):
    profile = cProfile.Profile()
    try:
        profile.runcall(unprofiled_run, reactor)
    finally:
        profile.dump_stats(os.path.join(os.environ["LTCP_PROFILE_DIR"], f"worker.{os.getpid()}"))


loop.Reactor.run = profiled_run
sys.exit(cli.main())
