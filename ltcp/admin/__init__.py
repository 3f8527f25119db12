"""What operators see: the admin HTTP server, its pages and the metrics.

``server`` serves /metrics, /routers.json, /api/v1/state, the dashboard
(``dashboard/``), /reload and /shutdown; ``httpd`` is its small HTTP/1.1
server and ``mailbox`` hands answers between its threads; ``snapshot``
builds and merges the workers' counts, ``metrics`` renders them for
Prometheus and ``rates`` derives rates on the server's own clock.

Workers import only ``snapshot`` (to report their counts); prometheus_client
and the HTTP server stay in the supervisor.
"""
