"""The process model: a supervisor that owns configuration, sockets, discovery and admin, and the workers it forks.

``supervisor`` runs generations of workers, reloads, upgrades and signals;
``template`` forks workers (and builds their shared TLS contexts);
``lifeline`` ties a worker's life to its supervisor's; ``prepare`` reads and
checks a configuration with its TLS material; ``reload`` plans which
listening sockets a new configuration keeps; ``launch`` and ``notify`` start
interpreters and talk to a service manager.

Nothing here moves a client's byte: workers do (``ltcp.worker``, running
``ltcp.dataplane``).  The data plane never imports this package.
"""
