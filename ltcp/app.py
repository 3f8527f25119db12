"""Running a configuration (the data plane arrives with the next issue)."""

import logging

log = logging.getLogger(__name__)


def serve(config):
    """Log what would be served; proxying is not implemented yet."""
    for router in config.routers:
        for server in router.servers:
            log.info("router %s would listen on %s for %s (interpreter %s)",
                     router.label, server.address, server.dst_name, router.interpreter.kind)
    log.warning("the data plane is not implemented yet: nothing is served")
    return 0
