"""Connection hygiene for `digitlab serve`: idle and slow clients cannot lock the others out.

uvicorn answers 503 once its open connections reach `limit_concurrency`, counting sockets that
never sent a byte, and it has no deadline for a fresh connection's request head: ~1,000 silent
sockets locked every real client out. Here a request head must arrive within `head_timeout`
and a body within `body_timeout`; one client address holds at most `per_client` connections
and the server `max_connections`; past either cap the oldest connection that is not inside a
request (idle, or still sending its head) is closed to make room, one that was never answered
before one kept alive after a response. Only requests in flight count towards the 503 limit
(`InFlightLimit`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for files, the model, worker threads' needs


@dataclass
class ConnectionGuard:
    """Deadlines and caps shared by every connection of one server."""

    head_timeout: float = 5.0  # s from connection (or the previous response) to a complete request head
    body_timeout: float = 30.0  # s from the head to the whole body: 2 MB at ~0.5 Mbit/s
    per_client: int = 256  # open connections per client address
    max_connections: int = 8192  # open connections in all; lowered to fit the descriptor limit
    _open: dict[Any, None] = field(default_factory=dict, repr=False)  # insertion order = age
    _by_client: dict[str, dict[Any, None]] = field(default_factory=dict, repr=False)
    evicted: int = 0  # connections closed to make room, for tests and logs
    timed_out: int = 0  # connections closed by a deadline

    def admit(self, conn: GuardedHttpToolsProtocol) -> bool:
        """Register a new connection, closing older idle ones past a cap; False: refuse this one."""
        mine = self._by_client.setdefault(conn.client_host, {})
        if len(mine) >= self.per_client and not self._evict_oldest_idle(mine):
            return False
        if len(self._open) >= self.max_connections and not self._evict_oldest_idle(self._open):
            return False
        mine[conn] = None
        self._open[conn] = None
        return True

    def release(self, conn: GuardedHttpToolsProtocol) -> None:
        self._open.pop(conn, None)
        mine = self._by_client.get(conn.client_host)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._by_client[conn.client_host]

    def _evict_oldest_idle(self, conns: dict[Any, None]) -> bool:
        # Connections that never completed a request go first: a client that has been answered
        # and keeps its connection alive between requests is likely real, the silent ones not.
        victim = next((c for c in conns if not c.in_request and not c.served), None)
        victim = victim or next((c for c in conns if not c.in_request), None)
        if victim is None:
            return False
        self.evicted += 1
        victim.drop("evicted to make room for a newer connection")
        return True


def raise_descriptor_limit() -> int:
    """Soft open-file limit raised to the hard one (many distros start at 1,024); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse; keep what we have
            pass
    return soft


def serve_options(guard: ConnectionGuard | None = None, max_requests: int = 1024) -> dict[str, Any]:
    """uvicorn.run/Config keywords for `InFlightLimit(app)`: the guarded protocol, no socket-count 503."""
    guard = guard or ConnectionGuard()
    guard.max_connections = max(64, min(guard.max_connections, raise_descriptor_limit() - FD_RESERVE))
    return {"http": guarded_protocol(guard), "limit_concurrency": None, "timeout_keep_alive": 5}


def guarded_protocol(guard: ConnectionGuard) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol bound to `guard` (pass as uvicorn.Config(http=...))."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a head deadline, a body deadline and the guard's caps."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # InFlightLimit counts requests; uvicorn counted sockets too
        self.in_request = False  # head complete, response not finished: never evicted
        self.served = False  # a response was completed on this connection: evicted last
        self.client_host = ""
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else ""
        if not self.guard.admit(self):
            log.debug("refused a connection from %s: all its connections are inside requests", self.client_host)
            self.drop("refused")
            return
        self._arm(self.guard.head_timeout, "sent no complete request head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.release(self)
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.in_request = True
        self._arm(self.guard.body_timeout, "did not send its whole body in time")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.in_request, self.served = False, True
        self._disarm()  # uvicorn's keep-alive timer now runs; new data cancels it and re-arms ours
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if not self.in_request and self._deadline is None:  # the first bytes of a keep-alive request
            self._arm(self.guard.head_timeout, "sent no complete request head")
        super().data_received(data)

    def drop(self, why: str) -> None:
        log.debug("closing the connection from %s: %s", self.client_host, why)
        self._disarm()
        self.guard.release(self)  # now: connection_lost comes a loop turn later, and the room is needed now
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self, delay: float, why: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, self._expired, why)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, why: str) -> None:
        self._deadline = None
        self.guard.timed_out += 1
        self.drop(why)


class InFlightLimit:
    """ASGI wrapper: 503 past `limit` HTTP requests in progress (open sockets do not count)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b'{"detail":"server busy, retry later"}'})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
