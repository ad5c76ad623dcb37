"""`GET /v1/ws`: the websocket protocol (CONTRACT §3). One JSON object per text frame.

A bad frame gets an `error` frame and the connection stays open; a frame over
`ws.max_frame_bytes` is closed by aiohttp with 1009. The codes of error frames are protocol.py's
`ERRORS`; the ops are `OPS` below. `GET /asyncapi.json` (asyncapi.py) describes both, and every
frame.
"""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web

from aioqueue import compactjson
from aioqueue.config import normal_origin
from aioqueue.errors import (
    BrokerUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
)
from aioqueue.topics import check_pattern
from aioqueue.web.connection import CLOSE_TIMEOUT, Connection
from aioqueue.web.hub import job_frame
from aioqueue.web.problems import problem
from aioqueue.web.protocol import SNAPSHOT, ErrorCode
from aioqueue.web.state import STATE, State

logger = logging.getLogger(__name__)

#: The kernel's send buffer per websocket. Linux grows it up to 4 MiB on its own, which would let
#: each client that does not read hold megabytes before the hub notices (G5).
SEND_BUFFER_BYTES = 128 * 1024


#: Hosts a browser page may always open the websocket from (a developer's own machine).
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def origin_refused(request: web.Request, allowed: tuple[str, ...]) -> str | None:
    """Why a handshake from this request's `Origin` is refused; None if it may go on: no
    `Origin` (not a browser), the request's own origin, localhost, or one of `allowed`."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return None
    normal = normal_origin(origin)
    if normal is None:
        return f"the Origin header {origin[:100]!r} is not an origin"
    parts = urlsplit(normal)
    if parts.hostname in LOCAL_HOSTS:
        return None
    if parts.netloc == request.host.lower() or normal in _normal_origins(allowed):
        return None
    return f"websockets from {normal} are not allowed (ws.allowed_origins)"


@functools.cache
def _normal_origins(allowed: tuple[str, ...]) -> frozenset[str | None]:
    """`ws.allowed_origins` as `normal_origin` writes them: once, not at every handshake."""
    return frozenset(normal_origin(origin) for origin in allowed)


class FrameError(Exception):
    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    refused = origin_refused(request, state.settings.ws.allowed_origins)
    if refused is not None:
        # Cross-site websocket hijacking: a page elsewhere opening this socket with the
        # browser's cookies. Only browsers send Origin, and they cannot forge it.
        return problem(403, "Forbidden", refused)
    ws = web.WebSocketResponse(
        max_msg_size=state.settings.ws.max_frame_bytes,
        heartbeat=state.settings.ws.heartbeat,
        timeout=CLOSE_TIMEOUT,
        # No permessage-deflate, which browsers offer: aiohttp would compress each frame once
        # per connection, and keep a compressor of 268 KB per connection (bench/idle_ws.py
        # --deflate: 113 KiB per idle connection against 22; fan-out at half the speed). The
        # frames are small JSON; Centrifugo leaves compression off by default for the same reason.
        compress=False,
    )
    await ws.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    limits = state.settings.ws
    conn = Connection(ws, limits.send_buffer, limits.max_publishes_per_second, request.transport)
    state.connections.add(conn)
    try:
        await conn.serve(_read_frames(state, conn))
    finally:
        state.connections.discard(conn)
        state.hub.drop(conn)
        await conn.drain()
    return ws


async def _read_frames(state: State, conn: Connection) -> None:
    while (message := await conn.receive()) is not None:
        if message.type is WSMsgType.TEXT:
            await _on_frame(state, conn, message.data)
        elif message.type is WSMsgType.BINARY:
            _send(conn, _error("bad_frame", "binary frames are not accepted; send JSON text"))
        else:  # closed by the client, or the connection is lost
            return


async def _on_frame(state: State, conn: Connection, data: str) -> None:
    frame_id: Any = None
    try:
        frame = orjson.loads(data)
        if not isinstance(frame, dict):
            raise FrameError("bad_frame", "a frame is a JSON object with an 'op'")
        frame_id = frame.get("id")
        if isinstance(frame_id, float) and abs(frame_id) >= 2**53:
            # An integer past 2^64 is read as a float: it would come back changed.
            frame_id = None
            raise FrameError("bad_frame", "'id' is too large a number to come back exactly")
        op = frame.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise FrameError("unknown_op", f"unknown op {op!r}; ops are {', '.join(OPS)}")
        for reply in await handler(state, conn, frame):
            _send(conn, reply, frame_id)
    except orjson.JSONDecodeError as exc:
        _send(conn, _error("bad_frame", f"not JSON: {exc}"))
    except FrameError as exc:
        _send(conn, _error(exc.code, exc.message, **exc.extra), frame_id)
    except (BrokerUnavailable, NotReady) as exc:
        _send(conn, _error("unavailable", f"try again shortly: {exc}"), frame_id)
    except QueueFull as exc:
        _send(conn, _error("queue_full", f"try again shortly: {exc}"), frame_id)


def _send(conn: Connection, reply: dict[str, Any] | bytes, frame_id: Any = None) -> None:
    if isinstance(reply, dict):
        if frame_id is not None:
            reply["id"] = frame_id
        reply = compactjson.dumps(reply)  # it may wait in the queue
    conn.send(reply)


def _error(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def _channel(frame: dict[str, Any]) -> str:
    channel = frame.get("channel")
    if not isinstance(channel, str) or not channel:
        raise FrameError("bad_frame", "'channel' must be a string like 'job:ID' or 'topic:PATTERN'")
    if channel.startswith("topic:"):
        try:
            check_pattern(channel[6:], field="channel")
        except InvalidRequest as exc:
            raise FrameError("bad_frame", exc.detail) from None
    elif not channel.startswith("job:"):
        raise FrameError(
            "bad_frame", f"unknown channel {channel[:100]!r}; use 'job:ID' or 'topic:PATTERN'"
        )
    return channel


def _since(frame: dict[str, Any], channel: str) -> int | None:
    since = frame.get("since")
    if since is None:
        return None
    if not channel.startswith("topic:"):
        raise FrameError("bad_frame", "'since' is for topic channels; a job channel has snapshots")
    if isinstance(since, bool) or not isinstance(since, int) or since < -1:
        raise FrameError("bad_frame", "'since' must be an offset: an integer >= -1")
    return since


async def _subscribe(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    channel = _channel(frame)
    since = _since(frame, channel)
    limit = state.settings.ws.max_subscriptions
    if channel not in conn.subscriptions and len(conn.subscriptions) >= limit:
        raise FrameError("too_many_subscriptions", f"at most {limit} subscriptions per connection")
    if channel.startswith("topic:"):
        topics = state.topics()
        await topics.log.wait_position()  # where live begins: the reply says it
        # No await from here to the reply: it goes before every message of the channel.
        sub = state.hub.topics.subscribe(conn, channel, since, topics.log)
        # `since`: the offset the messages follow, to resubscribe with if the connection drops
        # before the first one comes (for a live subscription, the last one before it).
        return [{"type": "subscribed", "channel": channel, "since": sub.after}]
    job = state.jobs().get(channel[4:])
    if job is None:
        raise FrameError("not_found", f"no job {channel[4:][:100]!r}")
    # Subscribing and taking the snapshot with no await in between: every later event follows
    # the snapshot, none is missed and none comes twice.
    state.hub.subscribe(conn, channel)
    return [{"type": "subscribed", "channel": channel}, job_frame(channel, SNAPSHOT, job)]


async def _unsubscribe(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    channel = frame.get("channel")
    if not isinstance(channel, str):
        raise FrameError("bad_frame", "'channel' must be a string")
    state.hub.unsubscribe(conn, channel)
    return [{"type": "unsubscribed", "channel": channel}]


async def _submit(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    body = frame.get("job")
    if not isinstance(body, dict):
        raise FrameError("invalid_job", "'job' must be an object: the submit body")
    jobs = state.jobs()
    try:
        job, created = await jobs.submit_once(body)
    except InvalidRequest as exc:
        errors = [error.to_dict() for error in exc.errors]
        raise FrameError("invalid_job", exc.detail, errors=errors) from None
    except NotFound as exc:
        raise FrameError("not_found", exc.detail) from None
    except Conflict as exc:
        raise FrameError("conflict", exc.detail) from None
    except PayloadTooLarge as exc:
        raise FrameError("too_large", exc.detail) from None
    # `created`: False for a repeated idempotency key, whose first job this is (HTTP's 200).
    return [{"type": "submitted", "job": job.to_dict(), "created": created}]


async def _ping(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    return [{"type": "pong"}]


async def _publish(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    topic = frame.get("topic")
    if not isinstance(topic, str):
        raise FrameError("bad_frame", "'topic' must be a string like 'orders.eu'")
    if "data" not in frame:
        raise FrameError("bad_frame", "'data' is missing: the message, any JSON value")
    wait = conn.publishes.take()
    if wait:
        limit = state.settings.ws.max_publishes_per_second
        raise FrameError(
            "rate_limited",
            f"at most {limit} publishes per second per connection (ws.max_publishes_per_second);"
            f" try again in {wait:.2f} s",
            retry_after=round(wait, 3),
        )
    try:
        offset = await state.topics().publish(topic, frame["data"])
    except InvalidRequest as exc:
        raise FrameError("bad_frame", exc.detail) from None
    except PayloadTooLarge as exc:
        raise FrameError("too_large", exc.detail) from None
    return [{"type": "published", "topic": topic, "offset": offset}]


OPS = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "submit": _submit,
    "publish": _publish,
    "ping": _ping,
}
