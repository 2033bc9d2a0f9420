"""A tiny HTTP server on the event loop: /healthz/ready, /healthz/live and /metrics.

Liveness means progress (the last poll or commit is recent), not "process up": consumers that silently
stall are the most reported failure of Kafka consumers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from probes.logs import get_logger

log = get_logger(__name__)


class HealthServer:
    def __init__(
        self, *, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool],
        live: Callable[[], tuple[bool, str]],
    ) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self._ready, self._live = ready, live
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("health.listening", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            status, ctype, body = self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path.startswith("/metrics"):
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path.startswith("/healthz/ready"):
            ok = self._ready()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path.startswith("/healthz/live"):
            ok, why = self._live()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
        return "404 Not Found", "text/plain", b"not found\n"
