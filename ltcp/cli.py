"""Command line: ``ltcp CONFIG`` serves, ``ltcp --check CONFIG`` only validates."""

import argparse
import os
import sys

from . import __version__
from .config import ConfigError
from .logs import FORMATS, configure
from .process.prepare import prepare
from .worker import Worker  # noqa: F401  (so --check proves that what every worker runs loads)

LEVELS = ("debug", "info", "warning", "error")


def _parser():
    parser = argparse.ArgumentParser(
        prog="ltcp", description="TCP and TLS stream router for the linkerd service mesh.")
    parser.add_argument("config", help="configuration file (YAML or JSON); '-' reads standard input")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration, print a summary and exit")
    parser.add_argument("--log-level", choices=LEVELS, type=str.lower,
                        default=os.environ.get("LTCP_LOG", "info").lower(),
                        help="log verbosity (default: $LTCP_LOG or info)")
    parser.add_argument("--log-format", choices=FORMATS, type=str.lower,
                        default=os.environ.get("LTCP_LOG_FORMAT", "text").lower(),
                        help="text (default, or $LTCP_LOG_FORMAT) or json: one object per line for log shippers")
    parser.add_argument("--version", action="version", version=f"ltcp {__version__}")
    return parser


def summary(config):
    """One line: what the configuration would serve."""
    servers = sum(len(r.servers) for r in config.routers)
    kinds = sorted({r.interpreter.kind for r in config.routers})
    return (f"{len(config.routers)} router{'s' * (len(config.routers) != 1)}, "
            f"{servers} server{'s' * (servers != 1)}, interpreters: {', '.join(kinds)}")


def _refuse(name, errors):
    """Print one line per problem, each starting with the file's name; the exit status."""
    for line in errors:
        print(line if line.startswith(name) else f"{name}: {line}", file=sys.stderr)
    return 2


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.log_level not in LEVELS:
        print(f"ltcp: LTCP_LOG must be one of {', '.join(LEVELS)}", file=sys.stderr)
        return 2
    if args.log_format not in FORMATS:
        print(f"ltcp: LTCP_LOG_FORMAT must be one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    configure(args.log_level, args.log_format)
    name = "<stdin>" if args.config == "-" else args.config
    try:
        config, material = prepare(args.config)
    except ConfigError as exc:
        return _refuse(name, exc.errors)
    from .process.supervisor import serve  # (under --check too: an upgrade's check proves the new code loads)
    if args.check:
        print(f"ok: {summary(config)}")
        return 0
    return serve(config, material, args.config, (args.log_level, args.log_format))
