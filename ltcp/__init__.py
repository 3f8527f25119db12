"""ltcp: a TCP and TLS stream router for the linkerd service mesh."""

__version__ = "0.1.0"
