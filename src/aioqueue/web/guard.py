"""Connection limits for `aioqueue serve`: a header-read timeout and a cap on open connections.

aiohttp's server has neither. Its only timer before a request is the keep-alive timeout, so a
client that connects and sends nothing, or half a request's headers, holds a socket (and a file
descriptor) for as long as that timeout, and enough of them lock every other client out.

`ConnectionGuard` is the protocol factory `aioqueue serve` listens with. Each connection gets a
`_Guarded` protocol, which creates the protocol aiohttp's `web.Server` makes (a `RequestHandler`,
configured as the runner configured it) and hands it every event, so aiohttp serves the
connection exactly as it would alone. Around it the guard

- closes a connection at once, before aiohttp sees it, when `max_connections` are open;
- closes a connection whose request headers are not complete `header_timeout` seconds after the
  connect or, on a kept-alive connection, after the request's first byte.

Once a request's headers are complete the timer is off: the request's body has its own timeout
(`http.body_timeout`, in the handler), a long poll and a websocket may last as long as they
last, and between requests aiohttp's keep-alive timeout (`http.keepalive_timeout`) applies.

It reads two attributes aiohttp keeps private, as `RequestHandler.data_received` and `start`
maintain them (aiohttp 3.14, web_protocol.py): `_request_count` (requests whose headers were
parsed, bad ones included) and `_waiter` (the future `start()` awaits while no request is
parsed: the connection is idle). tests/e2e/test_connection_limits.py runs the probes that need
both; an aiohttp without them gets no header timer, and a warning says so.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from aioqueue.web.problems import problem

logger = logging.getLogger(__name__)

#: Seconds between two log lines about the same kind of closed connection.
SAY_EVERY = 60.0
#: What the header timer reads of aiohttp's handler (see above).
_NEEDS = {"_request_count", "_waiter"}


class _Tally:
    """Says the first of a kind of closed connection at once, then how many more came, once a
    minute at most: a flood of connections must not become a flood of log lines."""

    def __init__(self, loop: asyncio.AbstractEventLoop, level: int, what: str) -> None:
        self._loop, self._level, self._what = loop, level, what
        self._more = 0
        self._timer: asyncio.TimerHandle | None = None  # None: quiet, say the next one at once

    def add(self) -> None:
        if self._timer is None:
            logger.log(self._level, "a connection %s (more: counted once a minute)", self._what)
            self._timer = self._loop.call_later(SAY_EVERY, self._say)
        else:
            self._more += 1

    def _say(self) -> None:
        self._timer = None
        if self._more:
            logger.log(self._level, "%d more connections %s in a minute", self._more, self._what)
            self._more = 0
            self._timer = self._loop.call_later(SAY_EVERY, self._say)


class ProblemHandler(RequestHandler):
    """aiohttp's handler, whose answer to a request it cannot parse is a problem document that
    says what was wrong, not aiohttp's text/plain echo of the offending bytes (which may be an
    `Authorization` header, sent back and kept by whatever logs responses)."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        answer = super().handle_error(request, status, exc, message)  # logs, and may raise
        if status >= 500 or not message:
            return answer
        # aiohttp's messages are a description, then a colon and the bytes quoted.
        described = " ".join(message.split(":", 1)[0].split())[:100]
        refusal = problem(status, HTTPStatus(status).phrase, f"not well-formed HTTP: {described}")
        refusal.force_close()
        return refusal


class ConnectionGuard:
    """The protocol factory to listen with: `loop.create_server(ConnectionGuard(...), ...)`."""

    def __init__(self, server: web.Server, *, header_timeout: float, max_connections: int) -> None:
        self.server = server
        #: What `web.Server()` passes its handlers (None in an aiohttp without it).
        self._handler_kwargs: dict[str, Any] | None = getattr(server, "_kwargs", None)
        self.header_timeout: float | None = header_timeout
        if not _NEEDS.issubset(getattr(RequestHandler, "__slots__", ())):
            logger.warning("this aiohttp's RequestHandler changed: http.header_timeout is off")
            self.header_timeout = None
        self.max_connections = max_connections
        self.open = 0  # connections admitted and not yet lost
        self.loop = asyncio.get_running_loop()
        self._refused = _Tally(
            self.loop,
            logging.WARNING,
            f"closed on accept: http.max_connections ({max_connections}) are open",
        )
        self._timed_out = _Tally(
            self.loop,
            logging.INFO,
            f"closed: request headers not complete in {header_timeout:g} s (http.header_timeout)",
        )

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    def handler(self) -> RequestHandler:
        """What `web.Server()` makes (web_server.py, `Server.__call__`), as a ProblemHandler."""
        if self._handler_kwargs is None:  # another aiohttp: its handler, its text/plain 400s
            return self.server()
        return ProblemHandler(self.server, loop=self.loop, **self._handler_kwargs)

    def refused(self) -> None:
        self._refused.add()

    def timed_out(self) -> None:
        self._timed_out.add()


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol for it, and the header timer around it."""

    __slots__ = ("_count_at_arm", "_guard", "_inner", "_timer")

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: RequestHandler | None = None  # None: refused, or lost
        self._timer: asyncio.TimerHandle | None = None
        self._count_at_arm = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        # Counted here and in connection_lost, which asyncio pairs; the factory is called
        # earlier, for connections that may never be made.
        if guard.open >= guard.max_connections:
            # Closed before any parser or task exists: the cheapest refusal, and the
            # descriptor is free again at once. The client sees the connection closed (or
            # reset, if its request had arrived) and may retry; no one waits in the backlog.
            guard.refused()
            transport.close()
            return
        guard.open += 1
        self._inner = guard.handler()
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        if self._guard.header_timeout is None:
            inner.data_received(data)
            return
        parsed = inner._request_count
        inner.data_received(data)
        if inner._request_count != parsed:
            self._disarm()  # headers complete: the request is the handler's to time
        elif self._timer is None and data and _idle(inner):
            # The first bytes of the next request on a kept-alive connection. Bytes that come
            # while a request is handled are its body, a websocket's frames, or a pipelined
            # request (bounded by aiohttp's keep-alive timer once the connection is idle).
            self._arm()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return None  # as aiohttp's: the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._guard.open -= 1
        self._disarm()
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _arm(self) -> None:
        seconds = self._guard.header_timeout
        if self._inner is None or seconds is None:
            return
        self._count_at_arm = self._inner._request_count
        self._timer = self._guard.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        inner = self._inner
        # Compared rather than trusted to the cancel: aiohttp also parses buffered bytes from
        # calls of its own (when it resumes reading), which do not pass through here.
        if inner is not None and inner._request_count == self._count_at_arm:
            self._guard.timed_out()
            inner.force_close()


def _idle(handler: RequestHandler) -> bool:
    """Whether the handler waits for a request (none parsed and none being handled)."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()
