"""Starting ltcp again in a fresh interpreter: workers, and an upgrade's check and exec.

ltcp may have been loaded from a pip-installed package, a source checkout or
a zip (``ltcp.pyz``, with its dependencies inside).  The new interpreter gets
the directory or zip holding the ``ltcp`` package first on its path, and this
interpreter's site flags (``-S``; ``-I`` becomes ``-s``, since an isolated
interpreter would ignore that path), so a zip run on a bare ``python3 -I -S``
starts workers that import only what the zip holds.
"""

import os
import sys

__all__ = ["ROOT", "environment", "python"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (a directory, or the .pyz itself)


def python(*args):
    """The argv of ``python ARGS`` run as this interpreter was."""
    flags = []
    if sys.flags.no_site:
        flags.append("-S")
    if sys.flags.no_user_site or sys.flags.isolated:
        flags.append("-s")
    return [sys.executable, *flags, *args]


def environment(**extra):
    """This process's environment with ltcp's home first on ``PYTHONPATH``, plus ``extra``."""
    rest = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != ROOT]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *rest]), **extra}  # (once, upgrade after upgrade)
