"""A plain asyncio TCP proxy: the baseline ltcp is measured against (never imported by ltcp).

    python scripts/asyncio_proxy.py LISTEN_PORT:TARGET_PORT [LISTEN_PORT:TARGET_PORT ...]

Streams API, one task per direction, 64 KiB reads, drain() for backpressure,
half-close passed on with write_eof(); the way such a proxy is usually written.
"""

import asyncio
import os
import signal
import socket
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def handle(client_reader, client_writer, target_port):
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        client_writer.transport.abort()
        return
    for writer in (client_writer, upstream_writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
    client_writer.close()
    upstream_writer.close()


async def main(pairs):
    servers = []
    for listen_port, target_port in pairs:
        servers.append(await asyncio.start_server(
            lambda r, w, t=target_port: handle(r, w, t), "127.0.0.1", listen_port, backlog=4096))
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))  # no teardown noise when stopped
    asyncio.run(main([tuple(map(int, arg.split(":"))) for arg in sys.argv[1:]]))
