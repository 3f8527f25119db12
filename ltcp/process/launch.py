"""Starting ltcp again in a fresh interpreter: workers, and an upgrade's check and exec.

ltcp may have been installed (pip, a source checkout) or may run from a zip
application (``ltcp.pyz``, its dependencies inside).  Installed, ``python -m``
finds it as this interpreter did, with this interpreter's site flags.  From a
zip, the new interpreter is isolated (``-I``: no current directory, no
environment, no user site on its path) and a bootstrap puts the zip first on
its path, so it imports only what the zip holds, wherever it is started from.
"""

import os
import sys

__all__ = ["ROOT", "ZIPPED", "python_module"]

# What holds the ltcp package (ltcp/process/launch.py, three levels down): a directory, or the .pyz itself.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZIPPED = os.path.isfile(ROOT)


def python_module(module, *args):
    """The argv of ``python -m MODULE ARGS`` for this ltcp."""
    site = ["-S"] if sys.flags.no_site else []
    if ZIPPED:
        boot = (f"import runpy, sys; sys.path.insert(0, {ROOT!r}); "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        return [sys.executable, "-I", *site, "-c", boot, *args]
    isolation = ["-I"] if sys.flags.isolated else ["-s"] if sys.flags.no_user_site else []
    return [sys.executable, *isolation, *site, "-m", module, *args]
