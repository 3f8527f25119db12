"""A configuration ready to serve: its file, then every TLS file it names, read once and checked.

``--check``, the supervisor's start and every reload call ``prepare``, so
none can accept what another refuses, and a generation's workers are handed
the very bytes that were checked (``tls.TlsMaterial``), never the paths.
"""

from typing import Any, NamedTuple

from .config import ConfigError, load
from .tls import TlsMaterial, material_problems, read_material

__all__ = ["Prepared", "prepare"]


class Prepared(NamedTuple):
    config: Any  # config.Config
    material: TlsMaterial


def prepare(path):
    """The configuration at ``path`` and its TLS material; ConfigError with one line per problem."""
    config = load(path)
    material = read_material(config)
    problems = material_problems(config, material)
    if problems:
        raise ConfigError(problems)
    return Prepared(config, material)
