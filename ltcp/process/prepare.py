"""A configuration ready to serve: its file, then every TLS file it names, read once and checked.

``--check``, the supervisor's start and every reload call ``prepare``, so
none can accept what another refuses, and a generation's workers are handed
the very bytes that were checked (``tls.TlsMaterial``), never the paths.
What is valid but unwise (a server that never times a stream out, a
certificate out of its validity period) is logged as a warning, once per
load, by the supervisor alone.
"""

import datetime
import logging
from typing import Any, NamedTuple

from ..config import ConfigError, load, missing_timeouts
from ..protocol.tls import TlsMaterial, expiry_warnings, material_problems, read_material

__all__ = ["Prepared", "prepare"]

log = logging.getLogger(__name__)


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
    for line in missing_timeouts(config) + expiry_warnings(material, datetime.datetime.now(datetime.timezone.utc)):
        log.warning("%s", line)
    return Prepared(config, material)
